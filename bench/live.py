"""Live conversations in the engine's loop: per-frame latency of N paced sessions, beside a batch job.

    python bench/live.py                                   # CPU, the tiny random checkpoint, 4 sessions
    python bench/live.py --sessions 64 --size real --device cuda

N conversations (`LiveSession`, personaplex.engine.live) each push real speech at real time, one
80 ms frame per 80 ms, for `--seconds`; a reader per session takes its generated frames as they
come. Per frame, latency = output frame received - input frame pushed (encode, the loop's step,
decode and the wait for the next step included); a frame is late past 80 ms. The run is done
twice in one process: the sessions alone, then beside a batch job (`--batch-seconds` of audio)
in the same loop, whose throughput (audio seconds per second) is compared with the same job run
alone. This measures the engine's loop, not the service: no Redis, no WebSocket, no Opus.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex.engine.batching import BatchRequest
from personaplex.engine.core import Engine
from personaplex.params import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, GenerationParams

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "recordings" / "input_service.wav"
FRAME_S = FRAME_SIZE / SAMPLE_RATE


class PacedSession:
    """One conversation: a speaker thread pushing frames at real time, a reader timing the replies."""

    def __init__(self, engine: Engine, speech: np.ndarray, seconds: float, seed: int) -> None:
        self.session = engine.live_session()
        self.frames = int(seconds * FRAME_RATE)
        offset = (seed * 7 * FRAME_SIZE) % max(1, len(speech) - self.frames * FRAME_SIZE)
        self.audio = speech[offset : offset + self.frames * FRAME_SIZE]
        self.params = GenerationParams(seed=seed)
        self.pushed: list[float] = []
        self.received: list[float] = []
        self._threads = [threading.Thread(target=self._speak), threading.Thread(target=self._listen)]

    def request(self) -> BatchRequest:
        return BatchRequest(None, self.params, live=self.session, live_frames=self.frames + 1)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _speak(self) -> None:
        start = time.perf_counter()
        for index in range(self.frames):
            time.sleep(max(0.0, start + index * FRAME_S - time.perf_counter()))
            self.pushed.append(time.perf_counter())
            self.session.push(self.audio[index * FRAME_SIZE : (index + 1) * FRAME_SIZE])
        self.session.close()

    def _listen(self) -> None:
        for _ in range(self.frames):
            self.session.frames.get(timeout=60)
            self.received.append(time.perf_counter())

    def latencies_ms(self) -> list[float]:
        return [1000 * (got - sent) for sent, got in zip(self.pushed, self.received, strict=True)]


def run_sessions(
    engine: Engine, speech: np.ndarray, args: argparse.Namespace, job: BatchRequest | None
) -> dict:
    sessions = [PacedSession(engine, speech, args.seconds, seed=1 + i) for i in range(args.sessions)]
    for session in sessions:
        session.start()
    requests = [session.request() for session in sessions] + ([job] if job else [])
    started = time.perf_counter()
    outcomes = engine.process_batch(requests)
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.join()
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert not failures, failures
    latencies = sorted(ms for session in sessions for ms in session.latencies_ms())
    report = {
        "frames": len(latencies),
        "latency_ms_p50": statistics.median(latencies),
        "latency_ms_p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "latency_ms_max": latencies[-1],
        "late_frames": sum(ms > 1000 * FRAME_S for ms in latencies),
        "wall_s": elapsed,
    }
    if job is not None:
        report["batch_job_throughput"] = args.batch_seconds / outcomes[-1].timings.generate_s
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio each session speaks")
    parser.add_argument("--batch-seconds", type=float, default=20.0, help="the batch job's audio")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    speech = audio_io.load(SPEECH, SAMPLE_RATE)
    with tempfile.TemporaryDirectory() as workdir:
        if args.size == "tiny":
            from personaplex.engine.tiny import write_tiny_checkpoint

            engine = Engine(write_tiny_checkpoint(Path(workdir) / "tiny"), device=device)
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from engine import build_random_engine  # bench/engine.py: real-size modules, random weights

            engine = build_random_engine(device, Path(workdir))
        engine.max_batch = max(engine.max_batch, args.sessions + 1)
        engine.load()
        job_audio = audio_io.encode_wav(np.resize(speech, int(args.batch_seconds * SAMPLE_RATE)))
        job = BatchRequest(job_audio, GenerationParams(seed=99))
        [warm] = engine.process_batch([BatchRequest(job_audio, job.params)])  # warm-up, and the job alone
        [alone] = engine.process_batch([BatchRequest(job_audio, job.params)])
        assert not isinstance(warm, Exception) and not isinstance(alone, Exception)
        report = {
            "size": args.size,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            "sessions": args.sessions,
            "seconds": args.seconds,
            "batch_job_alone_throughput": args.batch_seconds / alone.timings.generate_s,
            "alone": run_sessions(engine, speech, args, None),
            "beside_batch_job": run_sessions(engine, speech, args, BatchRequest(job_audio, job.params)),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

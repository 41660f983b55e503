"""Live conversations through the whole service: N PCM clients of WS /api/chat, paced at real time.

    python bench/live_service.py                       # CPU, the tiny random checkpoint, 4 clients
    python bench/live_service.py --sessions 8 --seconds 20

Starts a private redis-server, one Celery worker (`PERSONAPLEX_MAX_LIVE` = the sessions) and the
web server, then three runs in one process: the clients alone, the clients while a batch job runs
in the same worker's loop, and the job alone. Each client sends real speech, one 80 ms frame of
16-bit PCM per 80 ms, and times each reply frame: latency = its output frame received - its input
frame sent (web -> Redis stream -> worker: Mimi encode, the loop's step, decode -> Redis stream ->
web -> client). A frame is late past 80 ms. The job's throughput is its audio seconds per second of
inference, from its own timings. bench/live.py measures the engine's loop alone (no Redis, no
WebSocket) and runs at the real size on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the protocol client the tests use
sys.path.insert(0, str(ROOT / "bench"))

from chat_client import ChatClient  # noqa: E402
from service import percentile  # noqa: E402  (bench/service.py)

from personaplex import audio as audio_io  # noqa: E402
from personaplex.devstack import local_service, wait_until  # noqa: E402
from personaplex.params import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE  # noqa: E402

SPEECH = ROOT / "tests" / "data" / "recordings" / "input_service.wav"
FRAME_S = FRAME_SIZE / SAMPLE_RATE


def converse(base: str, speech: np.ndarray, seconds: float, index: int) -> list[float]:
    """One paced client; the latency of each of its frames (s)."""
    frames = int(seconds * FRAME_RATE)
    offset = (index * 7 * FRAME_SIZE) % max(1, len(speech) - frames * FRAME_SIZE)
    client = ChatClient(base, codec="pcm", seed=index).connect(timeout=120)
    sent = client.send_frames(speech[offset : offset + frames * FRAME_SIZE], pace_s=FRAME_S)
    client.wait_for_audio(frames, timeout=seconds + 60)
    client.hang_up()
    return [got - out for out, got in zip(sent, client.received.audio_at, strict=False)]


def run_clients(base: str, speech: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    latencies: list[list[float]] = [[] for _ in range(args.sessions)]

    def one(index: int) -> None:
        latencies[index] = converse(base, speech, args.seconds, index)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value for session in latencies for value in session]
    return {
        "frames": len(every),
        "p50_ms": round(percentile(every, 0.50) * 1000, 1),
        "p99_ms": round(percentile(every, 0.99) * 1000, 1),
        "max_ms": round(max(every) * 1000, 1),
        "late_frames": sum(value > FRAME_S for value in every),
    }


def submit_job(base: str, speech: np.ndarray, seconds: float) -> str:
    wav = audio_io.encode_wav(speech[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE, subtype="PCM_16")
    answer = requests.post(
        base + "/api/jobs", files={"file": ("batch.wav", wav)}, data={"seed": 1}, timeout=30
    )
    answer.raise_for_status()
    return answer.json()["job_id"]


def job_throughput(base: str, job_id: str, timeout: float = 600.0) -> float:
    """Audio seconds per second of inference of a finished job."""

    def final() -> dict | None:
        job = requests.get(f"{base}/api/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_until(final, timeout, interval=0.2, what="the batch job")
    assert job["status"] == "succeeded", job
    timings = job["result"]["timings"]
    return round(job["result"]["duration_s"] / timings["inference_s"], 2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio each client speaks")
    parser.add_argument("--batch-seconds", type=float, default=20.0, help="the batch job's audio")
    parser.add_argument("--model", help="checkpoint dir (default: the tiny random one, written here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    speech = audio_io.load(SPEECH, SAMPLE_RATE)
    environment = {
        "DEVICE": args.device,
        "PERSONAPLEX_MAX_LIVE": str(args.sessions),
        "PERSONAPLEX_MAX_BATCH": str(args.sessions + 1),
        "PERSONAPLEX_MAX_LIVE_SECONDS": str(args.seconds + 10),
        "OMP_NUM_THREADS": "1",
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_service(Path(tmp), args.model, "bench", **environment) as base,
    ):
        converse(base, speech, 1.0, 0)  # warm up: the model loads, the loop is built
        alone = run_clients(base, speech, args)
        job_id = submit_job(base, speech, args.batch_seconds)
        beside = run_clients(base, speech, args)
        beside_throughput = job_throughput(base, job_id)
        job_alone = job_throughput(base, submit_job(base, speech, args.batch_seconds))

    results = {
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "device": args.device,
        "sessions": args.sessions,
        "seconds": args.seconds,
        "clients_alone": alone,
        "clients_beside_a_job": beside,
        "job_audio_s_per_s_beside_clients": beside_throughput,
        "job_audio_s_per_s_alone": job_alone,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

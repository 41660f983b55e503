"""Scheduler benchmark: static batches against continuous ones, on one mixed workload, in one run.

    python bench/scheduler.py                                  # CPU, the tiny random checkpoint
    python bench/scheduler.py --size real --device cuda        # random weights at the real 7B size

Jobs of mixed lengths (`--short` of 1-10 s, `--long` of 30-120 s) arrive at random times (a
Poisson stream, `--rate` per second, seeded). Each runs first alone, to measure its solo engine
time: `Engine.process_batch([job])` (a loop sized for it), and alone in the worker's loop (a
continuous batch with nothing else queued, which keeps `--live-seconds` of room for a
conversation as a worker with conversations on does). Then the stream is replayed through one
engine in each mode, `--rounds` times (each round measures the solo times again, then replays
both modes; each figure reported is its median over the rounds):

- static: what a worker did before continuous batching. When the engine is free it takes every job
  that has arrived (up to PERSONAPLEX_MAX_BATCH) and runs that batch to its end; a job arriving
  meanwhile waits for the whole batch, its longest row included.
- continuous: `Engine.process_batch(jobs, feed)` with a feed that hands over the jobs that have
  arrived, looked for as soon as one has (the worker hears each job's arrival announced,
  worker.arrivals) and every `REFILL_CHECK_INTERVAL_S` without news, as the worker's `LoopFeed` does.

Per job: latency = end - arrival, relative latency = latency / solo time; p50 and p95 of the
relative latency for short jobs and long ones (and for short jobs against their solo time in the
worker's loop, `*_vs_loop_solo`: what sharing the loop costs them, without the cost of its
room). Throughput = audio seconds / (last end - first arrival). Occupancy = busy row-frames /
(rows x frames stepped). Results go to bench/results/<commit>_scheduler_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from personaplex.audio import encode_wav
from personaplex.engine.batching import REFILL_CHECK_INTERVAL_S, BatchRequest, JobFeed
from personaplex.engine.core import Engine
from personaplex.engine.fast import FastLoop
from personaplex.params import FRAME_RATE, SAMPLE_RATE, GenerationParams
from personaplex.settings import Settings

SHORT_MAX_S = 10.0
MODES = ("static", "continuous")


@dataclass
class Arrival:
    index: int
    seconds: float
    at: float
    """Arrival, seconds after the stream starts."""
    audio: bytes
    params: GenerationParams
    solo_s: float = 0.0
    """The job alone: `Engine.process_batch([job])`, in a loop sized for it."""
    loop_solo_s: float = 0.0
    """The job alone in the worker's loop: a continuous batch with nothing else to take."""
    ended: float = field(default=0.0)


class Occupancy:
    """Busy rows per frame stepped, counted around FastLoop.run (the bench's only instrument)."""

    def __init__(self) -> None:
        self.busy = 0
        self.capacity = 0
        self._run = FastLoop.run

    def __enter__(self) -> Occupancy:
        meter = self

        def run(loop: FastLoop, frames: int, before_frame=None) -> int:  # type: ignore[no-untyped-def]
            busy = sum(plan is not None for plan in loop.plans)
            stepped = meter._run(loop, frames, before_frame)
            meter.busy += busy * stepped
            meter.capacity += loop.batch * stepped
            return stepped

        FastLoop.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        FastLoop.run = self._run  # type: ignore[method-assign]

    @property
    def ratio(self) -> float:
        return self.busy / self.capacity if self.capacity else 0.0


def workload(args: argparse.Namespace) -> list[Arrival]:
    chance = random.Random(args.seed)
    speech = np.random.default_rng(args.seed).standard_normal(130 * SAMPLE_RATE).astype(np.float32) * 0.1
    lengths = [chance.uniform(1.0, SHORT_MAX_S) for _ in range(args.short)]
    lengths += [chance.uniform(30.0, 120.0) for _ in range(args.long)]
    chance.shuffle(lengths)
    arrivals, clock = [], 0.0
    for index, seconds in enumerate(lengths):
        audio = encode_wav(speech[: int(seconds * SAMPLE_RATE)])
        arrivals.append(Arrival(index, seconds, clock, audio, GenerationParams(seed=100 + index)))
        clock += chance.expovariate(args.rate)
    return arrivals


def request(job: Arrival) -> BatchRequest:
    def done(outcome: object) -> None:
        job.ended = time.perf_counter()

    return BatchRequest(job.audio, job.params, on_done=done)


def measure_solo(engine: Engine, jobs: list[Arrival], repeat: int) -> None:
    """Each job's solo engine times: the best of `repeat` runs alone (the least disturbed one)."""
    for job in jobs:
        job.solo_s = best_time(engine, job, None, repeat)
        job.loop_solo_s = best_time(engine, job, NothingMore(), repeat)


def best_time(engine: Engine, job: Arrival, feed: JobFeed | None, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        clock = time.perf_counter()
        engine.process_batch([BatchRequest(job.audio, job.params)], feed)
        times.append(time.perf_counter() - clock)
    return min(times)


class NothingMore:
    """The JobFeed of a worker with nothing queued: the job runs alone in a continuous loop."""

    def due(self) -> bool:
        return False

    def take(self, rows: int, max_frames: int | None = None) -> list[BatchRequest]:
        return []


def arrived(jobs: list[Arrival], start: float, taken: set[int]) -> list[Arrival]:
    now = time.perf_counter() - start
    return [job for job in jobs if job.at <= now and job.index not in taken]


def wait_for_next(jobs: list[Arrival], start: float, taken: set[int]) -> None:
    waiting = [job.at for job in jobs if job.index not in taken]
    delay = min(waiting) - (time.perf_counter() - start)
    if delay > 0:
        time.sleep(delay)


class StreamFeed:
    """The continuous mode's JobFeed: the jobs that have arrived, looked for as the worker's loop does."""

    def __init__(self, jobs: list[Arrival], start: float, taken: set[int]) -> None:
        self.jobs, self.start, self.taken = jobs, start, taken
        self.next_look = time.perf_counter() + REFILL_CHECK_INTERVAL_S

    def due(self) -> bool:
        announced = bool(arrived(self.jobs, self.start, self.taken))  # announced: the worker hears it at once
        return announced or time.perf_counter() >= self.next_look

    def take(self, rows: int, max_frames: int | None = None) -> list[BatchRequest]:
        self.next_look = time.perf_counter() + REFILL_CHECK_INTERVAL_S
        waiting = arrived(self.jobs, self.start, self.taken)
        if max_frames is not None:
            waiting = [job for job in waiting if math.ceil(job.seconds * FRAME_RATE) <= max_frames]
        chosen = waiting[:rows]
        self.taken.update(job.index for job in chosen)
        return [request(job) for job in chosen]


def replay(engine: Engine, jobs: list[Arrival], mode: str) -> dict[str, float]:
    taken: set[int] = set()
    start = time.perf_counter()
    with Occupancy() as occupancy:
        while len(taken) < len(jobs):
            wait_for_next(jobs, start, taken)
            batch = arrived(jobs, start, taken)[: engine.max_batch]
            taken.update(job.index for job in batch)
            feed = StreamFeed(jobs, start, taken) if mode == "continuous" else None
            engine.process_batch([request(job) for job in batch], feed)
    return summarize(jobs, start, occupancy.ratio)


def summarize(jobs: list[Arrival], start: float, occupancy: float) -> dict[str, float]:
    def relative(
        selected: list[Arrival], solo: Callable[[Arrival], float] = lambda job: job.solo_s
    ) -> list[float]:
        return sorted((job.ended - start - job.at) / solo(job) for job in selected)

    short_jobs = [job for job in jobs if job.seconds <= SHORT_MAX_S]
    short = relative(short_jobs)
    short_in_loop = relative(short_jobs, lambda job: job.loop_solo_s)
    long = relative([job for job in jobs if job.seconds > SHORT_MAX_S])
    makespan = max(job.ended for job in jobs) - start
    return {
        "short_p50": statistics.median(short),
        "short_p95": _p95(short),
        "short_p50_vs_loop_solo": statistics.median(short_in_loop),
        "short_p95_vs_loop_solo": _p95(short_in_loop),
        "long_p50": statistics.median(long) if long else 0.0,
        "long_p95": _p95(long) if long else 0.0,
        "throughput_audio_s_per_s": sum(job.seconds for job in jobs) / makespan,
        "occupancy": occupancy,
        "makespan_s": makespan,
    }


def one_round(engine: Engine, jobs: list[Arrival], repeat: int) -> dict[str, dict[str, float]]:
    """Solo times, then both modes: each round's ratios use solo times measured minutes, not a
    quarter of an hour, from its replays (a shared VM's speed drifts)."""
    measure_solo(engine, jobs, repeat)
    return {mode: replay(engine, jobs, mode) for mode in MODES}


def median_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (one replay of the stream each)."""
    return {name: statistics.median(figures[name] for figures in rounds) for name in rounds[0]}


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def build_engine(args: argparse.Namespace, workdir: Path) -> Engine:
    if args.size == "tiny":
        from personaplex.engine.tiny import write_tiny_checkpoint

        engine = Engine(write_tiny_checkpoint(workdir / "tiny"), device=args.device)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from engine import build_random_engine  # bench/engine.py: real-size modules, random weights

        engine = build_random_engine(torch.device(args.device), workdir)
    engine.max_batch = args.max_batch
    engine.live_frames = math.ceil(args.live_seconds * FRAME_RATE)
    return engine


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--short", type=int, default=12, help="jobs of 1-10 s")
    parser.add_argument("--long", type=int, default=3, help="jobs of 30-120 s")
    parser.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--live-seconds",
        type=float,
        default=Settings().max_live_seconds,
        help="room every continuous loop keeps for a conversation, as a worker with conversations on"
        " does (PERSONAPLEX_MAX_LIVE_SECONDS); 0: loops sized for their jobs alone",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=2, help="solo runs per job (the best counts)")
    parser.add_argument("--rounds", type=int, default=3, help="replays of both modes (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a test worker's: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        engine = build_engine(args, Path(workdir))
        engine.load()
        jobs = workload(args)
        measure_solo(engine, jobs[:1], 1)  # warm-up
        rounds = [one_round(engine, jobs, args.repeat) for _ in range(args.rounds)]
        report = {mode: median_figures([figures[mode] for figures in rounds]) for mode in MODES}
    machine = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    document = {
        "args": vars(args),
        "machine": machine,
        "torch": torch.__version__,
        "results": report,
        "rounds": rounds,
    }
    out = Path(__file__).parent / "results" / f"{commit()}_scheduler_{args.device.replace(':', '')}.json"
    out.write_text(json.dumps(document, indent=2))
    for mode, figures in report.items():
        print(mode, "  ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

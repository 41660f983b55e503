"""Queue overhead per job on the CPU with the tiny model: what the service adds around the engine.

    python bench/service.py [--jobs 50] [--seconds 1.0] [--workdir .bench-service]

Starts the stack as personaplex.demo does (a private redis-server, one Celery worker, the web server;
personaplex.devstack), warms the worker up with one job, then submits `--jobs` jobs one after another
over HTTP. For each: from just before POST /api/jobs until GET /api/jobs/<id> says succeeded and the
output WAV is downloadable, minus the engine time the job records (its `inference_s` plus `load_s`).
What remains is the queue's overhead: HTTP, validation, blob writes, Redis records, the Celery
message, the worker's bookkeeping, writing outputs, the client's polling. Prints JSON: median, p95,
min, max in milliseconds, and the raw samples.

The client polls GET /api/jobs/<id> every `--poll` seconds (default 5 ms), so up to that much of
each figure is the poll interval.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from personaplex.demo import test_recording  # noqa: E402
from personaplex.devstack import local_service  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_job(base: str, audio: bytes, poll: float) -> dict[str, float]:
    """One job end to end; returns wall seconds, engine seconds and overhead seconds."""
    started = time.perf_counter()
    reply = requests.post(f"{base}/api/jobs", files={"file": ("bench.wav", audio, "audio/wav")}, timeout=30)
    reply.raise_for_status()
    job_id = reply.json()["job_id"]
    while True:
        job = requests.get(f"{base}/api/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(poll)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    output = requests.get(f"{base}/api/jobs/{job_id}/audio", timeout=30)
    output.raise_for_status()
    wall = time.perf_counter() - started
    timings = job["result"]["timings"]
    engine = timings["inference_s"] + timings["load_s"]
    return {"wall_s": wall, "engine_s": engine, "overhead_s": wall - engine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each input")
    parser.add_argument("--poll", type=float, default=0.005, help="client poll interval, seconds")
    parser.add_argument("--workdir", default=".bench-service")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    environment = {"OMP_NUM_THREADS": "1", "GPU_IDLE_TIMEOUT": "0"}
    with local_service(workdir, worker="bench-gpu0", **environment) as base:
        audio = test_recording(args.seconds)
        run_job(base, audio, args.poll)  # warm-up: loads the model, first imports
        samples = [run_job(base, audio, args.poll) for _ in range(args.jobs)]
    overhead_ms = [s["overhead_s"] * 1000 for s in samples]
    report = {
        "jobs": args.jobs,
        "input_seconds": args.seconds,
        "poll_ms": args.poll * 1000,
        "overhead_ms": {
            "median": round(statistics.median(overhead_ms), 1),
            "p95": round(percentile(overhead_ms, 0.95), 1),
            "min": round(min(overhead_ms), 1),
            "max": round(max(overhead_ms), 1),
        },
        "engine_ms_median": round(statistics.median(s["engine_s"] for s in samples) * 1000, 1),
        "wall_ms_median": round(statistics.median(s["wall_s"] for s in samples) * 1000, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "commit": _commit(),
        "samples_ms": [round(v, 1) for v in overhead_ms],
    }
    print(json.dumps(report, indent=1))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

"""Fault soak: jobs keep their promises while workers are SIGKILLed and Redis restarts.

    python bench/soak.py [--runs 10] [--jobs 40] [--seconds 30 90] [--max-batch 2] [--kill-every 12]

Each run starts a private redis-server with an append-only file (a restart keeps the data, as in
production), writes the tiny random model, starts two Celery workers with a 20 s visibility timeout
and the default 15 s lease, batching at most `--max-batch` jobs, and queues `--jobs` short jobs (real
speech, lengths drawn from `--seconds`, mixed seeds: long enough together to outlast several kills on
a CPU with the tiny model). Then,
until every job is final: every `--kill-every` seconds it SIGKILLs the worker that is running a job
(or the other one) and starts it again under the same name; once, midway, it restarts Redis. A run
passes when every job succeeded, exactly one attempt's outputs were committed (the record names it and
its output JSON matches the record), and no job stayed running or queued past the run's time limit.
Prints one JSON line per run, then a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from personaplex import audio as audio_io  # noqa: E402
from personaplex.devstack import RedisServer, ServiceProcess, wait_until, worker_process  # noqa: E402
from personaplex.engine.tiny import write_tiny_checkpoint  # noqa: E402
from personaplex.jobs import Job, JobStatus, JobStore  # noqa: E402
from personaplex.params import GenerationParams  # noqa: E402
from personaplex.settings import Settings  # noqa: E402
from personaplex.storage import INPUT, OUTPUT_JSON, FsBlobStore, read_output  # noqa: E402
from worker import create_celery_app  # noqa: E402
from worker.control import send_job  # noqa: E402

SPEECH = REPO / "tests" / "data" / "recordings" / "input_assistant.wav"


class Fleet:
    """Two named workers that can be killed and started again."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env, self.logdir = env, logdir
        self.workers: dict[str, ServiceProcess] = {}

    def start(self, name: str) -> None:
        self.workers[name] = worker_process(name, self.env, self.logdir / f"{name}-{time.time():.0f}").start()

    def kill_busiest(self, jobs: JobStore, ids: list[str]) -> str:
        running = {j.worker for j in jobs.get_many(ids) if j.status is JobStatus.RUNNING}
        name = next((n for n in self.workers if any(w and w.startswith(f"{n}@") for w in running)), None)
        name = name or sorted(self.workers)[int(time.time()) % len(self.workers)]
        self.workers[name].kill()
        self.start(name)
        return name

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def submit(
    app, jobs: JobStore, blobs: FsBlobStore, speech: np.ndarray, count: int, lengths: tuple[float, float]
) -> list[str]:
    rng = np.random.default_rng(0)
    speech = np.resize(speech, int((lengths[1] + 10) * 24_000))  # the recording repeated, long enough
    ids = []
    for i in range(count):
        seconds = float(rng.uniform(*lengths))
        start = int(rng.integers(0, len(speech) - int(seconds * 24_000)))
        job = Job(params=GenerationParams(seed=i).to_dict(), input_duration_s=seconds)
        blobs.put(job.id, INPUT, audio_io.encode_wav(speech[start : start + int(seconds * 24_000)]))
        jobs.create(job)
        send_job(app, job.id)
        jobs.mark_dispatched(job.id)
        ids.append(job.id)
    return ids


def check(jobs: JobStore, blobs: FsBlobStore, ids: list[str]) -> list[str]:
    """What broke a promise: a job not succeeded, or a record whose outputs are not its attempt's."""
    problems = []
    for job in jobs.get_many(ids):
        if job.status is not JobStatus.SUCCEEDED:
            problems.append(f"{job.id}: {job.status.value} (attempts {job.attempts}, {job.progress})")
            continue
        document = json.loads(read_output(blobs, job, OUTPUT_JSON))
        if document["text"] != job.result["text"] or document["job_id"] != job.id:
            problems.append(f"{job.id}: its output JSON differs from its record")
    return problems


def one_run(workdir: Path, model: Path, args: argparse.Namespace) -> dict:
    redis_server = RedisServer(workdir / "redis", persist=True).start()
    settings = Settings.from_env({}, redis_url=redis_server.url, data_dir=workdir / "data")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "REDIS_URL": settings.redis_url,
        "PERSONAPLEX_MODEL": str(model),
        "PERSONAPLEX_DATA_DIR": str(settings.data_dir),
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "PERSONAPLEX_VISIBILITY_TIMEOUT": "20",
        "PERSONAPLEX_MAX_ATTEMPTS": "20",  # kills every 12 s may hit one job many times
        "PERSONAPLEX_MAX_BATCH": str(args.max_batch),
    }
    fleet = Fleet(env, workdir / "logs")
    app = create_celery_app(settings)
    jobs, blobs = JobStore(redis_server.client(), settings.retention_s), FsBlobStore(settings.data_dir)
    started = time.monotonic()
    kills, restarted = [], False
    try:
        for name in ("soak0", "soak1"):
            fleet.start(name)
        ids = submit(app, jobs, blobs, audio_io.load(SPEECH), args.jobs, tuple(args.seconds))
        next_kill = time.monotonic() + args.kill_every
        while time.monotonic() - started < args.limit:
            if all(j.status.is_final for j in jobs.get_many(ids)) and len(jobs.get_many(ids)) == len(ids):
                break
            if time.monotonic() >= next_kill:
                kills.append(fleet.kill_busiest(jobs, ids))
                next_kill = time.monotonic() + args.kill_every
                if len(kills) == 2 and not restarted:
                    redis_server.stop()
                    time.sleep(1.0)
                    redis_server.start()
                    restarted = True
            time.sleep(0.5)
        wait_until(redis_server.ping, 10, what="redis")
        problems = check(jobs, blobs, ids)
        attempts = [j.attempts for j in jobs.get_many(ids)]
    finally:
        fleet.stop()
        app.close()
        redis_server.stop()
    return {
        "passed": not problems,
        "seconds": round(time.monotonic() - started, 1),
        "kills": len(kills),
        "redis_restarted": restarted,
        "max_attempts": max(attempts, default=0),
        "retried_jobs": sum(a > 1 for a in attempts),
        "problems": problems[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seconds", type=float, nargs=2, default=(30.0, 90.0), help="job lengths (min max)")
    parser.add_argument("--max-batch", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=12.0)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench-soak")
    args = parser.parse_args(argv)
    model = write_tiny_checkpoint(args.workdir / "tiny-model")
    results = []
    for run in range(args.runs):
        result = one_run(args.workdir / f"run{run}", model, args)
        results.append(result)
        print(json.dumps({"run": run, **result}), flush=True)
    passed = sum(r["passed"] for r in results)
    print(json.dumps({"passed_runs": passed, "runs": len(results)}))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

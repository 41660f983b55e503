"""End-to-end demo: one WAV through the queue on the built-in tiny model.

    python -m personaplex.demo [--workdir .demo] [--seconds 4]

It starts a private redis-server (unless REDIS_URL is set), writes the tiny random model, starts
a Celery worker and the web server, submits a test recording over HTTP, waits for the job, prints
where the output went and the timings, then stops what it started. The tiny model's weights are
random: its reply is noise and its text gibberish. That is expected; the demo shows the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from personaplex.audio import encode_wav
from personaplex.client import PersonaPlexClient
from personaplex.devstack import RedisServer, free_port, wait_until, web_process, worker_process
from personaplex.params import SAMPLE_RATE


def test_recording(seconds: float) -> bytes:
    """A short spoken-like signal: a gliding tone with syllable-rate amplitude, plus a little noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.5 * t)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * np.exp(-(((t % 1.0) - 0.5) ** 2))
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE) * envelope
    noise = 0.01 * np.random.default_rng(0).standard_normal(len(t))
    return encode_wav((0.3 * voice + noise).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personaplex.demo", description=__doc__)
    parser.add_argument("--workdir", default=".demo", help="model, data and logs go here")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the test recording")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    started: list = []
    try:
        return run(workdir, args.seconds, started)
    finally:
        for service in reversed(started):
            service.stop()


def run(workdir: Path, seconds: float, started: list) -> int:
    from personaplex.engine.tiny import write_tiny_checkpoint

    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        redis = RedisServer(workdir / "redis").start()
        started.append(redis)
        redis_url = redis.url
        print(f"started a private redis-server at {redis_url}")
    model = write_tiny_checkpoint(workdir / "tiny-model")
    print(f"wrote the tiny random model to {model}")
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "PERSONAPLEX_MODEL": str(model),
        "PERSONAPLEX_DATA_DIR": str(workdir / "data"),
        "DEVICE": "cpu",
        "PORT": str(port),
    }
    worker = worker_process("demo-gpu0", env, workdir / "logs").start()
    started.append(worker)
    web = web_process(port, env, workdir / "logs").start()
    started.append(web)
    worker.wait_for_log(" ready.", timeout=120)
    client = PersonaPlexClient(f"http://127.0.0.1:{port}")
    wait_until(lambda: _healthy(client), timeout=60, what="the web server")
    print(f"worker and web server up; API at {client.base_url}")
    return submit_and_report(client, workdir, seconds)


def _healthy(client: PersonaPlexClient) -> bool:
    try:
        return client.health().get("status") == "healthy"
    except Exception:  # noqa: BLE001 - not up yet
        return False


WARM_UP_SECONDS = 1.0
POLL_INTERVAL_S = 0.05
"""The demo polls often, so its end-to-end figure is not rounded up to the client's default 1 s poll."""


def submit_and_report(client: PersonaPlexClient, workdir: Path, seconds: float) -> int:
    warm_up = _submit_and_wait(client, WARM_UP_SECONDS)
    if warm_up["status"] != "succeeded":
        return _report_failure(warm_up)
    print(
        f"cold start: a {WARM_UP_SECONDS:.0f} s warm-up job took {_server_seconds(warm_up):.2f} s "
        "(the worker imports torch and loads the model on its first job; later jobs skip this)"
    )
    submitted = time.perf_counter()
    done = _submit_and_wait(client, seconds)
    elapsed = time.perf_counter() - submitted
    if done["status"] != "succeeded":
        return _report_failure(done)
    job_id = done["id"]
    out_dir = workdir / "output"
    out_dir.mkdir(parents=True, exist_ok=True)
    wav_path = client.download_audio(job_id, out_dir / f"{job_id}.wav")
    text_path = out_dir / f"{job_id}.json"
    text_path.write_text(json.dumps(client.download_text(job_id), indent=1))
    timings = (done.get("result") or {}).get("timings") or {}
    print(f"job {job_id} succeeded in {elapsed:.2f} s end to end")
    print("  " + _account(elapsed, timings))
    print(f"  output audio: {wav_path}")
    print(f"  output text:  {text_path}")
    print(f"  timings: {json.dumps(timings, sort_keys=True)}")
    print("  (the tiny model has random weights: the reply is noise, the text gibberish)")
    return 0


def _submit_and_wait(client: PersonaPlexClient, seconds: float) -> dict:
    job = client.submit_job(test_recording(seconds), filename="demo.wav", voice_prompt="NATF2.pt")
    print(f"submitted job {job['job_id']} ({seconds:.1f} s of audio)")
    return client.wait(job["job_id"], timeout=300, poll_interval=POLL_INTERVAL_S)


def _server_seconds(job: dict) -> float:
    """From the record's creation to its final write, as the service measured it."""
    return float(job["finished_at"]) - float(job["created_at"])


def _account(elapsed: float, timings: dict) -> str:
    """Where the end-to-end time went: waiting in the queue, the worker's inference, and the rest
    (upload, writing the outputs, the record and the client's polling)."""
    queued = float(timings.get("queue_wait_s", 0.0))
    inference = float(timings.get("total_s", 0.0))
    rest = max(elapsed - queued - inference, 0.0)
    return f"= {queued:.2f} s queued + {inference:.2f} s inference + {rest:.2f} s upload, output writes and polling"


def _report_failure(job: dict) -> int:
    print(f"job {job.get('id')} ended {job['status']}: {job.get('error')}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

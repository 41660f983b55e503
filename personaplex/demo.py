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
    from personaplex.tiny import write_tiny_checkpoint

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


def submit_and_report(client: PersonaPlexClient, workdir: Path, seconds: float) -> int:
    submitted = time.perf_counter()
    job = client.submit_job(test_recording(seconds), filename="demo.wav", voice_prompt="NATF2.pt")
    print(f"submitted job {job['job_id']} ({seconds:.1f} s of audio)")
    done = client.wait(job["job_id"], timeout=300)
    elapsed = time.perf_counter() - submitted
    if done["status"] != "succeeded":
        print(f"job ended {done['status']}: {done.get('error')}", file=sys.stderr)
        return 1
    out_dir = workdir / "output"
    out_dir.mkdir(parents=True, exist_ok=True)
    wav_path = client.download_audio(job["job_id"], out_dir / f"{job['job_id']}.wav")
    text = client.download_text(job["job_id"])
    (out_dir / f"{job['job_id']}.json").write_text(json.dumps(text, indent=1))
    result = done.get("result") or {}
    print(f"job {done['id']} succeeded in {elapsed:.2f} s end to end")
    print(f"  output audio: {wav_path}")
    print(f"  output text:  {out_dir / (job['job_id'] + '.json')}")
    print(f"  timings: {json.dumps(result.get('timings', result), sort_keys=True)}")
    print("  (the tiny model has random weights: the reply is noise, the text gibberish)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

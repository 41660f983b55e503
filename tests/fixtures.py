"""Helpers behind the fixtures in conftest.py: real processes, no mocks.

- `RedisServer`: a private `redis-server` on a free loopback port that a test can stop and start.
- Paths to the test data the repository carries (tests/data: real speech, golden vectors) and
  `speech_clip(seconds)`, real speech of any length as WAV bytes.
- `WorkerProcess`: a `celery -A worker worker` subprocess with its own environment.
- `wait_for_job(store, job_id, ...)`: poll a job record until a condition holds.
- `Queue`: submits jobs as the web does (input, record, message) without a web server;
  `deliveries`/`runs` count from a worker's log how often it delivered or ran a job.

Plain classes and functions live here so tests can import them; conftest.py only wires fixtures.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import redis
import simple_websocket

from personaplex import audio as audio_io
from personaplex.devstack import RedisServer, ServiceProcess, free_port, wait_until  # noqa: F401
from personaplex.jobs import Job, JobStore, Keys
from personaplex.params import GenerationParams
from personaplex.settings import Settings
from personaplex.storage import INPUT, OUTPUT_JSON, FsBlobStore, read_output
from worker import create_celery_app
from worker.control import send_job

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "tests" / "data"
RECORDINGS_DIR = DATA_DIR / "recordings"
GOLDEN_DIR = DATA_DIR / "golden"
SPEECH_20S = RECORDINGS_DIR / "input_service.wav"
SPEECH_40S = RECORDINGS_DIR / "input_assistant.wav"
CELERY = str(Path(sys.executable).with_name("celery"))


def speech_clip(seconds: float) -> bytes:
    """`seconds` of the 40 s speech recording (cut, or repeated end to end), as 24 kHz float WAV bytes.

    Long clips keep the tiny model busy for seconds even on a fast CPU: tests that must cancel a job
    mid-run use them rather than hoping a short job is still running."""
    import numpy as np

    from personaplex.audio import encode_wav, load

    return encode_wav(np.resize(load(SPEECH_40S), int(seconds * 24_000)))


def speaker_recording(seconds: float = 3.5) -> bytes:
    """`seconds` of one speaker, as 16-bit 24 kHz WAV bytes: a custom voice's recording. The 20 s
    recording speaks from 5 s to 9 s; its first 5 s are silence, which no voice may be."""
    from personaplex.audio import encode_wav, load

    return encode_wav(load(SPEECH_20S)[5 * 24_000 : int((5 + seconds) * 24_000)], 24_000, subtype="PCM_16")


def tiny_service_env(redis_url: str, model_dir: Path, data_dir: Path) -> dict[str, str]:
    """Environment for a module's own worker (or web server) on `model_dir`, its own Redis and data
    dir, on the CPU with one torch thread."""
    return {
        "REDIS_URL": redis_url,
        "PERSONAPLEX_MODEL": str(model_dir),
        "PERSONAPLEX_DATA_DIR": str(data_dir),
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }


def worker_environment(settings: Settings, model_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess: `settings`' Redis and data dir, the model, the CPU.

    A 3 s heartbeat TTL (also the job lease TTL) lets a killed worker's lease expire quickly;
    one torch thread per worker keeps two workers from fighting over two cores.
    """
    return {
        "REDIS_URL": settings.redis_url,
        "PERSONAPLEX_MODEL": str(model_dir),
        "PERSONAPLEX_DATA_DIR": str(settings.data_dir),
        "PERSONAPLEX_BLOB_STORE": settings.blob_store,
        "DEVICE": "cpu",
        "PERSONAPLEX_HEARTBEAT_TTL": "3",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def stop_all(workers: list[WorkerProcess], timeout: float = 15.0) -> None:
    """Warm-stop several workers at once (SIGTERM to all, then wait), SIGKILL any that hang."""
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.stop(timeout=max(deadline - time.monotonic(), 0.1))


class WorkerProcess(ServiceProcess):
    """One `celery -A worker worker` subprocess named `<name>@test`; output in `<logdir>/<name>.log`."""

    def __init__(
        self, name: str, env: Mapping[str, str], logdir: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.hostname = f"{name}@test"
        args = [CELERY, "-A", "worker", "worker", "-n", self.hostname, "--loglevel", "INFO"]
        args += ["--without-mingle", "--without-gossip", *extra_args]
        super().__init__(name, args, {"PYTHONPATH": str(REPO_ROOT), **env}, logdir)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for celery's "ready." log line, which comes after the broker connection and consumer start."""
        self.wait_for_log(" ready.", timeout)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM): the running task finishes, then the worker exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


def wait_for_job(
    store: JobStore, job_id: str, predicate: Callable[[Job], bool] | None = None, timeout: float = 60.0
) -> Job:
    """Poll until the job satisfies `predicate` (default: it is final); returns the job then."""
    check = predicate or (lambda job: job.status.is_final)

    def matching() -> Job | None:
        job = store.get(job_id)
        return job if job is not None and check(job) else None

    return wait_until(matching, timeout, what=f"job {job_id}")  # type: ignore[return-value]


def collect_events(client: redis.Redis) -> Iterator[list[dict]]:
    """Every job event published while the test runs (subscribed before the test starts)."""
    received: list[dict] = []
    pubsub = client.pubsub()
    pubsub.psubscribe(Keys.PREFIX + "events:*")
    confirmed = wait_until(lambda: pubsub.get_message(timeout=0.1), 5, what="the psubscribe confirmation")
    assert confirmed["type"] == "psubscribe"  # type: ignore[index]
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.05)
            if message and message["type"] == "pmessage":
                received.append(json.loads(message["data"]))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    yield received
    time.sleep(0.1)  # let the last events arrive
    stop.set()
    thread.join()
    pubsub.close()


class Queue:
    """What the web does: a job record with its input duration, the input blob, then the task."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.app = create_celery_app(settings)
        self.jobs = JobStore(client, settings.retention_s)
        self.blobs = FsBlobStore(settings.data_dir)

    def submit(self, audio: bytes, params: GenerationParams) -> Job:
        seconds = audio_io.probe(audio).duration_s
        job = Job(params=params.to_dict(), input_duration_s=seconds)
        self.blobs.put(job.id, INPUT, audio)  # before the record: a queued record is claimable at once
        self.jobs.create(job)
        send_job(self.app, job.id)
        self.jobs.mark_dispatched(job.id)
        return job

    def tokens(self, job_id: str) -> list[list[int]]:
        return json.loads(read_output(self.blobs, self.jobs.get(job_id), OUTPUT_JSON))["tokens"]


def deliveries(worker: WorkerProcess, job_id: str, ran: bool) -> int:
    """How many deliveries of the job the worker finished, with or without running the engine."""
    marker = f"'ran': {ran}}}"
    return sum(1 for line in worker.log().splitlines() if f"[{job_id}]" in line and marker in line)


def runs(worker: WorkerProcess, job_id: str) -> int:
    """How often the worker's loop ran the job to its end (handed in by its delivery, or claimed)."""
    return sum(1 for line in worker.log().splitlines() if f"job {job_id} (in the loop of" in line)


def silent_flac(rate: int, channels: int, seconds: int) -> bytes:
    """Silent 16-bit FLAC, written a second at a time: FLAC packs silence into almost nothing."""
    import io

    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    zeros = np.zeros((rate, channels), dtype=np.int16)
    with sf.SoundFile(buffer, "w", rate, channels, "PCM_16", format="FLAC") as f:
        for _ in range(seconds):
            f.write(zeros)
    return buffer.getvalue()


class WsClient(simple_websocket.Client):
    """simple-websocket's client, minus a race: a message the server sends right behind its 101
    answer (gevent workers do) lands in the same read as the handshake, and simple-websocket's client
    leaves it parsed-but-unhandled until more bytes come, so `receive` times out. Handling the
    buffered events once after the handshake delivers it."""

    def handshake(self) -> None:
        super().handshake()
        self._handle_events()
        # A close that came with the handshake is not an error here: the reader thread finds the
        # socket closed, and `receive` raises ConnectionClosed with the close reason recorded now.
        self.connected = True


def ws_connect(url: str, headers: Mapping[str, str] | None = None) -> WsClient:
    """A WebSocket client connected to `url` (ws://...)."""
    return WsClient.connect(url, headers=dict(headers or {}))


def events_until_closed(ws: simple_websocket.Client, timeout: float = 15.0) -> list[dict]:
    """Every JSON message on the socket until the server closes it; fails if it stays open."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = ws.receive(timeout=0.5)
            if message is not None:
                events.append(json.loads(message))
    except simple_websocket.ConnectionClosed:
        return events
    raise AssertionError(f"socket still open after {timeout} s; got {events}")

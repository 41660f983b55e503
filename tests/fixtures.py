"""Helpers behind the fixtures in conftest.py: real processes, no mocks.

- `RedisServer`: a private `redis-server` on a free loopback port that a test can stop and start.
- Paths to the shared test data (the `shared/` directory beside the repository root) and
  `speech_clip(seconds)`, the first seconds of real speech as WAV bytes.
- `WorkerProcess`: a `celery -A worker worker` subprocess with its own environment.
- `wait_for_job(store, job_id, ...)`: poll a job record until a condition holds.

Plain classes and functions live here so tests can import them; conftest.py only wires fixtures.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis

from personaplex.jobs import Job, JobStore
from personaplex.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
TESTDATA_DIR = SHARED_DIR / "testdata"
SPEECH_20S = TESTDATA_DIR / "input_service.wav"
SPEECH_40S = TESTDATA_DIR / "input_assistant.wav"
CELERY = str(Path(sys.executable).with_name("celery"))


def speech_clip(seconds: float) -> bytes:
    """The first `seconds` of the 40 s speech recording, as 24 kHz float WAV bytes."""
    from personaplex.audio import encode_wav, load

    samples = load(SPEECH_40S)
    return encode_wav(samples[: int(seconds * 24_000)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = ""
) -> object:
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what or predicate}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server without persistence, on a fixed port so clients can reconnect after start()."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        if self.is_running:
            return
        binary = shutil.which("redis-server") or "redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self.ping, timeout, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


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


class WorkerProcess:
    """One `celery -A worker worker` subprocess; its output goes to `<logdir>/<name>.log`."""

    def __init__(
        self, name: str, env: Mapping[str, str], logdir: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self.hostname = f"{name}@test"
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
        self.log_path = Path(logdir) / f"{name}.log"
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        args = [CELERY, "-A", "worker", "worker", "-n", self.hostname, "--loglevel", "INFO"]
        args += ["--without-mingle", "--without-gossip", *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for celery's "ready." log line, which comes after the broker connection and consumer start."""

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early:\n{self.log()}")
            return " ready." in self.log()

        wait_until(ready, timeout, interval=0.1, what=f"worker {self.name} ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to ack, requeue or clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM): the running task finishes, then the worker exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_for_job(
    store: JobStore, job_id: str, predicate: Callable[[Job], bool] | None = None, timeout: float = 60.0
) -> Job:
    """Poll until the job satisfies `predicate` (default: it is final); returns the job then."""
    check = predicate or (lambda job: job.status.is_final)

    def matching() -> Job | None:
        job = store.get(job_id)
        return job if job is not None and check(job) else None

    return wait_until(matching, timeout, what=f"job {job_id}")  # type: ignore[return-value]

"""Run the whole service on one machine: a private Redis, a Celery worker, the web server.

Used by the demo (`python -m personaplex.demo`), the integration tests, the service benchmarks and
the console's screenshots, so all start the stack the same way: real processes on free loopback
ports, logs in a work folder (`local_service` starts the whole of it). `chromium_args` is how the
browser tests and the screenshots launch Chromium.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis
import requests

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


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
    """A private redis-server on a fixed port, so clients can reconnect after start().

    Without persistence by default (a restart loses every key); `persist=True` keeps an append-only
    file in `workdir`, so a restart keeps the data, as a production Redis would.
    """

    def __init__(self, workdir: Path, port: int | None = None, persist: bool = False) -> None:
        self.workdir = Path(workdir)
        self.persist = persist
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.is_running:
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (apt-get install redis-server) and REDIS_URL is unset."
            )
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ping, timeout, what=f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        _terminate(self.process, timeout=10)
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


class ServiceProcess:
    """A long-running child (worker or web server) with its output in `<logdir>/<name>.log`."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], logdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = {**os.environ, **env}
        self.log_path = Path(logdir) / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args,
                cwd=PACKAGE_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_for_log(self, marker: str, timeout: float) -> None:
        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            return marker in self.log()

        wait_until(seen, timeout, interval=0.1, what=f"{self.name}: {marker!r}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no chance to ack, requeue or clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            _terminate(self.process, timeout)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_process(name: str, env: Mapping[str, str], logdir: Path, *extra: str) -> ServiceProcess:
    args = [CELERY, "-A", "worker", "worker", "-n", f"{name}@%h", "--loglevel", "INFO"]
    return ServiceProcess(name, [*args, "--without-mingle", "--without-gossip", *extra], env, logdir)


def web_process(port: int, env: Mapping[str, str], logdir: Path) -> ServiceProcess:
    return ServiceProcess(
        "web", [sys.executable, "-m", "web", "--host", "127.0.0.1", "--port", str(port)], env, logdir
    )


def service_healthy(base_url: str) -> bool:
    """Whether the web server at `base_url` answers /health with "healthy" (not up yet: False)."""
    try:
        return requests.get(f"{base_url}/health", timeout=2).json().get("status") == "healthy"
    except (requests.RequestException, ValueError):
        return False


@contextmanager
def local_service(
    workdir: Path, model: str | os.PathLike | None = None, worker: str = "gpu0", **environment: str
) -> Iterator[str]:
    """The base URL of a private stack: a redis-server, one worker on `model` (None: the tiny random
    model, written under `workdir`) and `python -m web`, on free loopback ports with their logs in
    `workdir/logs`; stopped on exit. `environment` adds to (or overrides, DEVICE=...) both processes'
    settings. Yields once the worker is ready and /health says healthy."""
    workdir = Path(workdir)
    started: list[RedisServer | ServiceProcess] = []
    try:
        redis_server = RedisServer(workdir / "redis").start()
        started.append(redis_server)
        if model is None:
            from personaplex.engine.tiny import write_tiny_checkpoint

            model = write_tiny_checkpoint(workdir / "tiny-model")
        port = free_port()
        env = {
            "REDIS_URL": redis_server.url,
            "PERSONAPLEX_MODEL": str(model),
            "PERSONAPLEX_DATA_DIR": str(workdir / "data"),
            "DEVICE": "cpu",
            "PORT": str(port),
            **environment,
        }
        worker_service = worker_process(worker, env, workdir / "logs").start()
        started.append(worker_service)
        started.append(web_process(port, env, workdir / "logs").start())
        worker_service.wait_for_log(" ready.", timeout=120)
        base_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: service_healthy(base_url), timeout=60, interval=0.2, what="the web server")
        yield base_url
    finally:
        for service in reversed(started):
            service.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
"""Debian's Chromium (scripts/setup.sh installs it): playwright drives it, as it cannot download its
own browsers here."""


def chromium_args(microphone: Path) -> list[str]:
    """Launch arguments for headless Chromium with a fake microphone that plays `microphone` (a WAV)
    and media permissions granted, so a page can capture and play audio unattended."""
    return [
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--autoplay-policy=no-user-gesture-required",
    ]

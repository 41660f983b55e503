"""Run the whole service on one machine: a private Redis, a Celery worker, the web server.

Used by the demo (`python -m personaplex.demo`) and by the integration tests, so both start the
stack the same way: real processes on free loopback ports, logs in a work folder.
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

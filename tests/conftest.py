"""Shared fixtures. Real parts only: a private redis-server, real worker processes, the tiny model.

Sections (add new fixtures to the section they belong to, or start a new one):
  0. Skips: the summary counts them; under CI=true any skip fails the run
  1. Redis: `redis_server` (session; .url, .stop(), .start()), `redis_client` (flushed per test)
  2. Settings and stores: `settings`, `job_store`, `blob_store`; `start_web` (factory: web server thread)
  3. Engine on the tiny model: `tiny_checkpoint` (session), `tiny_engine` (session)
  4. Audio: `speech_wav` (path of 20 s of real speech)
  5. Workers: `worker_env` (env for a worker subprocess), `start_worker` (factory; all stopped after)
  6. The whole service stack: `live_service` (module; base URL of web + worker + its own Redis)
  7. Queueing like the web, without it: `queue` (a fixtures.Queue on the test's Redis)
  8. The web API for tests/test_web_*.py: `speech`, `clip` (module); `serve` (factory), `live` (a
     web_helpers.Live on a real server); `app_client` (a web_helpers.AppClient: Flask's test client)

Helper classes and paths live in tests/fixtures.py (imported as `fixtures`: tests/ is on sys.path
because it has no __init__.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from fixtures import SPEECH_20S, Queue, RedisServer, WorkerProcess, stop_all, worker_environment

from personaplex.jobs import JobStore
from personaplex.settings import Settings
from personaplex.storage import FsBlobStore

if TYPE_CHECKING:
    import numpy as np
    from web_helpers import AppClient, Live

    from web.server_thread import ServerThread

# -- 0. Skips: counted always, refused in CI -------------------------------------------------------
# A skip is only for an optional tool missing on a developer's machine; in CI every tool is
# installed, so a skip there hides a test that could have run.


def _skipped(config: pytest.Config) -> int:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return len(reporter.stats.get("skipped", [])) if reporter is not None else 0


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    terminalreporter.write_line(f"skipped tests: {_skipped(config)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and exitstatus == 0 and _skipped(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(
            f"\nCI allows no skipped test: {_skipped(session.config)} skipped (the short test summary gives each reason)"
        )


# -- 1. Redis ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session. Tests may stop() it; `redis_client` restarts it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a running, empty database (the server is restarted if a previous test stopped it)."""
    redis_server.start()
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


# -- 2. Settings and stores ----------------------------------------------------------------------


@pytest.fixture
def settings(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> Settings:
    """Settings pointing at the private Redis and a per-test data dir; no other env is read."""
    return Settings.from_env({}, redis_url=redis_server.url, data_dir=tmp_path / "data")


@pytest.fixture
def job_store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, retention_s=3600.0)


@pytest.fixture
def blob_store(tmp_path: Path) -> FsBlobStore:
    return FsBlobStore(tmp_path / "blobs")


@pytest.fixture
def start_web(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[..., ServerThread]]:
    """start_web(**settings_overrides) -> the real web server in a thread on the private Redis (flushed
    for the test; data in tmp_path/data); every server started is stopped after the test."""
    from web.app import create_app
    from web.server_thread import ServerThread

    servers: list[ServerThread] = []

    def start(**overrides: object) -> ServerThread:
        config = {"redis_url": redis_server.url, "data_dir": tmp_path / "data", **overrides}
        servers.append(ServerThread(create_app(config, environ={})).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


# -- 3. Engine on the tiny model (owned by the engine tests) ----------------------------------------
# torch and the engine are imported inside the fixtures, so tests that never use them stay fast.


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint (personaplex.engine.tiny, seed 0) in the real hub layout, written once."""
    from personaplex.engine.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def torch_single_thread() -> Iterator[None]:
    """One torch thread: tiny models gain nothing from more, and on a busy 2-core machine spinning
    intra-op threads make each job several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path, torch_single_thread: None):
    """One CPU Engine on the tiny checkpoint, loaded once for the session. Tests must not offload it."""
    from personaplex.engine.core import Engine

    engine = Engine(tiny_checkpoint, device="cpu")
    engine.load()
    return engine


# -- 4. Audio ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def speech_wav() -> Path:
    """20 s of real English speech (tests/data/recordings)."""
    return SPEECH_20S


# -- 5. Workers ----------------------------------------------------------------------------------


@pytest.fixture
def worker_env(settings: Settings, tiny_checkpoint: Path) -> dict[str, str]:
    """Environment for a worker subprocess on the private Redis, the tiny model and the CPU."""
    return worker_environment(settings, tiny_checkpoint)


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """start_worker(name="gpu0", queues=None, **env_overrides) -> a ready WorkerProcess; all are stopped
    afterwards. `queues`: consume these (celery -Q) instead of the default queue.

    On failure the workers' logs are printed, since that is where a worker's traceback goes.
    """
    started: list[WorkerProcess] = []

    def start(name: str = "gpu0", queues: str | None = None, **env: str) -> WorkerProcess:
        args = ("-Q", queues) if queues else ()
        worker = WorkerProcess(name, {**worker_env, **env}, tmp_path / "logs", args).start()
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    stop_all(started)
    for worker in started:
        print(f"----- log of worker {worker.hostname} -----\n{worker.log()}")


# -- 6. The whole service stack, once per module (owned by the MCP tests) -------------------------


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[str]:
    """Base URL of the real stack: its own redis-server, a worker subprocess on the tiny model, the web
    server. Private to the module (other tests' flushes never reach it); the worker's log is printed
    at teardown."""
    from fixtures import WorkerProcess, tiny_service_env

    from web import create_app
    from web.server_thread import ServerThread

    root = tmp_path_factory.mktemp("live-service")
    redis_server = RedisServer(root / "redis")
    redis_server.start()
    env = tiny_service_env(redis_server.url, tiny_checkpoint, root / "data")
    worker = WorkerProcess("live", env, root / "logs").start()
    try:
        app = create_app({"redis_url": redis_server.url, "data_dir": root / "data"}, environ={})
        with ServerThread(app) as server:
            worker.wait_ready()
            yield server.url
    finally:
        worker.stop()
        redis_server.stop()
        print(f"----- log of worker {worker.hostname} -----\n{worker.log()}")


# -- 7. Queueing like the web, without it ---------------------------------------------------------


@pytest.fixture
def queue(settings: Settings, redis_client: redis.Redis) -> Iterator[Queue]:
    q = Queue(settings, redis_client)
    yield q
    q.app.close()


# -- 8. The web API for tests/test_web_*.py (helpers in tests/web_helpers.py) ----------------------
# Small limits by default (web_helpers.SMALL_LIMITS). Modules that define their own `speech`, `clip`
# or `serve` keep theirs: a module's fixture wins over these.


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """20 s of real speech (`speech_wav`), decoded: 24 kHz float samples."""
    from personaplex.audio import load

    return load(SPEECH_20S)


@pytest.fixture(scope="module")
def clip(speech: np.ndarray) -> bytes:
    """Two seconds of real speech as a 16-bit WAV."""
    from personaplex.audio import encode_wav

    return encode_wav(speech[: 2 * 24000], 24000, subtype="PCM_16")


@pytest.fixture
def serve(
    start_web: Callable[..., ServerThread], redis_client: redis.Redis, tmp_path: Path
) -> Callable[..., Live]:
    """serve(**settings_overrides) -> a Live on a real server (small limits by default); stopped after
    the test."""
    from web_helpers import SMALL_LIMITS, Live

    def start(**overrides: object) -> Live:
        return Live(start_web(**{**SMALL_LIMITS, **overrides}), tmp_path / "data", redis_client)

    return start


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    """A Live on a real server with the default small limits."""
    return serve()


@pytest.fixture
def app_client(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> AppClient:
    """The app (small limits, the private Redis flushed, data in tmp_path/data) through Flask's test
    client: no server and no socket, for tests of one request's validation or error answer."""
    from web_helpers import SMALL_LIMITS, AppClient

    from web.app import create_app

    config = {"redis_url": redis_server.url, "data_dir": tmp_path / "data", **SMALL_LIMITS}
    return AppClient(create_app(config, environ={}), tmp_path / "data", redis_client)

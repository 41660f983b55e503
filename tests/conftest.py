"""Shared fixtures. Real parts only: a private redis-server, real worker processes, the tiny model.

Sections (add new fixtures to the section they belong to, or start a new one):
  1. Redis: `redis_server` (session; .url, .stop(), .start()), `redis_client` (flushed per test)
  2. Settings and stores: `settings`, `job_store`, `blob_store`

Helper classes and paths live in tests/fixtures.py (imported as `fixtures`: tests/ is on sys.path
because it has no __init__.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# The repository is not installed in the venv: make `personaplex`, `worker` and `web` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures import RedisServer  # noqa: E402

from personaplex.jobs import JobStore
from personaplex.settings import Settings
from personaplex.storage import FsBlobStore

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

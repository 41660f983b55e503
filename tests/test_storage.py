"""Blob stores: the same behaviour from the filesystem store and the Redis store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from personaplex.jobs import Job, JobStore, new_job_id
from personaplex.settings import Settings
from personaplex.storage import (
    INPUT,
    OUTPUT_JSON,
    OUTPUT_WAV,
    BlobStore,
    FsBlobStore,
    RedisBlobStore,
    delete_expired,
    open_blob_store,
    outputs_complete,
)


@pytest.fixture(params=["fs", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path, redis_client: redis.Redis) -> BlobStore:
    if request.param == "fs":
        return FsBlobStore(tmp_path)
    return RedisBlobStore(redis_client, ttl_s=60)


def test_put_get_exists_delete(store: BlobStore) -> None:
    job_id = new_job_id()
    assert not store.exists(job_id, INPUT)
    store.put(job_id, INPUT, b"RIFF....")
    store.put(job_id, OUTPUT_WAV, b"\x00" * 1000)
    assert store.exists(job_id, INPUT)
    assert store.get(job_id, INPUT) == b"RIFF...."
    store.put(job_id, INPUT, b"new")
    assert store.get(job_id, INPUT) == b"new"
    store.delete(job_id)
    assert not store.exists(job_id, INPUT) and not store.exists(job_id, OUTPUT_WAV)
    store.delete(job_id)  # deleting twice is fine


def test_missing_blob_raises_file_not_found(store: BlobStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.get(new_job_id(), OUTPUT_JSON)


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "", ".hidden", "x..y", "IN PUT", "output.wav/..", "other.bin"]
)
def test_bad_names_are_refused(store: BlobStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.put(new_job_id(), name, b"x")


@pytest.mark.parametrize("job_id", ["../../etc", "0" * 31, "Z" * 32])
def test_bad_ids_are_refused(store: BlobStore, job_id: str) -> None:
    with pytest.raises(ValueError):
        store.exists(job_id, INPUT)


def test_jobs_do_not_share_blobs(store: BlobStore) -> None:
    a, b = new_job_id(), new_job_id()
    store.put(a, INPUT, b"a")
    store.put(b, INPUT, b"b")
    store.delete(a)
    assert store.get(b, INPUT) == b"b"


def test_fs_layout(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path)
    job_id = new_job_id()
    store.put(job_id, OUTPUT_WAV, b"w")
    assert (tmp_path / "jobs" / job_id / "output.wav").read_bytes() == b"w"
    assert [p.name for p in (tmp_path / "jobs" / job_id).iterdir()] == ["output.wav"]  # no temp files


def test_redis_blobs_expire(redis_client: redis.Redis) -> None:
    store = RedisBlobStore(redis_client, ttl_s=1)
    job_id = new_job_id()
    store.put(job_id, INPUT, b"x")
    assert 0 < redis_client.pttl(f"personaplex:blob:{job_id}:input") <= 1000
    time.sleep(1.1)
    assert not store.exists(job_id, INPUT)


def test_open_blob_store_follows_settings(settings: Settings, redis_client: redis.Redis) -> None:
    fs = open_blob_store(settings, redis_client)
    assert isinstance(fs, FsBlobStore) and fs.root == settings.data_dir
    rs = open_blob_store(Settings.from_env({}, blob_store="redis", retention_hours=2), redis_client)
    assert isinstance(rs, RedisBlobStore) and rs.ttl_s == 7200


def test_outputs_complete(store: BlobStore) -> None:
    job_id = new_job_id()
    store.put(job_id, OUTPUT_WAV, b"w")
    assert not outputs_complete(store, job_id)
    store.put(job_id, OUTPUT_JSON, b"{}")
    assert outputs_complete(store, job_id)


def test_delete_expired_removes_blobs_of_expired_jobs(store: BlobStore, job_store: JobStore) -> None:
    job = job_store.create(Job())
    store.put(job.id, INPUT, b"x")
    job_store.mark_running(job.id, "w")
    job_store.mark_succeeded(job.id, {})
    assert delete_expired(job_store, store) == []
    assert store.exists(job.id, INPUT)
    assert delete_expired(job_store, store, now=time.time() + 3601) == [job.id]
    assert not store.exists(job.id, INPUT)

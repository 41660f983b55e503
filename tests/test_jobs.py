"""Job records against a real private redis-server: transitions, events, listing and retention."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from fixtures import collect_events, wait_until

from personaplex.jobs import (
    Fence,
    Job,
    JobStatus,
    JobStore,
    Keys,
    LeaseLost,
    QueueFullError,
    WorkerRegistry,
    check_job_id,
    is_valid_job_id,
    new_job_id,
)
from personaplex.params import GenerationParams


def make_job(store: JobStore, **fields: object) -> Job:
    job = Job(params=GenerationParams().to_dict(), input_name="talk.wav", input_duration_s=2.0, **fields)
    return store.create(job)


def test_create_many_writes_every_job_or_none(job_store: JobStore) -> None:
    make_job(job_store)
    pair = [Job(params=GenerationParams().to_dict()) for _ in range(2)]
    with pytest.raises(QueueFullError) as full:
        job_store.create_many(pair, queue_limit=2)
    assert (full.value.queued, full.value.incoming, full.value.limit) == (1, 2, 2)
    assert job_store.get_many(j.id for j in pair) == [] and job_store.queue_length() == 1
    job_store.create_many(pair, queue_limit=3)
    assert job_store.queue_length() == 3
    assert {j.id for j in pair} <= {j.id for j in job_store.list_recent(status="queued")}


@pytest.fixture
def events(redis_client: redis.Redis) -> Iterator[list[dict]]:
    """Every event published on any job channel while the test runs, in order."""
    yield from collect_events(redis_client)


# -- ids and keys ----------------------------------------------------------------------------


def test_ids_are_uuid4_hex() -> None:
    job_id = new_job_id()
    assert is_valid_job_id(job_id) and len(job_id) == 32


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "A" * 32, "0" * 31, "0" * 33, None, "0" * 31 + "/"])
def test_bad_ids_never_become_keys(bad: object, job_store: JobStore) -> None:
    assert not is_valid_job_id(bad)
    with pytest.raises(ValueError):
        check_job_id(bad)
    with pytest.raises(ValueError):
        Keys.job(bad)  # type: ignore[arg-type]
    assert job_store.get(bad) is None  # type: ignore[arg-type]
    assert job_store.mark_failed(bad, "x") is False  # type: ignore[arg-type]
    assert job_store.cancel_requested(bad) is False  # type: ignore[arg-type]


def test_keys_share_one_prefix() -> None:
    job_id = new_job_id()
    assert Keys.job(job_id) == f"personaplex:job:{job_id}"
    assert Keys.cancel(job_id) == f"personaplex:job:{job_id}:cancel"
    assert Keys.events(job_id) == f"personaplex:events:{job_id}"
    assert Keys.worker("gpu0@host") == "personaplex:worker:gpu0@host"
    assert Keys.INDEX == "personaplex:jobs"


# -- records ---------------------------------------------------------------------------------


def test_status_is_final() -> None:
    assert [s.value for s in JobStatus if s.is_final] == ["succeeded", "failed", "cancelled"]
    assert JobStatus("queued") is JobStatus.QUEUED


def test_job_round_trips_through_dict_and_redis(job_store: JobStore) -> None:
    job = make_job(job_store, batch_id="b1")
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    stored = job_store.get(job.id)
    assert stored == job
    assert stored.status is JobStatus.QUEUED and stored.progress == {} and stored.attempts == 0


def test_unknown_job_is_none(job_store: JobStore) -> None:
    assert job_store.get(new_job_id()) is None
    assert job_store.mark_running(new_job_id(), "w") is None
    assert job_store.mark_failed(new_job_id(), "x") is False  # an expired job stays gone


# -- transitions -----------------------------------------------------------------------------


def test_lifecycle_success(job_store: JobStore, events: list[dict]) -> None:
    job = make_job(job_store)
    running = job_store.mark_running(job.id, "gpu0@h")
    assert running.status is JobStatus.RUNNING and running.attempts == 1 and running.worker == "gpu0@h"
    assert running.started_at >= job.created_at
    assert job_store.set_progress(job.id, "generate", 5, 10)
    assert job_store.get(job.id).progress == {"phase": "generate", "done": 5, "total": 10}
    assert job_store.mark_succeeded(job.id, {"text": "hi", "duration_s": 2.0})
    done = job_store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.result["text"] == "hi" and done.finished_at
    wait_until(lambda: len(events) >= 4, 5, what="four events")
    assert [e["type"] for e in events] == ["queued", "started", "progress", "succeeded"]
    assert all(e["job_id"] == job.id for e in events)
    assert events[2]["done"] == 5 and events[3]["result"]["text"] == "hi"


def test_redelivery_counts_attempts(job_store: JobStore) -> None:
    job = make_job(job_store)
    job_store.mark_running(job.id, "a")
    again = job_store.mark_running(job.id, "b")
    assert again.attempts == 2 and again.worker == "b"


def test_final_jobs_do_not_change(job_store: JobStore) -> None:
    job = make_job(job_store)
    job_store.mark_running(job.id, "a")
    assert job_store.mark_failed(job.id, "boom")
    assert not job_store.mark_succeeded(job.id, {})
    assert not job_store.mark_cancelled(job.id)
    assert not job_store.set_progress(job.id, "generate", 1, 2)
    after = job_store.mark_running(job.id, "b")
    assert after.status is JobStatus.FAILED and after.attempts == 1 and after.error == "boom"


def test_final_job_gets_retention_ttl(job_store: JobStore, redis_client: redis.Redis) -> None:
    job = make_job(job_store)
    assert redis_client.ttl(Keys.job(job.id)) == -1
    job_store.mark_running(job.id, "a")
    job_store.mark_succeeded(job.id, {})
    assert 3590 <= redis_client.ttl(Keys.job(job.id)) <= 3600


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_queued_job_is_immediate(job_store: JobStore, events: list[dict]) -> None:
    job = make_job(job_store)
    cancelled = job_store.request_cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert job_store.cancel_requested(job.id)
    assert job_store.mark_running(job.id, "w").status is JobStatus.CANCELLED
    wait_until(lambda: events and events[-1]["type"] == "cancelled", 5, what="the cancelled event")


def test_cancel_running_job_sets_the_flag_only(job_store: JobStore) -> None:
    job = make_job(job_store)
    job_store.mark_running(job.id, "w")
    assert not job_store.cancel_requested(job.id)
    assert job_store.request_cancel(job.id).status is JobStatus.RUNNING
    assert job_store.cancel_requested(job.id)
    assert job_store.mark_cancelled(job.id)
    assert job_store.get(job.id).status is JobStatus.CANCELLED


def test_cancel_final_or_missing_job(job_store: JobStore) -> None:
    assert job_store.request_cancel(new_job_id()) is None
    job = make_job(job_store)
    job_store.mark_running(job.id, "w")
    job_store.mark_succeeded(job.id, {})
    assert job_store.request_cancel(job.id).status is JobStatus.SUCCEEDED
    assert not job_store.cancel_requested(job.id)


# -- listing, queue length, retention -----------------------------------------------------------


def test_list_recent_newest_first_and_by_status(job_store: JobStore) -> None:
    jobs = [make_job(job_store, created_at=1000.0 + i) for i in range(5)]
    job_store.mark_running(jobs[1].id, "w")
    job_store.mark_failed(jobs[1].id, "x")
    assert [j.id for j in job_store.list_recent()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in job_store.list_recent(limit=2)] == [jobs[4].id, jobs[3].id]
    assert [j.id for j in job_store.list_recent(status="failed")] == [jobs[1].id]
    assert len(job_store.list_recent(status=JobStatus.QUEUED, limit=3)) == 3


def test_queue_length_counts_queued_only(job_store: JobStore) -> None:
    jobs = [make_job(job_store) for _ in range(3)]
    assert job_store.queue_length() == 3
    job_store.mark_running(jobs[0].id, "w")
    job_store.request_cancel(jobs[1].id)
    assert job_store.queue_length() == 1


def test_expire_old_returns_each_id_once(job_store: JobStore, redis_client: redis.Redis) -> None:
    old, fresh = make_job(job_store), make_job(job_store)
    for job in (old, fresh):
        job_store.mark_running(job.id, "w")
        job_store.mark_succeeded(job.id, {})
    assert job_store.expire_old() == []
    now = time.time() + 3601
    assert sorted(job_store.expire_old(now=now)) == sorted([old.id, fresh.id])
    assert job_store.expire_old(now=now) == []
    assert job_store.get(old.id) is None and job_store.list_recent() == []
    assert not redis_client.exists(Keys.job(old.id))


# -- worker heartbeats --------------------------------------------------------------------------


def test_heartbeats_expire(redis_client: redis.Redis) -> None:
    registry = WorkerRegistry(redis_client)
    registry.beat("gpu0@a", {"model_loaded": False}, ttl_s=2.0)
    registry.beat("gpu1@a", {"model_loaded": True}, ttl_s=30)
    live = registry.live()
    assert [w["worker"] for w in live] == ["gpu0@a", "gpu1@a"] and live[1]["model_loaded"] is True
    wait_until(lambda: [w["worker"] for w in registry.live()] == ["gpu1@a"], 5, what="gpu0's beat to expire")
    assert redis_client.smembers(Keys.WORKERS) == {b"gpu1@a"}  # the expired name was pruned
    registry.forget("gpu1@a")
    assert registry.live() == [] and not redis_client.exists(Keys.WORKERS)


# -- run leases ---------------------------------------------------------------------------------


def test_lease_has_one_owner_and_expires(job_store: JobStore) -> None:
    job = make_job(job_store)
    assert job_store.acquire_lease(job.id, "a", ttl_s=1.0)
    assert not job_store.acquire_lease(job.id, "b", ttl_s=1.0)
    assert job_store.lease_owner(job.id) == "a"
    assert not job_store.refresh_lease(job.id, "b", ttl_s=5)
    assert not job_store.release_lease(job.id, "b")
    wait_until(lambda: job_store.lease_owner(job.id) is None, 5, what="the lease to expire")
    assert job_store.acquire_lease(job.id, "b", ttl_s=1.0)
    assert job_store.refresh_lease(job.id, "b", ttl_s=30)
    time.sleep(1.2)  # past the first TTL: only the refresh keeps it
    assert job_store.lease_owner(job.id) == "b"
    assert job_store.release_lease(job.id, "b")
    assert job_store.lease_owner(job.id) is None
    assert job_store.acquire_lease(job.id, "b", ttl_s=1.0)
    assert job_store.refresh_lease(job.id, "b", ttl_s=5)
    time.sleep(1.2)
    assert job_store.lease_owner(job.id) == "b"
    assert job_store.release_lease(job.id, "b")
    assert job_store.lease_owner(job.id) is None


# -- fences, recovery and the outbox -----------------------------------------------------------------


def start_attempt(store: JobStore, job: Job, owner: str, ttl_s: float = 30.0) -> Fence:
    """What a worker does to start a job: take its lease, then count the attempt."""
    assert store.acquire_lease(job.id, owner, ttl_s)
    return Fence(owner, store.mark_running(job.id, owner).attempts)


def test_a_fenced_write_needs_the_lease_and_the_attempt(
    job_store: JobStore, redis_client: redis.Redis
) -> None:
    job = make_job(job_store)
    stale = start_attempt(job_store, job, "w1", ttl_s=0.2)
    wait_until(lambda: job_store.lease_owner(job.id) is None, 5, what="w1's lease to expire")
    fresh = start_attempt(job_store, job, "w2")  # a second delivery took the job over
    assert fresh.attempt == 2

    assert not job_store.set_progress(job.id, "generate", 1, 9, fence=stale)
    with pytest.raises(LeaseLost):
        job_store.mark_succeeded(job.id, {"text": "stale", "attempt": 1}, fence=stale)
    with pytest.raises(LeaseLost):  # the lease alone is not enough: the attempt must match too
        job_store.mark_failed(job.id, "stale", fence=Fence("w2", 1))
    assert job_store.get(job.id).status is JobStatus.RUNNING

    assert job_store.set_progress(job.id, "generate", 1, 9, fence=fresh)
    assert job_store.mark_succeeded(job.id, {"text": "fresh", "attempt": 2}, fence=fresh)
    done = job_store.get(job.id)
    assert (done.status, done.result["text"], done.attempts) == (JobStatus.SUCCEEDED, "fresh", 2)
    assert redis_client.zscore(Keys.RUNNING, job.id) is None  # off the running index once final


def test_a_lease_that_vanished_is_taken_back_only_while_the_attempt_still_runs(
    job_store: JobStore, redis_client: redis.Redis
) -> None:
    job = make_job(job_store)
    fence = start_attempt(job_store, job, "w1")
    redis_client.delete(Keys.lease(job.id))  # as if it expired while Redis was unreachable
    assert not job_store.refresh_lease(job.id, "w1", 30)  # without the attempt: no take-back
    assert job_store.refresh_lease(job.id, "w1", 30, attempt=fence.attempt)
    assert job_store.lease_owner(job.id) == "w1"

    redis_client.delete(Keys.lease(job.id))
    assert job_store.recover_stalled() == [job.id]  # a sweeper saw it first: queued again
    assert not job_store.refresh_lease(job.id, "w1", 30, attempt=fence.attempt)
    assert job_store.lease_owner(job.id) is None


def test_recover_stalled_queues_again_only_running_jobs_without_a_lease(
    job_store: JobStore, redis_client: redis.Redis, events: list[dict]
) -> None:
    alive, dead, finished = (make_job(job_store) for _ in range(3))
    start_attempt(job_store, alive, "w1")
    start_attempt(job_store, dead, "w2", ttl_s=0.2)
    start_attempt(job_store, finished, "w1")
    job_store.mark_succeeded(finished.id, {"attempt": 1})
    job_store.mark_dispatched(alive.id, dead.id, finished.id)
    wait_until(lambda: job_store.lease_owner(dead.id) is None, 5, what="w2's lease to expire")

    assert job_store.recover_stalled() == [dead.id]
    requeued = job_store.get(dead.id)
    assert (requeued.status, requeued.attempts, requeued.progress) == (JobStatus.QUEUED, 1, {})
    assert "w2" in requeued.note and "attempt 2" in requeued.note
    assert job_store.queued_ids(10) == [dead.id] and job_store.queue_length() == 1
    assert job_store.due_for_dispatch() == [dead.id]  # its message is due at once
    assert job_store.get(alive.id).status is JobStatus.RUNNING
    assert job_store.recover_stalled() == []  # nothing twice
    assert redis_client.zrange(Keys.RUNNING, 0, -1) == [alive.id.encode()]
    wait_until(lambda: any(e["type"] == "requeued" for e in events), 5, what="the requeued event")
    assert job_store.mark_running(dead.id, "w1").attempts == 2  # the next start is attempt 2


def test_the_outbox_hands_out_unsent_queued_jobs_after_the_grace(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, dispatch_grace_s=0.3)
    sent, unsent, cancelled = (make_job(store) for _ in range(3))
    store.mark_dispatched(sent.id)
    store.request_cancel(cancelled.id)
    assert store.due_for_dispatch() == []  # within the grace: the web may still be sending them
    time.sleep(0.4)
    assert store.due_for_dispatch() == [unsent.id]
    assert store.due_for_dispatch() == []  # handed out once per grace, even to several sweepers
    time.sleep(0.4)
    assert store.due_for_dispatch() == [unsent.id]  # not marked sent: due again
    store.mark_dispatched(unsent.id)
    time.sleep(0.4)
    assert store.due_for_dispatch() == []
    assert redis_client.zcard(Keys.OUTBOX) == 0  # the cancelled job's entry was dropped too

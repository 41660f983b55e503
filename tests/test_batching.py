"""Batched jobs: `Engine.process_batch` on the tiny model (CPU, fp32), then batching in the worker.

Engine: each job of a batch gets exactly the tokens `Engine.process` gives it alone (greedy and
seeded, different lengths, prompts and voices), whatever it is batched with; a job that cannot start
fails alone; a cancelled row drops out without disturbing the others; progress is per job; batches
respect PERSONAPLEX_MAX_BATCH and PERSONAPLEX_MAX_BATCH_FRAMES.

Worker (real `celery` subprocesses, see README.md, "Batched jobs on a GPU worker"): jobs waiting in the queue are claimed
into the running delivery's batch through their records; their own messages, delivered elsewhere
while the batch runs, come back later (that worker runs other jobs meanwhile) and, once the jobs are
final, are acked without running again; a claimed job can be cancelled; a worker killed
mid-batch has every job of its batch redelivered and finished once by the survivor.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import redis
from fixtures import (
    SPEECH_40S,
    Queue,
    WorkerProcess,
    collect_events,
    deliveries,
    runs,
    speech_clip,
    wait_for_job,
    wait_until,
)

from personaplex import audio as audio_io
from personaplex.engine.batching import BatchRequest, plan_groups
from personaplex.engine.core import Engine
from personaplex.errors import AudioError, CancelledError, UnknownVoiceError
from personaplex.jobs import Job, JobStatus
from personaplex.params import SAMPLE_RATE, EngineResult, GenerationParams
from personaplex.settings import Settings
from worker.control import query_gpu_status

PROMPT = "You enjoy having a good conversation."


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return audio_io.load(SPEECH_40S, SAMPLE_RATE)


def clip(speech: np.ndarray, start: float, seconds: float) -> bytes:
    return audio_io.encode_wav(speech[int(start * SAMPLE_RATE) : int((start + seconds) * SAMPLE_RATE)])


def mixed_jobs(speech: np.ndarray, greedy: bool) -> list[tuple[bytes, GenerationParams]]:
    """Four jobs of different lengths, prompts, voices and sampling settings."""
    jobs = [
        (clip(speech, 0, 2.5), GenerationParams(voice_prompt="NATF2.pt", text_prompt=PROMPT, seed=1)),
        (clip(speech, 1, 1.2), GenerationParams(voice_prompt="NATM1.pt", text_prompt="", seed=2)),
        (clip(speech, 5, 0.7), GenerationParams(voice_prompt="VARF1.pt", text_prompt="Hi.", seed=3)),
        (
            clip(speech, 2, 3.1),
            GenerationParams(voice_prompt="VARM4.pt", text_prompt=PROMPT, seed=4, topk_text=3, topk_audio=9),
        ),
    ]
    if greedy:
        jobs = [(a, GenerationParams.from_dict({**p.to_dict(), "greedy": True})) for a, p in jobs]
    return jobs


# ---- the engine -----------------------------------------------------------------------------------
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_each_job_of_a_batch_equals_the_job_alone(
    tiny_engine: Engine, speech: np.ndarray, greedy: bool
) -> None:
    jobs = mixed_jobs(speech, greedy)
    batched = tiny_engine.process_batch([BatchRequest(a, p) for a, p in jobs])
    assert len({len(r.tokens) for r in batched}) == len(jobs)  # every job has its own length
    for (audio, params), got in zip(jobs, batched, strict=True):
        assert isinstance(got, EngineResult)
        alone = tiny_engine.process(audio, params)
        assert got.tokens == alone.tokens
        assert got.text_frames == alone.text_frames
        assert np.abs(got.audio - alone.audio).max() <= 1e-5
        assert got.timings.generate_s > 0 and got.timings.total_s >= got.timings.generate_s


def test_a_batch_of_four_equals_each_job_alone(tiny_engine: Engine) -> None:
    """A case that a batch of four once got wrong (its second job's tokens changed at frame 12: the
    CPU's GEMM summed that row differently with four rows than with one)."""
    chance = random.Random(12)
    jobs = [
        (speech_clip(chance.uniform(0.5, 6.0)), GenerationParams(seed=10 + i, greedy=i == 0))
        for i in range(4)
    ]
    batched = tiny_engine.process_batch([BatchRequest(a, p) for a, p in jobs])
    for (audio, params), got in zip(jobs, batched, strict=True):
        assert isinstance(got, EngineResult) and got.tokens == tiny_engine.process(audio, params).tokens


def test_a_seed_gives_the_same_tokens_whatever_it_is_batched_with(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    jobs = mixed_jobs(speech, greedy=False)
    first = tiny_engine.process_batch([BatchRequest(a, p) for a, p in jobs])
    other_company = [(clip(speech, 9, 2.0), GenerationParams(seed=99)), *reversed(jobs[1:])]
    second = tiny_engine.process_batch([BatchRequest(a, p) for a, p in other_company])
    assert [r.tokens for r in second[1:]] == [r.tokens for r in reversed(first[1:])]


def test_a_job_that_cannot_start_fails_alone(tiny_engine: Engine, speech: np.ndarray) -> None:
    good = clip(speech, 0, 1.0)
    params = GenerationParams(greedy=True)
    done: list[tuple[int, object]] = []
    requests = [
        BatchRequest(b"not a wav", params),
        BatchRequest(good, params, on_done=lambda r: done.append((1, r))),
        BatchRequest(good, GenerationParams(voice_prompt="NOPE.pt")),
    ]
    bad_audio, result, bad_voice = tiny_engine.process_batch(requests)
    assert isinstance(bad_audio, AudioError) and isinstance(bad_voice, UnknownVoiceError)
    assert result.tokens == tiny_engine.process(good, params).tokens
    assert done == [(1, result)]


class CancelAt:
    """should_cancel: True once the job's progress has reached generate frame `frame`."""

    def __init__(self, frame: int) -> None:
        self.frame = frame
        self.seen: list[tuple[str, int, int]] = []

    def progress(self, phase: str, done: int, total: int) -> None:
        self.seen.append((phase, done, total))

    def __call__(self) -> bool:
        return any(phase == "generate" and done >= self.frame for phase, done, _ in self.seen)


def test_a_cancelled_row_drops_out_and_the_others_go_on(tiny_engine: Engine, speech: np.ndarray) -> None:
    jobs = mixed_jobs(speech, greedy=False)
    cancel = CancelAt(frame=10)
    ended: list[int] = []
    requests = [BatchRequest(a, p, on_done=lambda r, i=i: ended.append(i)) for i, (a, p) in enumerate(jobs)]
    requests[3].progress, requests[3].should_cancel = cancel.progress, cancel
    results = tiny_engine.process_batch(requests)
    assert isinstance(results[3], CancelledError) and "Cancelled at frame 11 of" in str(
        results[3]
    )  # seen at 10, checked next
    assert max(done for phase, done, _ in cancel.seen if phase == "generate") == 10  # no progress after
    for (audio, params), got in zip(jobs[:3], results[:3], strict=True):
        assert got.tokens == tiny_engine.process(audio, params).tokens
    assert ended.index(3) < ended.index(0)  # dropped at frame 10, before the 2.5 s job ends


def test_progress_is_per_job(tiny_engine: Engine, speech: np.ndarray) -> None:
    jobs = mixed_jobs(speech, greedy=True)[:3]
    seen: dict[int, list[tuple[str, int, int]]] = {i: [] for i in range(len(jobs))}
    requests = [
        BatchRequest(a, p, progress=lambda *event, i=i: seen[i].append(event))
        for i, (a, p) in enumerate(jobs)
    ]
    results = tiny_engine.process_batch(requests)
    for i, result in enumerate(results):
        phases = [phase for phase, _, _ in seen[i]]
        assert phases[0] == "load" and phases[-1] == "decode"
        assert [p for j, p in enumerate(phases) if j == 0 or p != phases[j - 1]] == [
            "load",
            "prompt",
            "generate",
            "decode",
        ]
        generate = [(done, total) for phase, done, total in seen[i] if phase == "generate"]
        assert {total for _, total in generate} == {result.frames}  # that job's own frames
        assert generate[-1] == (result.frames, result.frames)
        assert [done for done, _ in generate] == sorted(done for done, _ in generate)


def test_plan_groups_bounds_rows_and_frames() -> None:
    assert plan_groups([10, 30, 20], max_batch=8, max_frames=1000) == [[1, 2, 0]]
    assert plan_groups([10, 30, 20, 5], max_batch=2, max_frames=1000) == [[1, 2], [0, 3]]
    assert plan_groups([10, 30, 20], max_batch=8, max_frames=60) == [[1, 2], [0]]  # 2 x 30 rows fit
    assert plan_groups([100, 10], max_batch=8, max_frames=50) == [[0], [1]]  # too long: runs alone
    assert plan_groups([], max_batch=8, max_frames=50) == []


def test_batches_follow_the_limits_and_results_stay_the_same(
    tiny_engine: Engine, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from personaplex.engine import fast

    sizes: list[int] = []
    original = fast.FastLoop.load

    def record(self, plans):  # every batch loads its plans into a loop
        sizes.append(len(plans))
        return original(self, plans)

    monkeypatch.setattr(fast.FastLoop, "load", record)
    monkeypatch.setattr(tiny_engine, "max_batch", 2)
    jobs = mixed_jobs(speech, greedy=True)
    results = tiny_engine.process_batch([BatchRequest(a, p) for a, p in jobs])
    assert sizes == [2, 2]
    monkeypatch.setattr(tiny_engine, "max_batch", 8)
    monkeypatch.setattr(tiny_engine, "max_batch_frames", 1)  # every job over the cap: each alone
    sizes.clear()
    again = tiny_engine.process_batch([BatchRequest(a, p) for a, p in jobs])
    assert sizes == [1, 1, 1, 1]
    assert [r.tokens for r in again] == [r.tokens for r in results]


def test_settings_read_the_batch_limits() -> None:
    settings = Settings.from_env({"PERSONAPLEX_MAX_BATCH": "3", "PERSONAPLEX_MAX_BATCH_FRAMES": "5000"})
    assert (settings.max_batch, settings.max_batch_frames) == (3, 5000)
    assert (Settings().max_batch, Settings().max_batch_frames) == (8, 30000)
    with pytest.raises(ValueError, match="PERSONAPLEX_MAX_BATCH"):
        Settings.from_env({"PERSONAPLEX_MAX_BATCH": "0"})


# ---- continuous batches: jobs join a running loop ---------------------------------------------------
class ScriptedFeed:
    """A JobFeed whose jobs arrive at its takes: `arrivals[i]` is what the i-th take finds waiting."""

    def __init__(self, arrivals: list[list[BatchRequest]]) -> None:
        self.arrivals = arrivals
        self.takes: list[int] = []

    def due(self) -> bool:
        return bool(self.arrivals)

    def take(self, rows: int, max_frames: int | None = None) -> list[BatchRequest]:
        self.takes.append(rows)
        if not self.arrivals:
            return []
        waiting = self.arrivals.pop(0)
        if len(waiting) > rows and self.arrivals:
            self.arrivals[0] = waiting[rows:] + self.arrivals[0]
        elif len(waiting) > rows:
            self.arrivals.append(waiting[rows:])
        return waiting[:rows]


def finishing_order(jobs: list[tuple[bytes, GenerationParams]], order: list[int]) -> list[BatchRequest]:
    """Requests that append their index to `order`, and keep their result, when they end."""
    requests = []
    for index, (audio, params) in enumerate(jobs):
        request = BatchRequest(audio, params)

        def done(
            outcome: EngineResult | Exception, index: int = index, request: BatchRequest = request
        ) -> None:
            order.append(index)
            request.result = outcome  # type: ignore[attr-defined]

        request.on_done = done
        requests.append(request)
    return requests


def assert_same_as_alone(engine: Engine, audio: bytes, params: GenerationParams, got: object) -> None:
    """Bit for bit what the job gets alone in the same loop (a batch of one): the rows are computed
    independently. (The eager FrameLoop sums some attention terms in another order, ~1e-7 apart, so
    beside it a sampled token can flip on a near-tie; the golden tests hold every path to the
    reference.)"""
    assert isinstance(got, EngineResult), got
    [alone] = engine.process_batch([BatchRequest(audio, params)])
    assert isinstance(alone, EngineResult), alone
    assert got.tokens == alone.tokens and got.text_frames == alone.text_frames
    assert audio_io.encode_wav(got.audio) == audio_io.encode_wav(alone.audio)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_jobs_that_join_a_running_batch_equal_each_job_alone(
    tiny_engine: Engine, speech: np.ndarray, greedy: bool
) -> None:
    longest, *short = mixed_jobs(speech, greedy)[::-1]  # three shorter ones join the longest
    long = (clip(speech, 2, 8.0), longest[1])  # long enough to outlast their preparation (in wall time)
    order: list[int] = []
    first, *later = finishing_order([long, *short], order)
    feed = ScriptedFeed([[later[0]], [], [], [later[1], later[2]]])
    results = tiny_engine.process_batch([first], feed)
    assert isinstance(results[0], EngineResult) and sorted(order) == [0, 1, 2, 3]
    assert order[-1] == 0, "the long job started first and ends last: the others joined it"
    assert len(feed.takes) >= 4 and not feed.arrivals
    for (audio, params), request in zip([long, *short], [first, *later], strict=True):
        assert_same_as_alone(tiny_engine, audio, params, request.result)  # type: ignore[attr-defined]


def test_a_continuous_loop_has_room_for_what_its_rows_can_hold(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    """A loop started by a 0.7 s job has room for a 24 s one (the frame budget's share of each of
    its rows): the long job joins it at once instead of waiting for it to drain."""
    short = (clip(speech, 5, 0.7), GenerationParams(text_prompt="", seed=5))
    long = (clip(speech, 10, 24.0), GenerationParams(seed=6))
    order: list[int] = []
    requests = finishing_order([short, long], order)
    loops = []
    requests[0].progress = lambda phase, done, total: loops.append(tiny_engine._fast)
    tiny_engine.process_batch(requests[:1], ScriptedFeed([[requests[1]]]))
    loop = tiny_engine._fast
    assert loop is not None and loop.frames >= tiny_engine.row_room > 24 * 12.5
    assert loop.batch == tiny_engine.max_batch and order == [0, 1]
    assert loops[-1] is loop, "the long job needed a loop of its own"
    for (audio, params), request in zip([short, long], requests, strict=True):
        assert_same_as_alone(tiny_engine, audio, params, request.result)  # type: ignore[attr-defined]


@pytest.fixture
def small_rows(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame budget whose share per row is 256 frames (20.5 s): longer jobs need a bigger loop."""
    monkeypatch.setattr(tiny_engine, "max_batch_frames", tiny_engine.max_batch * 256)


@pytest.mark.usefixtures("small_rows")
def test_a_job_longer_than_the_running_loop_waits_for_it_to_drain(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    """Oldest first: the long job does not fit the loop sized for a short one, so nothing joins until
    that loop drains; the next loop is sized for it, and the job after it runs beside it."""
    short = (clip(speech, 5, 0.7), GenerationParams(text_prompt="", seed=5))
    long = (clip(speech, 10, 24.0), GenerationParams(seed=6))
    after = (clip(speech, 1, 1.0), GenerationParams(seed=7, greedy=True))
    order: list[int] = []
    requests = finishing_order([short, long, after], order)
    feed = ScriptedFeed([[requests[1], requests[2]]])
    tiny_engine.process_batch(requests[:1], feed)
    assert order == [0, 2, 1]
    assert tiny_engine._fast is not None and tiny_engine._fast.frames > 24 * 12.5
    for (audio, params), request in zip([short, long, after], requests, strict=True):
        assert_same_as_alone(tiny_engine, audio, params, request.result)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("small_rows")
def test_a_short_job_passes_a_held_one_when_it_ends_before_the_loop_drains(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    """Backfilling: the 24 s job does not fit the loop sized for an 8 s one and waits for the next
    loop; the 1 s job behind it ends before that loop drains anyway, so it joins at once (without
    delaying the held job) instead of waiting for the 8 s job to end."""
    running = (clip(speech, 3, 8.0), GenerationParams(seed=4))
    long = (clip(speech, 10, 24.0), GenerationParams(seed=6))
    short = (clip(speech, 21, 1.0), GenerationParams(seed=7))
    order: list[int] = []
    requests = finishing_order([running, long, short], order)
    feed = ScriptedFeed([[requests[1], requests[2]]])
    tiny_engine.process_batch(requests[:1], feed)
    assert order == [2, 0, 1]
    for (audio, params), request in zip([running, long, short], requests, strict=True):
        assert_same_as_alone(tiny_engine, audio, params, request.result)  # type: ignore[attr-defined]


def test_a_feed_that_fails_does_not_stop_the_running_rows(tiny_engine: Engine, speech: np.ndarray) -> None:
    class BrokenFeed(ScriptedFeed):
        def take(self, rows: int, max_frames: int | None = None) -> list[BatchRequest]:
            super().take(rows, max_frames)
            raise ConnectionError("the queue is unreachable")

    audio, params = clip(speech, 0, 1.5), GenerationParams(seed=8)
    feed = BrokenFeed([[], [], []])
    (result,) = tiny_engine.process_batch([BatchRequest(audio, params)], feed)
    assert len(feed.takes) >= 1
    assert_same_as_alone(tiny_engine, audio, params, result)


class SlowToPrepare:
    """should_cancel of a joining job whose preparation (its first check) takes until the running
    job has reported progress `reports` more times (one per PROGRESS_EVERY frames), or `timeout`
    seconds if it never does."""

    def __init__(self, running: list[int], reports: int, timeout: float = 30.0) -> None:
        self.running, self.reports, self.timeout = running, reports, timeout
        self.calls = 0
        self.moved_on: bool | None = None

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == 1:
            start = len(self.running)
            try:
                self.moved_on = bool(
                    wait_until(lambda: len(self.running) >= start + self.reports, self.timeout)
                )
            except TimeoutError:
                self.moved_on = False
        return False


def test_a_joining_job_is_prepared_while_the_running_rows_step_on(
    tiny_engine: Engine, speech: np.ndarray
) -> None:
    """Decoding, encoding and prefilling a joining job run beside the loop, not in it: the running
    row steps on meanwhile (on the loop's thread this would stall it until the timeout), and both
    results are still exactly what each job gets alone."""
    running = (clip(speech, 3, 8.0), GenerationParams(seed=4))
    joining = (clip(speech, 21, 1.5), GenerationParams(seed=7))
    order: list[int] = []
    first, later = finishing_order([running, joining], order)
    frames: list[int] = []
    first.progress = lambda phase, done, total: frames.append(done)
    slow = later.should_cancel = SlowToPrepare(frames, reports=4, timeout=20.0)
    tiny_engine.process_batch([first], ScriptedFeed([[], [later]]))
    assert slow.moved_on is True, "the running row stood still while the joining job was prepared"
    assert order == [1, 0], "the 1.5 s job joined the running 8 s one"
    for (audio, params), request in zip([running, joining], [first, later], strict=True):
        assert_same_as_alone(tiny_engine, audio, params, request.result)  # type: ignore[attr-defined]


# ---- the worker -----------------------------------------------------------------------------------
StartWorker = Callable[..., WorkerProcess]


def all_running_on(queue: Queue, jobs: list[Job], worker: WorkerProcess) -> Callable[[], bool]:
    def check() -> bool:
        records = queue.jobs.get_many([j.id for j in jobs])
        return all(r.status is JobStatus.RUNNING and r.worker == worker.hostname for r in records)

    return check


def test_three_queued_jobs_share_one_batch(
    start_worker: StartWorker, queue: Queue, redis_client: redis.Redis, tiny_engine: Engine
) -> None:
    inputs = [
        (speech_clip(2.0), GenerationParams(seed=1)),
        (speech_clip(3.0), GenerationParams(seed=2, text_prompt="Hi.")),
        (speech_clip(1.0), GenerationParams(voice_prompt="NATM1.pt", seed=3)),
    ]
    stream = collect_events(redis_client)
    events = next(stream)
    jobs = [queue.submit(audio, params) for audio, params in inputs]  # all wait: no worker yet
    worker = start_worker("gpu0")
    done = [wait_for_job(queue.jobs, job.id) for job in jobs]
    finals = {job.id for job in jobs}
    # Each final event is published beside its record's last write: wait for all of them.
    wait_until(lambda: finals <= {e["job_id"] for e in events if e["type"] == "succeeded"}, 5, what="events")
    next(stream, None)

    leader = done[0].result["engine_batch"]["leader"]
    for job, record, (audio, params) in zip(jobs, done, inputs, strict=True):
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert (record.attempts, record.worker) == (1, worker.hostname)
        assert record.result["engine_batch"] == {"leader": leader, "size": 3}
        alone = tiny_engine.process(audio, params)
        assert queue.tokens(job.id) == alone.tokens  # the batched job equals the job alone
        progress = [e for e in events if e["job_id"] == job.id and e["type"] == "progress"]
        generate = [(e["done"], e["total"]) for e in progress if e["phase"] == "generate"]
        assert generate[-1] == (alone.frames, alone.frames)  # its own frames, not the batch's
        assert {e["phase"] for e in progress} >= {"load", "prompt", "generate", "decode"}
    # One delivery ran the batch; the others' messages found their jobs final and were acked.
    for job in jobs:
        ran = job.id == leader
        wait_until(lambda job=job, ran=ran: deliveries(worker, job.id, ran=ran) == 1, 20, what="deliveries")
        assert deliveries(worker, job.id, ran=not ran) == 0


def test_a_claimed_job_is_left_to_its_batch_and_can_be_cancelled(
    start_worker: StartWorker, queue: Queue
) -> None:
    spare = start_worker("gpu1", queues="idle")  # consumes another queue until told otherwise
    # Long rows: the batch runs for seconds after the spare takes the claimed jobs' messages.
    jobs = [queue.submit(speech_clip(300.0), GenerationParams(seed=s)) for s in (1, 2, 3)]
    worker = start_worker("gpu0")
    wait_until(all_running_on(queue, jobs, worker), 30, what="the batch")
    status = query_gpu_status(queue.app, [worker.hostname], timeout=5.0)[worker.hostname]
    assert status["running_jobs"] == [j.id for j in jobs] and status["active_connections"] == 3
    queue.jobs.request_cancel(jobs[1].id)  # claimed and running: its row drops out
    late = queue.submit(speech_clip(1.0), GenerationParams(seed=4))  # queued behind the claimed ones
    queue.app.control.add_consumer("celery", destination=[spare.hostname], reply=True)

    # The spare receives the claimed jobs' messages first, leaves them to the batch (they come back
    # later) and runs the late job while the batch still runs: it does not wait on their leases.
    quick = wait_for_job(queue.jobs, late.id, timeout=60)
    # (the spare, or a row of the batch freed by the cancel: continuous batching takes queued jobs)
    assert quick.status is JobStatus.SUCCEEDED and quick.worker in (spare.hostname, worker.hostname)
    assert queue.jobs.get(jobs[0].id).status is JobStatus.RUNNING
    assert f"job {jobs[2].id} is being run by " in spare.log()  # left to the batch, not waited on

    done = {job.id: wait_for_job(queue.jobs, job.id, timeout=90) for job in jobs}
    assert done[jobs[1].id].status is JobStatus.CANCELLED
    for job in (jobs[0], jobs[2]):
        assert done[job.id].status is JobStatus.SUCCEEDED, done[job.id].error
        assert (done[job.id].attempts, done[job.id].worker) == (1, worker.hostname)

    # Their messages came back and were acked without running (on whichever worker was free).
    def acked() -> int:
        return sum(deliveries(w, j.id, ran=False) for w in (spare, worker) for j in jobs[1:])

    wait_until(lambda: acked() == 2, 30, what="acks")
    assert not any(deliveries(w, j.id, ran=True) for w in (spare, worker) for j in jobs[1:])


def test_a_batch_whose_worker_dies_is_finished_once_by_another(
    start_worker: StartWorker, queue: Queue
) -> None:
    env = {"PERSONAPLEX_VISIBILITY_TIMEOUT": "5"}
    spare = start_worker("gpu1", queues="idle", **env)
    jobs = [queue.submit(speech_clip(60.0), GenerationParams(seed=s)) for s in (1, 2, 3)]
    victim = start_worker("gpu0", **env)
    wait_until(all_running_on(queue, jobs, victim), 30, what="the batch")
    victim.kill()
    queue.app.control.add_consumer("celery", destination=[spare.hostname], reply=True)

    for job in jobs:
        done = wait_for_job(queue.jobs, job.id, timeout=90)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert (done.worker, done.attempts) == (spare.hostname, 2)  # claimed once, run once more
        wait_until(lambda job=job: runs(spare, job.id) > 0, 10, what="the run's log line")
        assert runs(spare, job.id) == 1

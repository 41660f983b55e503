"""web/api_jobs.py (with web/submit.py and web/validation.py behind it): submit, list, read, download
outputs, cancel.

Tests of one request's validation or error answer (a bad upload or parameter, an unknown voice, a
missing or huge file, unknown job ids) go through Flask's test client (`app_client`); the others run
against the real werkzeug server (`live`, `serve`) and play the worker's part through the real
JobStore and blob store, so no model is needed.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import soundfile
from fixtures import SPEECH_20S
from web_helpers import HEX_ID, AppClient, Live, finish_like_a_worker, queued

from personaplex.audio import load
from personaplex.jobs import Job, JobStatus
from personaplex.storage import INPUT

# -- submitting -----------------------------------------------------------------------------------


def test_submit_queues_stores_and_enqueues(live: Live, clip: bytes, redis_client: redis.Redis) -> None:
    response = live.submit(clip, name="../../etc/passwd.wav", voice_prompt="natm1", seed="7", greedy="true")
    assert response.status_code == 202
    body = response.json()
    job_id = body["job_id"]
    assert body["status"] == "queued"
    assert response.headers["Location"] == body["urls"]["self"] == f"/api/jobs/{job_id}"
    assert body["urls"]["events"] == f"/api/jobs/{job_id}/events"
    job = live.get(f"/api/jobs/{job_id}").json()
    assert job["input_name"] == "etc_passwd.wav"
    assert job["params"]["voice_prompt"] == "NATM1.pt"
    assert job["params"]["seed"] == 7 and job["params"]["greedy"] is True
    assert job["input_duration_s"] == pytest.approx(2.0)
    assert live.blobs.get(job_id, INPUT) == clip
    message = json.loads(redis_client.lindex("celery", 0))
    assert message["headers"]["id"] == job_id
    assert message["headers"]["task"] == "personaplex.process_audio"


@pytest.mark.parametrize("spelling", ["NATF0", "natf0", "NATF0.pt", " natf0.PT "])
def test_submit_accepts_every_voice_spelling_and_stores_the_legacy_id(
    live: Live, clip: bytes, spelling: str
) -> None:
    job_id = queued(live, clip, voice_prompt=spelling)
    assert live.get(f"/api/jobs/{job_id}").json()["params"]["voice_prompt"] == "NATF0.pt"


def test_unknown_voice_lists_the_legacy_ids(app_client: AppClient, clip: bytes) -> None:
    response = app_client.submit(clip, voice_prompt="NATF9")
    assert response.status_code == 400
    valid = response.json["valid_voices"]
    assert len(valid) == 18 and valid[0] == "NATF0.pt" and "NATF2.pt" in valid and valid[-1] == "VARM4.pt"


def _truncated(speech: bytes) -> bytes:
    return speech[: len(speech) // 2]


def _as_flac(clip: bytes) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, load(clip), 24000, format="FLAC")
    return buffer.getvalue()


BAD_UPLOADS = [
    ("not audio", lambda clip, long: b"this is not audio at all" * 10, {}, "decode"),
    ("empty", lambda clip, long: b"", {}, "empty"),
    ("truncated WAV", lambda clip, long: _truncated(clip), {}, "truncated"),
    ("truncated FLAC", lambda clip, long: _truncated(_as_flac(clip)), {}, "truncated"),
    ("too long", lambda clip, long: long, {}, "limit"),
    ("unknown voice", lambda clip, long: clip, {"voice_prompt": "NOPE9"}, "Unknown voice"),
    ("path in voice", lambda clip, long: clip, {"voice_prompt": "../../etc/passwd"}, "Unknown voice"),
    ("bad seed", lambda clip, long: clip, {"seed": "abc"}, "seed"),
    ("negative seed", lambda clip, long: clip, {"seed": "-7"}, "seed"),
    ("bad temperature", lambda clip, long: clip, {"temp_audio": "99"}, "temp_audio"),
    ("bad top-k", lambda clip, long: clip, {"topk_text": "0"}, "topk_text"),
    ("bad boolean", lambda clip, long: clip, {"greedy": "maybe"}, "greedy"),
]


@pytest.mark.parametrize(("case", "make", "fields", "needle"), BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_submit_rejects_bad_input(
    app_client: AppClient, clip: bytes, case: str, make: Callable, fields: dict, needle: str
) -> None:
    long = SPEECH_20S.read_bytes()  # 20 s > the 10 s limit, under the 1 MB upload limit
    response = app_client.submit(make(clip, long), **fields)
    assert response.status_code == 400, (case, response.text)
    assert needle.lower() in response.json["error"].lower()
    assert app_client.jobs.queue_length() == 0


def test_submit_without_file_and_huge_upload(app_client: AppClient) -> None:
    missing = app_client.post("/api/jobs", data={"seed": "1"})
    assert missing.status_code == 400 and "file" in missing.json["error"]
    huge = app_client.submit(b"\0" * (3 * 1024 * 1024))
    assert huge.status_code == 413
    assert "1 MB" in huge.json["error"]


def test_queue_full_answers_429_with_retry_after(serve: Callable[..., Live], clip: bytes) -> None:
    live = serve(max_queue=2)
    queued(live, clip)
    queued(live, clip)
    response = live.submit(clip)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["queue_length"] == 2


def test_the_queue_limit_holds_under_concurrent_submissions(serve: Callable[..., Live], clip: bytes) -> None:
    """Room is checked and the job written in one step: 16 requests at once cannot pass a limit of 3."""
    live = serve(max_queue=3)
    barrier = threading.Barrier(16)

    def submit(_: int) -> int:
        barrier.wait()
        return live.submit(clip).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = sorted(pool.map(submit, range(16)))
    assert codes == [202] * 3 + [429] * 13
    assert live.jobs.queue_length() == 3
    stored = [p.name for p in (live.blobs.root / "jobs").iterdir()]
    assert sorted(stored) == sorted(j.id for j in live.jobs.list_recent())  # no input left by a refusal


def test_failed_enqueue_keeps_the_job_as_failed(live: Live, clip: bytes) -> None:
    from celery import Celery

    dead_broker = Celery("dead", broker=f"redis://127.0.0.1:{_closed_port()}/0", set_as_current=False)
    live.server.app.extensions["personaplex"]._celery = dead_broker
    response = live.submit(clip)
    assert response.status_code == 503
    job_id = response.json()["job_id"]
    job = live.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "failed" and "enqueue" in job["error"]
    assert live.blobs.exists(job_id, INPUT)


def _closed_port() -> int:
    from fixtures import free_port

    return free_port()


# -- reading, listing, cancelling -----------------------------------------------------------------


@pytest.mark.parametrize("job_id", [HEX_ID, "not-a-job", "..%2F..%2Fetc%2Fpasswd", "ABCDEF" * 6, "a" * 200])
def test_unknown_or_malformed_job_ids_are_404(app_client: AppClient, job_id: str) -> None:
    for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/audio", f"/api/jobs/{job_id}/text"):
        response = app_client.get(path)
        assert response.status_code == 404, path
        assert response.json["error"]  # "doesn't exist", or no such route once %2F decodes to '/'
    assert app_client.delete(f"/api/jobs/{job_id}").status_code == 404


def test_list_jobs_filters_by_status(live: Live, clip: bytes) -> None:
    first, second = queued(live, clip), queued(live, clip)
    live.delete(f"/api/jobs/{first}")
    everything = live.get("/api/jobs").json()
    assert [j["id"] for j in everything["jobs"]] == [second, first]
    queued_jobs = live.get("/api/jobs", params={"status": "queued"}).json()["jobs"]
    assert [j["id"] for j in queued_jobs] == [second]
    assert live.get("/api/jobs", params={"limit": 1}).json()["count"] == 1
    assert live.get("/api/jobs", params={"status": "bogus"}).status_code == 400
    assert live.get("/api/jobs", params={"limit": "x"}).status_code == 400


def test_cancel_queued_job(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip)
    response = live.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert live.jobs.get(job_id).status is JobStatus.CANCELLED
    again = live.delete(f"/api/jobs/{job_id}")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]


def test_cancel_running_job_sets_the_flag(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip)
    live.jobs.mark_running(job_id, "fake@test")
    response = live.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    assert live.jobs.cancel_requested(job_id)


def test_outputs_exist_only_after_success(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip)
    not_ready = live.get(f"/api/jobs/{job_id}/audio")
    assert not_ready.status_code == 409 and not_ready.json()["status"] == "queued"
    finish_like_a_worker(live, job_id)
    audio = live.get(f"/api/jobs/{job_id}/audio")
    assert audio.status_code == 200
    assert audio.headers["Content-Type"] == "audio/wav"
    assert audio.content[:4] == b"RIFF"
    text = live.get(f"/api/jobs/{job_id}/text").json()
    assert text["job_id"] == job_id and text["text"] == "hello there"
    live.blobs.delete(job_id)
    assert live.get(f"/api/jobs/{job_id}/audio").status_code == 410


def test_the_input_is_served_as_it_was_sent_while_the_job_is_kept(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip)
    sent = live.get(f"/api/jobs/{job_id}/input")
    assert sent.status_code == 200 and sent.content == clip
    assert sent.headers["Content-Type"] in ("audio/wav", "audio/x-wav")  # Python's mimetypes says either
    live.blobs.delete(job_id)
    assert live.get(f"/api/jobs/{job_id}/input").status_code == 410
    assert live.get(f"/api/jobs/{HEX_ID}/input").status_code == 404


def test_job_record_round_trips_through_the_api(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip, text_prompt="Be brief.")
    body = live.get(f"/api/jobs/{job_id}").json()
    assert Job.from_dict(body).params["text_prompt"] == "Be brief."
    assert body["attempts"] == 0 and body["worker"] is None and body["result"] is None

"""The HTTP API over the real werkzeug server, against a private redis-server.

Most tests play the worker's part through the real JobStore and blob store (so they need no model);
the end-to-end tests at the bottom run a real `celery -A worker worker` subprocess on the tiny model.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import simple_websocket
import soundfile
from fixtures import SPEECH_20S, RedisServer, events_until_closed, speech_clip, wait_until, ws_connect

from personaplex.audio import encode_wav, load
from personaplex.jobs import Job, JobStatus, JobStore, Keys, WorkerRegistry
from personaplex.storage import INPUT, OUTPUT_JSON, OUTPUT_WAV, FsBlobStore
from web.server_thread import ServerThread

API_KEY = "s3cret-key"
HEX_ID = "0123456789abcdef0123456789abcdef"


# -- helpers -------------------------------------------------------------------------------------


class Live:
    """A running server plus the stores behind it, as a worker would see them."""

    def __init__(self, server: ServerThread, data_dir: Path, client: redis.Redis) -> None:
        self.server = server
        self.url = server.url
        self.jobs = JobStore(client, retention_s=3600.0)
        self.blobs = FsBlobStore(data_dir)
        self.headers: dict[str, str] = {}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, **{"timeout": 30, **kwargs})

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers, **{"timeout": 30, **kwargs})

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, headers=self.headers, timeout=30)

    def submit(self, audio: bytes, name: str = "clip.wav", **fields: Any) -> requests.Response:
        return self.post("/api/jobs", files={"file": (name, audio)}, data=fields)

    def ws(self, job_id: str, query: str = "") -> simple_websocket.Client:
        ws_url = self.url.replace("http://", "ws://") + f"/api/jobs/{job_id}/events{query}"
        return ws_connect(ws_url, self.headers)


@pytest.fixture(scope="module")
def speech() -> Any:
    return load(SPEECH_20S)


@pytest.fixture(scope="module")
def clip(speech: Any) -> bytes:
    """Two seconds of real speech as a 16-bit WAV."""
    return encode_wav(speech[: 2 * 24000], 24000, subtype="PCM_16")


@pytest.fixture
def serve(
    start_web: Callable[..., ServerThread], redis_client: redis.Redis, tmp_path: Path
) -> Callable[..., Live]:
    """Start a server with settings overrides (small limits by default); stopped after the test."""
    defaults = {"max_upload_mb": 1.0, "max_audio_seconds": 10.0, "offline_timeout": 5.0}

    def start(**overrides: Any) -> Live:
        return Live(start_web(**{**defaults, **overrides}), tmp_path / "data", redis_client)

    return start


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve()


def _queued(live: Live, clip: bytes, **fields: Any) -> str:
    response = live.submit(clip, **fields)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _finish_like_a_worker(live: Live, job_id: str, text: str = "hello there") -> None:
    """What the worker does for a job, through the same stores (used where no model is needed)."""
    live.jobs.mark_running(job_id, "fake@test")
    live.jobs.set_progress(job_id, "generate", 5, 10)
    wav = encode_wav(load(live.blobs.get(job_id, INPUT))[:2400], 24000)
    frames = ["PAD", " hello", " there", "EPAD", "PAD"]
    document = {"text": text, "frames": frames, "tokens": [], "duration_s": 0.1, "timings": {}}
    live.blobs.put(job_id, OUTPUT_WAV, wav)
    live.blobs.put(job_id, OUTPUT_JSON, json.dumps(document).encode())
    live.jobs.mark_succeeded(job_id, {"text": text, "duration_s": 0.1})


# -- catalog, errors, OpenAPI ----------------------------------------------------------------------


def test_voices_and_prompts(live: Live) -> None:
    voices = live.get("/api/voices").json()
    assert voices["count"] == len(voices["voices"]) == 18
    assert voices["default"] == "NATF2.pt"
    assert {"id", "name", "category", "filename"} <= set(voices["voices"][0])
    # The legacy server's shape: clients compare ids with "NATF2.pt".
    ids = [voice["id"] for voice in voices["voices"]]
    assert all(i.endswith(".pt") for i in ids) and voices["default"] in ids
    assert voices["voices"][0] == {
        "id": "NATF0.pt",
        "name": "Natural Female 0",
        "category": "natural",
        "filename": "NATF0.pt",
    }
    assert voices["voices"][-1]["name"] == "Variety Male 4"
    prompts = live.get("/api/prompts").json()
    assert prompts["prompts"] and prompts["default"].startswith("You are")


def test_errors_are_json_with_the_right_status(live: Live) -> None:
    missing = live.get("/api/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = live.delete("/api/voices")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert "GET" in wrong_method.headers["Allow"]
    assert live.get("/").status_code == 200  # the upload page


def test_openapi_documents_every_route(live: Live) -> None:
    document = live.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    voice_field = paths["/api/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    voice_field = voice_field["properties"]["voice_prompt"]
    assert voice_field["default"] == "NATF2.pt" and "NATF2.pt" in voice_field["enum"]
    voice_schema = document["components"]["schemas"]["Voice"]["properties"]["id"]
    assert voice_schema["enum"] == voice_field["enum"]
    app = live.server.app
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "page.index") or rule.endpoint.startswith("docs."):
            continue  # HTML pages and their files, not API
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert path in paths, f"{rule.rule} is not in /openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], f"{method} {rule.rule} is not in /openapi.json"


# -- API key ------------------------------------------------------------------------------------------


def test_api_key_guards_every_api_route(serve: Callable[..., Live], clip: bytes) -> None:
    live = serve(api_key=API_KEY)
    assert live.get("/health").status_code == 200  # open: load balancers probe it
    assert live.get("/openapi.json").status_code == 200
    app = live.server.app
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/") or rule.rule.endswith("/events"):
            continue  # the events socket is checked in the next test
        path = re.sub(r"<(?:\w+:)?\w+>", HEX_ID, rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = requests.request(method, live.url + path, timeout=30)
            assert response.status_code == 401, (method, rule.rule, response.status_code)
            assert "API key" in response.json()["error"]
            checked += 1
    assert checked >= 15  # jobs, batches, offline, gpu, catalog: every /api route and method
    assert live.submit(clip).status_code == 401
    live.headers = {"Authorization": "Bearer wrong"}
    assert live.get("/api/voices").status_code == 401
    live.headers = {"Authorization": f"Bearer {API_KEY}"}
    assert live.get("/api/voices").status_code == 200
    job_id = _queued(live, clip)
    ws = live.ws(job_id)
    assert json.loads(ws.receive(timeout=5))["type"] == "state"
    ws.close()


def test_access_log_records_keep_their_shape_with_the_key_masked() -> None:
    from web.auth import MASK_ACCESS_TOKEN

    def record(msg: str, args: object) -> logging.LogRecord:
        return logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, msg, args, None)  # type: ignore[arg-type]

    gunicorn = record('%(h)s "%(r)s"', {"h": "10.0.0.1", "r": f"GET /x?access_token={API_KEY}&a=1 HTTP/1.1"})
    assert MASK_ACCESS_TOKEN.filter(gunicorn) and isinstance(gunicorn.args, dict)
    assert gunicorn.getMessage() == '10.0.0.1 "GET /x?access_token=***&a=1 HTTP/1.1"'
    werkzeug = record('"%s" %s %s', (f"GET /ws?access_token={API_KEY} HTTP/1.1", "101", "-"))
    assert MASK_ACCESS_TOKEN.filter(werkzeug)
    assert werkzeug.getMessage() == '"GET /ws?access_token=*** HTTP/1.1" 101 -'


def test_events_socket_refuses_a_missing_key_and_takes_access_token(
    serve: Callable[..., Live], clip: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="werkzeug")
    live = serve(api_key=API_KEY)
    with pytest.raises(simple_websocket.ConnectionError):
        live.ws(HEX_ID)
    live.headers = {"Authorization": f"Bearer {API_KEY}"}
    job_id = _queued(live, clip)
    live.headers = {}
    ws = live.ws(job_id, f"?access_token={API_KEY}")
    assert json.loads(ws.receive(timeout=5))["status"] == "queued"
    ws.close()
    # The request line reaches the access log with the key masked.
    wait_until(lambda: "access_token=***" in caplog.text, 5, what="the socket's access log line")
    assert API_KEY not in caplog.text


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
    job_id = _queued(live, clip, voice_prompt=spelling)
    assert live.get(f"/api/jobs/{job_id}").json()["params"]["voice_prompt"] == "NATF0.pt"


def test_unknown_voice_lists_the_legacy_ids(live: Live, clip: bytes) -> None:
    response = live.submit(clip, voice_prompt="NATF9")
    assert response.status_code == 400
    valid = response.json()["valid_voices"]
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
    live: Live, clip: bytes, case: str, make: Callable, fields: dict, needle: str
) -> None:
    long = SPEECH_20S.read_bytes()  # 20 s > the 10 s limit, under the 1 MB upload limit
    response = live.submit(make(clip, long), **fields)
    assert response.status_code == 400, (case, response.text)
    assert needle.lower() in response.json()["error"].lower()
    assert live.jobs.queue_length() == 0


def test_submit_without_file_and_huge_upload(live: Live) -> None:
    missing = live.post("/api/jobs", data={"seed": "1"})
    assert missing.status_code == 400 and "file" in missing.json()["error"]
    huge = live.submit(b"\0" * (3 * 1024 * 1024))
    assert huge.status_code == 413
    assert "1 MB" in huge.json()["error"]


def test_queue_full_answers_429_with_retry_after(serve: Callable[..., Live], clip: bytes) -> None:
    live = serve(max_queue=2)
    _queued(live, clip)
    _queued(live, clip)
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
def test_unknown_or_malformed_job_ids_are_404(live: Live, job_id: str) -> None:
    for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/audio", f"/api/jobs/{job_id}/text"):
        response = live.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]  # "doesn't exist", or no such route once %2F decodes to '/'
    assert live.delete(f"/api/jobs/{job_id}").status_code == 404


def test_list_jobs_filters_by_status(live: Live, clip: bytes) -> None:
    first, second = _queued(live, clip), _queued(live, clip)
    live.delete(f"/api/jobs/{first}")
    everything = live.get("/api/jobs").json()
    assert [j["id"] for j in everything["jobs"]] == [second, first]
    queued = live.get("/api/jobs", params={"status": "queued"}).json()["jobs"]
    assert [j["id"] for j in queued] == [second]
    assert live.get("/api/jobs", params={"limit": 1}).json()["count"] == 1
    assert live.get("/api/jobs", params={"status": "bogus"}).status_code == 400
    assert live.get("/api/jobs", params={"limit": "x"}).status_code == 400


def test_cancel_queued_job(live: Live, clip: bytes) -> None:
    job_id = _queued(live, clip)
    response = live.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert live.jobs.get(job_id).status is JobStatus.CANCELLED
    again = live.delete(f"/api/jobs/{job_id}")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]


def test_cancel_running_job_sets_the_flag(live: Live, clip: bytes) -> None:
    job_id = _queued(live, clip)
    live.jobs.mark_running(job_id, "fake@test")
    response = live.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    assert live.jobs.cancel_requested(job_id)


def test_outputs_exist_only_after_success(live: Live, clip: bytes) -> None:
    job_id = _queued(live, clip)
    not_ready = live.get(f"/api/jobs/{job_id}/audio")
    assert not_ready.status_code == 409 and not_ready.json()["status"] == "queued"
    _finish_like_a_worker(live, job_id)
    audio = live.get(f"/api/jobs/{job_id}/audio")
    assert audio.status_code == 200
    assert audio.headers["Content-Type"] == "audio/wav"
    assert audio.content[:4] == b"RIFF"
    text = live.get(f"/api/jobs/{job_id}/text").json()
    assert text["job_id"] == job_id and text["text"] == "hello there"
    live.blobs.delete(job_id)
    assert live.get(f"/api/jobs/{job_id}/audio").status_code == 410


# -- WebSocket events ------------------------------------------------------------------------------


def test_events_socket_sends_state_then_relays_until_final(live: Live, clip: bytes) -> None:
    job_id = _queued(live, clip)
    ws = live.ws(job_id)
    state = json.loads(ws.receive(timeout=5))
    assert state["type"] == "state" and state["status"] == "queued" and state["job"]["id"] == job_id
    _finish_like_a_worker(live, job_id)
    events = events_until_closed(ws)
    assert [e["type"] for e in events] == ["started", "progress", "succeeded"]
    assert events[1]["done"] == 5 and events[1]["total"] == 10
    assert all(e["job_id"] == job_id for e in events)


def test_events_socket_for_a_final_job_sends_state_and_closes(live: Live, clip: bytes) -> None:
    job_id = _queued(live, clip)
    live.delete(f"/api/jobs/{job_id}")
    events = events_until_closed(live.ws(job_id))
    assert [(e["type"], e["status"]) for e in events] == [("state", "cancelled")]


@pytest.mark.parametrize("job_id", [HEX_ID, "not-a-job-id"])
def test_events_socket_for_an_unknown_job_says_so(live: Live, job_id: str) -> None:
    events = events_until_closed(live.ws(job_id))
    assert events[0]["type"] == "error" and "doesn't exist" in events[0]["error"]


# -- the legacy-compatible synchronous call ---------------------------------------------------------


def test_offline_waits_and_returns_wav_with_text_header(
    live: Live, clip: bytes, redis_client: redis.Redis
) -> None:
    import threading

    def fake_worker() -> None:
        job_id = wait_until(lambda: redis_client.zrange(Keys.QUEUED, 0, 0), 10, what="a queued job")[
            0
        ].decode()
        _finish_like_a_worker(live, job_id, text="héllo")

    thread = threading.Thread(target=fake_worker)
    thread.start()
    response = live.post("/api/offline", files={"file": ("q.wav", clip)}, data={"voice_prompt": "NATF1"})
    thread.join()
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "audio/wav"
    assert response.content[:4] == b"RIFF"
    assert json.loads(response.headers["X-Text-Output"]) == [" hello", " there"]
    assert live.jobs.get(response.headers["X-Job-Id"]).params["voice_prompt"] == "NATF1.pt"


def test_offline_answers_504_with_the_job_id_when_the_wait_runs_out(
    serve: Callable[..., Live], clip: bytes
) -> None:
    live = serve(offline_timeout=1.0)
    started = time.monotonic()
    response = live.post("/api/offline", files={"file": ("q.wav", clip)})
    assert response.status_code == 504
    assert 1.0 <= time.monotonic() - started < 5.0
    body = response.json()
    assert live.jobs.get(body["job_id"]).status is JobStatus.QUEUED  # it goes on
    assert body["urls"]["self"] == f"/api/jobs/{body['job_id']}"


def test_offline_validates_like_submit(live: Live) -> None:
    response = live.post("/api/offline", files={"file": ("x.wav", b"nope")}, data={"seed": "1"})
    assert response.status_code == 400


# -- health and GPU --------------------------------------------------------------------------------


def _beat(client: redis.Redis, name: str, **record: Any) -> None:
    base = {"model_loaded": False, "device": "cpu", "gpu": {}, "running_job": None, "progress": None}
    WorkerRegistry(client).beat(name, {**base, **record}, ttl_s=30)


def test_health_reports_workers_and_queue(live: Live, clip: bytes, redis_client: redis.Redis) -> None:
    report = live.get("/health").json()
    assert report["status"] == "degraded" and report["workers"] == 0
    _queued(live, clip)
    _beat(redis_client, "gpu0@host", model_loaded=True, device="cuda:0")
    report = live.get("/health").json()
    assert report["status"] == "healthy"
    assert report["workers"] == 1 and report["queue_length"] == 1
    assert report["gpu_available"] is True and report["model_loaded"] is True
    assert "timestamp" in report


def test_health_is_503_within_2_s_while_redis_is_down_and_recovers(
    live: Live, redis_server: RedisServer
) -> None:
    assert live.get("/health").status_code == 200
    redis_server.stop()
    try:
        started = time.monotonic()
        response = live.get("/health")
        assert time.monotonic() - started < 2.0
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        down = live.get("/api/jobs")
        assert down.status_code == 503 and "Redis" in down.json()["error"]
    finally:
        redis_server.start()
    assert live.get("/health").status_code == 200
    assert live.get("/api/jobs").status_code == 200


def test_health_is_503_within_2_s_while_redis_hangs(live: Live, redis_server: RedisServer) -> None:
    import signal

    assert live.get("/health").status_code == 200
    redis_server.process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        response = live.get("/health")
        elapsed = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert response.status_code == 503 and elapsed < 2.0
    assert live.get("/health").status_code == 200


def test_gpu_status_from_heartbeats(live: Live, redis_client: redis.Redis) -> None:
    gpu = {"name": "H100", "memory_total": 80000.0, "memory_allocated": 15000.0, "memory_reserved": 16000.0}
    batch = [HEX_ID, "b" * 32, "c" * 32]
    _beat(redis_client, "gpu0@a", model_loaded=True, device="cuda:0", gpu=gpu, running_job=HEX_ID,
          running_jobs=batch, active_connections=3)  # fmt: skip
    _beat(redis_client, "gpu1@b", model_loaded=False, device="cuda:0", gpu={**gpu, "memory_allocated": 0.0})
    status = live.get("/api/gpu/status").json()
    assert status["worker_count"] == 2
    assert [w["worker"] for w in status["workers"]] == ["gpu0@a", "gpu1@b"]
    assert status["model_loaded"] is True and status["active_connections"] == 3  # every job of the batch
    assert status["gpu"]["name"] == "H100"
    assert status["gpu"]["memory_total"] == 160000.0 and status["gpu"]["memory_allocated"] == 15000.0
    assert status["idle_timeout"] == 300.0


def test_offload_without_workers(live: Live) -> None:
    response = live.post("/api/gpu/offload")
    assert response.status_code == 200
    assert response.json() == {"status": "not_loaded", "memory_allocated": 0.0, "workers": []}
    unknown = live.post("/api/gpu/offload", params={"worker": "nobody@nowhere"})
    assert unknown.status_code == 404 and "nobody@nowhere" in unknown.json()["error"]


def test_job_record_round_trips_through_the_api(live: Live, clip: bytes) -> None:
    job_id = _queued(live, clip, text_prompt="Be brief.")
    body = live.get(f"/api/jobs/{job_id}").json()
    assert Job.from_dict(body).params["text_prompt"] == "Be brief."
    assert body["attempts"] == 0 and body["worker"] is None and body["result"] is None


# -- end to end: a real `celery -A worker worker` subprocess on the tiny model ------------------------


@pytest.mark.slow
def test_a_redis_restart_with_a_live_worker_shows_in_health_and_the_service_recovers(
    serve: Callable[..., Live], start_worker: Callable[..., Any], redis_server: RedisServer, speech: Any
) -> None:
    live = serve()
    start_worker("gpu0")
    wait_until(lambda: live.get("/health").json()["status"] == "healthy", 30, what="the worker's heartbeat")
    redis_server.stop()  # no persistence: the queue, the records and the heartbeats are gone
    try:
        started = time.monotonic()
        down = live.get("/health")
        assert down.status_code == 503 and time.monotonic() - started < 2.0
        assert down.json()["status"] == "unhealthy"
        time.sleep(1.0)  # the worker's connection breaks too
    finally:
        redis_server.start()
    wait_until(lambda: live.get("/health").json()["status"] == "healthy", 30, what="the worker to beat again")
    job_id = _queued(live, encode_wav(speech[:24000], 24000, subtype="PCM_16"))
    done = wait_until(
        lambda: (j := live.get(f"/api/jobs/{job_id}").json())["status"] == "succeeded" and j, 60
    )
    assert done["worker"] == "gpu0@test"


def _wav_seconds(data: bytes) -> float:
    from personaplex.audio import probe

    return probe(data, None).duration_s


@pytest.mark.slow
def test_end_to_end_with_a_real_worker(
    serve: Callable[..., Live], start_worker: Callable[..., Any], speech: Any
) -> None:
    live = serve(max_audio_seconds=60.0, offline_timeout=120.0)
    start_worker("gpu0")
    clip = encode_wav(speech[: 3 * 24000], 24000, subtype="PCM_16")

    job_id = _queued(live, clip, voice_prompt="NATF0", seed="1234")  # no ".pt": the worker still finds it
    events = events_until_closed(live.ws(job_id), timeout=120)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "state" and kinds[-1] == "succeeded", kinds
    assert "progress" in kinds and ("started" in kinds or events[0]["status"] != "queued")

    job = live.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["worker"] == "gpu0@test" and job["attempts"] == 1
    assert job["params"]["voice_prompt"] == "NATF0.pt"
    assert {"queue_wait_s", "inference_s", "rtf"} <= set(job["result"]["timings"])
    audio = live.get(f"/api/jobs/{job_id}/audio")
    assert audio.headers["Content-Type"] == "audio/wav"
    assert _wav_seconds(audio.content) == pytest.approx(3.0, abs=0.01)
    text = live.get(f"/api/jobs/{job_id}/text").json()
    assert len(text["frames"]) == job["result"]["frames"] > 0

    offline = live.post("/api/offline", files={"file": ("q.wav", clip)}, data={"seed": "5"}, timeout=150)
    assert offline.status_code == 200, offline.text
    assert _wav_seconds(offline.content) == pytest.approx(3.0, abs=0.01)
    assert isinstance(json.loads(offline.headers["X-Text-Output"]), list)

    started = time.monotonic()
    status = live.get("/api/gpu/status").json()
    assert time.monotonic() - started < 1.0  # the heartbeat tells how many replies to wait for
    (worker,) = status["workers"]
    assert worker["worker"] == "gpu0@test" and worker["source"] == "live"
    assert status["model_loaded"] is True
    offload = live.post("/api/gpu/offload", params={"worker": "gpu0@test"}).json()
    assert offload["status"] == "offloaded" and offload["workers"][0]["worker"] == "gpu0@test"
    assert live.get("/api/gpu/status").json()["model_loaded"] is False
    assert live.get("/health").json()["status"] == "healthy"


@pytest.mark.slow
def test_status_offload_and_cancel_while_a_real_worker_runs_a_job(
    serve: Callable[..., Live], start_worker: Callable[..., Any]
) -> None:
    live = serve(max_audio_seconds=600.0, max_upload_mb=64.0)
    start_worker("gpu0")
    # Seconds of work even on a fast CPU: the job is still running below.
    job_id = _queued(live, speech_clip(300.0))
    ws = live.ws(job_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        message = ws.receive(timeout=1)
        if message and json.loads(message).get("phase") == "generate":
            break
    else:
        pytest.fail("no generate progress within 120 s")
    started = time.monotonic()
    status = live.get("/api/gpu/status").json()
    assert time.monotonic() - started < 1.0  # answered by the busy worker itself
    assert status["active_connections"] == 1 and status["workers"][0]["running_job"] == job_id
    assert status["workers"][0]["source"] == "live"
    offload = live.post("/api/gpu/offload")
    assert offload.json()["status"] == "deferred"
    response = live.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 202, response.text
    events = events_until_closed(ws, timeout=60)
    assert events[-1]["type"] == "cancelled"
    assert live.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"


def test_python_dash_m_web_serves_on_port(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from fixtures import REPO_ROOT, free_port

    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "PORT": str(port),
        "PERSONAPLEX_DATA_DIR": str(tmp_path),
    }
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "web", "--host", "127.0.0.1"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )
    try:

        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, 20, interval=0.2, what="python -m web")
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()

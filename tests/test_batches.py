"""Batches over HTTP: the real web server, a private redis-server and, for the end-to-end tests, the
`live_service` stack (its own Redis and a real worker on the tiny model)."""

from __future__ import annotations

import io
import json
import stat
import time
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests
import soundfile
from fixtures import SPEECH_40S, free_port, speech_clip, wait_until

from personaplex.audio import encode_wav, load, probe
from personaplex.batches import Batch, BatchInput, BatchKeys, BatchStore, output_stems, unique_names
from personaplex.jobs import new_job_id
from web.server_thread import ServerThread

CLIP_SECONDS = 0.6


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    """Eight different 0.6 s clips of real speech (16-bit WAV), cut from the 40 s recording."""
    samples = load(SPEECH_40S)
    step = int(CLIP_SECONDS * 24_000)
    return [encode_wav(samples[i * step : (i + 1) * step], 24_000, subtype="PCM_16") for i in range(8)]


def _zip(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _post(url: str, files: list[tuple[str, tuple[str, bytes]]], **data: Any) -> requests.Response:
    return requests.post(f"{url}/api/batches", files=files, data=data, timeout=60)


def _wait_finished(url: str, batch_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        view = requests.get(f"{url}/api/batches/{batch_id}", timeout=10).json()
        return view if view["finished"] else None

    return wait_until(finished, timeout, interval=0.2, what=f"batch {batch_id}")  # type: ignore[return-value]


def _archive(url: str, batch_id: str) -> tuple[requests.Response, zipfile.ZipFile]:
    response = requests.get(f"{url}/api/batches/{batch_id}/archive", timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/zip"
    return response, zipfile.ZipFile(io.BytesIO(response.content))


def _job_count(url: str) -> int:
    return requests.get(f"{url}/api/jobs", params={"limit": 500}, timeout=10).json()["count"]


# -- the batch store and the naming rule -------------------------------------------------------------


def test_output_stems_are_unique_and_stable() -> None:
    names = ["a.wav", "a.flac", "A.ogg", "a-2.wav", "b.wav", "noext"]
    assert output_stems(names) == ["a", "a-2", "A-3", "a-2-2", "b", "noext"]
    assert output_stems(names) == output_stems(list(names))
    assert unique_names(["x.wav", "x.wav", "X.wav", "x.flac"]) == ["x.wav", "x-2.wav", "X-3.wav", "x.flac"]


def test_batch_store_round_trip_ttl_and_keep_alive(redis_client: redis.Redis) -> None:
    store = BatchStore(redis_client, retention_s=100)
    batch = store.create(Batch(inputs=[BatchInput("a.wav", new_job_id()), BatchInput("b.wav", new_job_id())]))
    assert store.get(batch.id) == batch
    key = BatchKeys.key_for(batch.id)
    assert key == f"personaplex:batch:{batch.id}"
    assert 90 < redis_client.ttl(key) <= 100
    redis_client.expire(key, 5)
    assert store.keep_alive(batch.id) and redis_client.ttl(key) > 90
    assert store.get("../etc") is None and store.get("0" * 32) is None
    with pytest.raises(ValueError):
        BatchKeys.key_for("not-an-id")
    with pytest.raises(ValueError):
        store.create(Batch(inputs=[BatchInput("a.wav", "bad id")]))
    store.delete(batch.id)
    assert store.get(batch.id) is None and not store.keep_alive(batch.id)


# -- without a worker: validation, capacity, cancel of queued jobs -------------------------------------


@pytest.fixture
def serve(start_web: Callable[..., ServerThread]) -> Callable[..., str]:
    """serve(**settings_overrides) -> base URL of a server on the private Redis (no worker)."""
    return lambda **overrides: start_web(**overrides).url


def test_bad_inputs_answer_400_naming_them_and_queue_nothing(
    serve: Callable[..., str], clips: list[bytes]
) -> None:
    url = serve()
    good = [("files", ("one.wav", clips[0])), ("files", ("two.wav", clips[1]))]
    cases: list[tuple[list[tuple[str, tuple[str, bytes]]], dict[str, str], str]] = [
        ([*good, ("files", ("notes.txt", b"hello, not audio"))], {}, "notes.txt"),
        ([*good, ("files", ("empty.wav", b""))], {}, "empty.wav"),
        ([("archive", ("in.zip", _zip({"ok.wav": clips[0], "../evil.wav": clips[1]})))], {}, "../evil.wav"),
        ([("archive", ("in.zip", _zip({"/abs/a.wav": clips[0]})))], {}, "absolute path"),
        ([("archive", ("in.zip", _zip({"a.wav": clips[0], "readme.md": b"# no"})))], {}, "readme.md"),
        ([("archive", ("in.zip", _zip({"a.wav": clips[0]}, links=("link.wav",))))], {}, "symbolic link"),
        ([("archive", ("in.zip", b"PK\x03\x04 truncated"))], {}, "not a readable zip"),
        ([("archive", ("in.zip", clips[0]))], {}, "is not a zip"),
        (good, {"per_file": json.dumps({"two.wav": {"voice_prompt": "NOBODY"}})}, "two.wav: Unknown voice"),
        (good, {"per_file": json.dumps({"three.wav": {"seed": 1}})}, "'three.wav'"),
        (good, {"per_file": json.dumps({"one.wav": {"colour": "red"}})}, "unknown parameters ['colour']"),
        (good, {"per_file": "{not json"}, "per_file is not valid JSON"),
        (good, {"per_file": "[" * 100_000}, "per_file is nested too deeply"),
        (good, {"per_file": json.dumps({"one.wav": 3})}, "JSON object of objects"),
        (good, {"seed": "many"}, "seed must be an integer"),
        ([], {"seed": "1"}, "No audio uploaded"),
    ]
    for files, data, expected in cases:
        response = _post(url, files, **data)
        assert response.status_code == 400, (expected, response.text)
        assert expected in response.json()["error"], response.json()
    too_many = _zip({f"x{i}.wav": b"" for i in range(501)})
    response = _post(url, [("archive", ("many.zip", too_many))])
    assert response.status_code == 400 and "more than 500 inputs" in response.json()["error"]
    assert _job_count(url) == 0
    assert requests.get(f"{url}/api/jobs", timeout=10).json()["jobs"] == []


def test_a_zip_that_expands_past_the_upload_limit_is_refused(
    serve: Callable[..., str], clips: list[bytes]
) -> None:
    url = serve(max_upload_mb=1)
    bomb = _zip({"a.wav": clips[0], "b.wav": b"\0" * (3 * 1024 * 1024)})
    assert len(bomb) < 100_000
    response = _post(url, [("archive", ("bomb.zip", bomb))])
    assert response.status_code == 400 and "expands past the upload limit" in response.json()["error"]
    # Many small zips share one budget: each alone fits, together they do not.
    part = _zip({"p.wav": b"\0" * (400 * 1024)})
    response = _post(url, [("files", (f"part{i}.zip", part)) for i in range(3)])
    assert response.status_code == 400 and "expands past the upload limit" in response.json()["error"]
    assert _job_count(url) == 0


def test_a_batch_that_does_not_fit_the_queue_gets_429_and_queues_nothing(
    serve: Callable[..., str], clips: list[bytes]
) -> None:
    url = serve(max_queue=2)
    files = [("files", (f"c{i}.wav", clips[i])) for i in range(3)]
    response = _post(url, files)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert "3 jobs were sent" in response.json()["error"]
    assert _job_count(url) == 0
    assert _post(url, files[:2]).status_code == 202


def test_queued_batch_status_cancel_and_archive_refusal(
    serve: Callable[..., str], clips: list[bytes]
) -> None:
    url = serve()
    files = [
        ("files", ("same.wav", clips[0])),
        ("files", ("same.wav", clips[1])),
        ("files", ("x.flac", clips[2])),
    ]
    response = _post(
        url, files, seed="7", per_file=json.dumps({"x.flac": {"seed": 9, "voice_prompt": "natm1"}})
    )
    assert response.status_code == 202, response.text
    body = response.json()
    batch_id = body["batch_id"]
    assert response.headers["Location"] == f"/api/batches/{batch_id}"
    assert list(body["jobs"]) == ["same.wav", "same-2.wav", "x.flac"]
    assert [i["filename"] for i in body["inputs"]] == ["same.wav", "same.wav", "x.flac"]
    jobs = [requests.get(f"{url}/api/jobs/{i['job_id']}", timeout=10).json() for i in body["inputs"]]
    assert [j["batch_id"] for j in jobs] == [batch_id] * 3
    assert [j["params"]["seed"] for j in jobs] == [7, 7, 9]
    assert [j["params"]["voice_prompt"] for j in jobs] == ["NATF2.pt", "NATF2.pt", "NATM1.pt"]

    view = requests.get(f"{url}/api/batches/{batch_id}", timeout=10).json()
    assert view["total"] == 3 and view["finished"] is False
    assert view["counts"] == {
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
        "expired": 0,
    }
    assert [e["output"] for e in view["jobs"]] == ["same", "same-2", "x"]

    refused = requests.get(f"{url}/api/batches/{batch_id}/archive", timeout=10)
    assert refused.status_code == 409 and refused.json()["counts"]["queued"] == 3

    cancelled = requests.delete(f"{url}/api/batches/{batch_id}", timeout=10)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancelled"] == 3 and cancelled.json()["counts"]["cancelled"] == 3
    assert requests.delete(f"{url}/api/batches/{batch_id}", timeout=10).status_code == 409

    response, archive = _archive(url, batch_id)
    assert response.headers["X-Missing-Outputs"] == "3"
    assert archive.namelist() == ["_batch.json"]
    manifest = json.loads(archive.read("_batch.json"))
    assert [i["status"] for i in manifest["inputs"]] == ["cancelled"] * 3


def test_unknown_batches_are_404(serve: Callable[..., str]) -> None:
    url = serve()
    for path in ("0" * 32, "0" * 32 + "/archive", "not-an-id", "..%2F..%2Fetc"):
        response = requests.get(f"{url}/api/batches/{path}", timeout=10)
        assert response.status_code == 404, path
    assert requests.delete(f"{url}/api/batches/{'0' * 32}", timeout=10).status_code == 404
    assert "doesn't exist" in requests.get(f"{url}/api/batches/{'1' * 32}", timeout=10).json()["error"]


# -- end to end on a real worker ------------------------------------------------------------------


@pytest.mark.slow
def test_files_with_per_file_params_run_and_the_archive_holds_every_output(
    live_service: str, clips: list[bytes]
) -> None:
    files = [("files", (f"clip{i}.wav", clips[i])) for i in range(3)]
    per_file = {"clip1.wav": {"seed": 5, "voice_prompt": "NATM1", "greedy": True}}
    response = _post(live_service, files, seed="3", per_file=json.dumps(per_file))
    assert response.status_code == 202, response.text
    batch_id = response.json()["batch_id"]

    view = _wait_finished(live_service, batch_id)
    assert view["counts"]["succeeded"] == 3, view
    assert all(e["worker"] and e["finished_at"] for e in view["jobs"])
    second = requests.get(f"{live_service}/api/jobs/{view['jobs'][1]['job_id']}", timeout=10).json()
    assert second["params"]["seed"] == 5 and second["params"]["greedy"] is True

    response, archive = _archive(live_service, batch_id)
    assert response.headers["X-Missing-Outputs"] == "0"
    expected = {f"clip{i}{ext}" for i in range(3) for ext in (".wav", ".json")} | {"_batch.json"}
    assert set(archive.namelist()) == expected
    for entry in view["jobs"]:
        stem, job_id = entry["output"], entry["job_id"]
        wav = archive.read(f"{stem}.wav")
        assert wav == requests.get(f"{live_service}/api/jobs/{job_id}/audio", timeout=10).content
        assert probe(wav).duration_s > 0
        text = json.loads(archive.read(f"{stem}.json"))
        assert text == requests.get(f"{live_service}/api/jobs/{job_id}/text", timeout=10).json()
    manifest = json.loads(archive.read("_batch.json"))
    assert manifest["batch_id"] == batch_id
    assert [i["files"] for i in manifest["inputs"]] == [[f"clip{i}.wav", f"clip{i}.json"] for i in range(3)]


@pytest.mark.slow
def test_a_zip_with_folders_and_colliding_stems(live_service: str, clips: list[bytes]) -> None:
    flac = io.BytesIO()
    soundfile.write(flac, load(clips[3]), 24_000, format="FLAC")
    members = {
        "set/a.wav": clips[0],
        "set/a.flac": flac.getvalue(),
        "other/a.wav": clips[1],
        "__MACOSX/set/._a.wav": b"\0\5\26\7 resource fork",
        "set/.DS_Store": b"junk",
    }
    response = _post(live_service, [("archive", ("inputs.zip", _zip(members)))])
    assert response.status_code == 202, response.text
    body = response.json()
    assert list(body["jobs"]) == ["set_a.wav", "set_a.flac", "other_a.wav"]
    assert [i["filename"] for i in body["inputs"]] == ["set/a.wav", "set/a.flac", "other/a.wav"]

    view = _wait_finished(live_service, body["batch_id"])
    assert view["counts"]["succeeded"] == 3, view
    _, archive = _archive(live_service, body["batch_id"])
    names = set(archive.namelist())
    assert {"set_a.wav", "set_a.json", "set_a-2.wav", "set_a-2.json", "other_a.wav", "other_a.json"} <= names


@pytest.mark.slow
def test_the_same_inputs_and_seed_give_the_same_bytes(live_service: str, clips: list[bytes]) -> None:
    """Equal inputs and seeds give byte-equal WAVs, within a batch and across batches (outputs are
    hashed to cache them); the archive of a batch is the same zip each time it is downloaded."""

    def run_batch() -> tuple[str, list[str]]:
        files = [("files", (name, clips[0])) for name in ("a.wav", "b.wav")]
        response = _post(live_service, files, seed="11")
        assert response.status_code == 202, response.text
        view = _wait_finished(live_service, response.json()["batch_id"])
        assert view["counts"]["succeeded"] == 2, view
        return view["batch_id"], [entry["job_id"] for entry in view["jobs"]]

    def audio(job_id: str) -> bytes:
        return requests.get(f"{live_service}/api/jobs/{job_id}/audio", timeout=10).content

    first_id, first_jobs = run_batch()
    time.sleep(1.1)  # libsndfile's PEAK chunk stamped the write time in whole seconds
    second_id, second_jobs = run_batch()
    wavs = [audio(job_id) for job_id in first_jobs + second_jobs]  # the workers' output.wav files
    assert len(set(wavs)) == 1 and probe(wavs[0]).duration_s > 0

    first_zip, archive = _archive(live_service, first_id)
    _, other = _archive(live_service, second_id)
    for name in ("a.wav", "b.wav"):
        mine, theirs = archive.getinfo(name), other.getinfo(name)
        assert (mine.date_time, mine.CRC, mine.file_size) == (theirs.date_time, theirs.CRC, theirs.file_size)
        assert archive.read(name) == other.read(name) == wavs[0]
    time.sleep(2.1)  # a zip member's time has two-second resolution
    assert _archive(live_service, first_id)[0].content == first_zip.content


def test_a_batch_whose_messages_cannot_be_sent_leaves_no_job_waiting(
    start_web: Callable[..., ServerThread], clips: list[bytes]
) -> None:
    from celery import Celery

    server = start_web()
    dead_broker = Celery("dead", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    server.app.extensions["personaplex"]._celery = dead_broker  # Redis is up, the broker is not
    response = _post(server.url, [("files", (f"c{i}.wav", clips[i])) for i in range(3)])
    assert response.status_code == 503 and "enqueue" in response.json()["error"]
    jobs = requests.get(f"{server.url}/api/jobs", timeout=10).json()["jobs"]
    # The first send failed that job; the others, written but never sent, were cancelled.
    assert sorted(j["status"] for j in jobs) == ["cancelled", "cancelled", "failed"]


@pytest.mark.slow
def test_cancelling_a_running_batch(live_service: str) -> None:
    long = speech_clip(60.0)  # seconds of work per batch: the cancel lands while jobs still run
    files = [("files", (f"c{i}.wav", long)) for i in range(6)]
    response = _post(live_service, files)
    batch_id = response.json()["batch_id"]
    wait_until(
        lambda: (
            requests.get(f"{live_service}/api/batches/{batch_id}", timeout=10).json()["counts"]["queued"] < 6
        ),
        30,
        interval=0.05,
        what="the first job to start",
    )
    cancelled = requests.delete(f"{live_service}/api/batches/{batch_id}", timeout=10)
    assert cancelled.status_code in (200, 202), cancelled.text
    view = _wait_finished(live_service, batch_id, timeout=60)
    counts = view["counts"]
    assert counts["cancelled"] >= 4 and counts["queued"] == counts["running"] == 0, counts
    assert counts["succeeded"] + counts["cancelled"] == 6
    response, archive = _archive(live_service, batch_id)
    assert int(response.headers["X-Missing-Outputs"]) == counts["cancelled"]
    assert len(archive.namelist()) == 2 * counts["succeeded"] + 1

"""web/api_voices.py over real HTTP: uploading a custom voice, listing, reading and deleting it, and
every bad input answered with a 4xx naming its field, with nothing stored. No worker: what the
workers do with a voice is tests/test_voices.py's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fixtures import SPEECH_40S
from web_helpers import API_KEY, Live

from personaplex import audio as audio_io
from personaplex.custom_voices import VoiceStore
from personaplex.jobs import Keys

VOICE_LIMITS = {"max_upload_mb": 8.0}
"""A minute of 24 kHz float audio is 5.8 MB: over the small limits the other web tests use."""


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The recording from its first sound on (it opens with silence)."""
    samples = audio_io.load(SPEECH_40S)
    return samples[int(np.argmax(np.abs(samples) > 0.05)) :]


@pytest.fixture
def voices(serve: Callable[..., Live]) -> Live:
    return serve(**VOICE_LIMITS)


def recording(speech: np.ndarray, seconds: float, rate: int = 24_000, channels: int = 1) -> bytes:
    """`seconds` of speech as a WAV at `rate` with `channels` (a voice may come at any of them)."""
    import soxr

    samples = soxr.resample(np.resize(speech, int(seconds * 24_000)), 24_000, rate)
    return audio_io.encode_wav(
        np.repeat(samples[:, None], channels, axis=1) if channels > 1 else samples, rate
    )


def upload(live: Live, data: bytes, name: str | None = "Anna", consent: str | None = "true") -> Any:
    form = {key: value for key, value in (("name", name), ("consent", consent)) if value is not None}
    return live.post("/api/voices", files={"file": ("voice.wav", data)}, data=form)


def custom_ids(live: Live) -> list[str]:
    return [v["id"] for v in live.get("/api/voices").json()["voices"] if v["custom"]]


def test_an_uploaded_voice_is_listed_read_and_deleted(voices: Live, speech: np.ndarray) -> None:
    created = upload(voices, recording(speech, 3.5, rate=44_100, channels=2), name="Anna (studio)")
    assert created.status_code == 201, created.text
    voice = created.json()
    assert (
        voice["id"] == "custom-anna-studio"
        and created.headers["Location"] == "/api/voices/custom-anna-studio"
    )
    assert voice["name"] == "Anna (studio)" and voice["custom"] is True and voice["category"] == "custom"
    assert voice["duration_s"] == pytest.approx(3.5, abs=0.01)
    assert voice["consent"]["address"] == "127.0.0.1" and voice["consent"]["at"] == voice["created_at"]
    assert voice["loudness_lufs"] > -70

    listing = voices.get("/api/voices").json()
    assert listing["count"] == 19 and listing["default"] == "NATF2.pt"
    assert listing["voices"][0]["custom"] is False and "created_at" not in listing["voices"][0]
    assert listing["voices"][-1] == {key: voice[key] for key in listing["voices"][-1]}
    assert {"created_at", "duration_s"} <= set(listing["voices"][-1])
    assert voices.get("/api/voices/custom-anna-studio").json() == voice
    assert voices.get("/api/voices/NATF2").json()["id"] == "NATF2.pt"

    deleted = voices.delete("/api/voices/custom-anna-studio")
    assert deleted.status_code == 200 and deleted.json() == {
        "voice_id": "custom-anna-studio",
        "deleted": True,
    }
    assert voices.get("/api/voices/custom-anna-studio").status_code == 404
    assert voices.delete("/api/voices/custom-anna-studio").status_code == 404
    assert custom_ids(voices) == []


def test_the_stored_samples_are_the_recording_decoded_as_the_engine_decodes_a_file(
    voices: Live, speech: np.ndarray, redis_client: Any
) -> None:
    data = recording(speech, 2.0, rate=16_000, channels=2)
    assert upload(voices, data).status_code == 201
    store = VoiceStore(redis_client)
    stored = store.samples(store.require("custom-anna"))
    assert np.array_equal(stored, audio_io.load(data))  # what `--voice-prompt file.wav` conditions on


def test_a_voice_survives_a_restart_of_the_web_tier(serve: Callable[..., Live], speech: np.ndarray) -> None:
    first = serve(**VOICE_LIMITS)
    assert upload(first, recording(speech, 2.0)).status_code == 201
    first.server.stop()
    assert custom_ids(serve(**VOICE_LIMITS)) == ["custom-anna"]


def _nan_recording(speech: np.ndarray) -> bytes:
    samples = np.resize(speech, 48_000).copy()
    samples[1000] = np.nan
    return audio_io.encode_wav(samples)


BAD_UPLOADS = {
    "not audio": (lambda s: b"this is a text file, not a recording\n" * 50, {}, 400, "file"),
    "empty": (lambda s: b"", {}, 400, "file"),
    "silent": (lambda s: audio_io.encode_wav(np.zeros(48_000, np.float32)), {}, 400, "file", "silent"),
    "nearly silent": (lambda s: audio_io.encode_wav(np.resize(s, 48_000) * 1e-5), {}, 400, "file"),
    "too short": (lambda s: recording(s, 0.5), {}, 400, "file", "too short"),
    "too long": (lambda s: recording(s, 61.0, rate=8_000), {}, 400, "file", "too long: 61.0 s"),
    "NaN samples": (_nan_recording, {}, 400, "file", "NaN"),
    "no consent": (lambda s: recording(s, 2.0), {"consent": None}, 400, "consent"),
    "consent refused": (lambda s: recording(s, 2.0), {"consent": "false"}, 400, "consent"),
    "no name": (lambda s: recording(s, 2.0), {"name": None}, 400, "name"),
    "a name of punctuation": (lambda s: recording(s, 2.0), {"name": "../.."}, 400, "name"),
    "a name too long": (lambda s: recording(s, 2.0), {"name": "a" * 65}, 400, "name"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS), ids=list(BAD_UPLOADS))
def test_a_bad_upload_is_refused_naming_its_field_and_stores_nothing(
    case: str, voices: Live, speech: np.ndarray, redis_client: Any
) -> None:
    make, form, status, field, *words = BAD_UPLOADS[case]
    answer = upload(voices, make(speech), **form)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["field"] == field and body["error"], body
    assert all(word in body["error"] for word in words), body
    assert custom_ids(voices) == [] and not redis_client.keys(Keys.PREFIX + "voice*")


def test_a_taken_name_is_a_conflict(voices: Live, speech: np.ndarray) -> None:
    assert upload(voices, recording(speech, 2.0), name="Anna").status_code == 201
    for name in ("Anna", "ANNA", " anna! "):  # the same id
        answer = upload(voices, recording(speech, 3.0), name=name)
        assert answer.status_code == 409, answer.text
        assert answer.json()["field"] == "name" and answer.json()["voice_id"] == "custom-anna"
    assert voices.get("/api/voices/custom-anna").json()["duration_s"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/voices/custom-..", 400),
        ("/api/voices/custom-a.b", 400),
        ("/api/voices/custom-A", 404),  # custom-a, which no voice is
        ("/api/voices/..%2F..%2Fetc%2Fpasswd", 404),
        ("/api/voices/custom-nobody", 404),
    ],
)
def test_an_id_with_path_characters_or_no_voice_is_an_error(voices: Live, path: str, status: int) -> None:
    for answer in (voices.get(path), voices.delete(path)):
        assert answer.status_code == status, (path, answer.text)
        assert answer.json()["error"]


def test_a_catalog_voice_cannot_be_deleted(voices: Live) -> None:
    answer = voices.delete("/api/voices/NATF2.pt")
    assert answer.status_code == 403 and answer.json()["field"] == "voice_id"
    assert voices.get("/api/voices").json()["count"] == 18


def test_an_unknown_custom_voice_is_refused_in_jobs_batches_and_offline(
    voices: Live, speech: np.ndarray
) -> None:
    clip = recording(speech, 1.0)
    answers = [
        voices.submit(clip, voice_prompt="custom-nobody"),
        voices.post("/api/offline", files={"file": ("q.wav", clip)}, data={"voice_prompt": "custom-nobody"}),
        voices.post(
            "/api/batches", files=[("files", ("a.wav", clip))], data={"voice_prompt": "custom-nobody"}
        ),
        voices.post(
            "/api/batches",
            files=[("files", ("a.wav", clip)), ("files", ("b.wav", clip))],
            data={"per_file": '{"b.wav": {"voice_prompt": "custom-nobody"}}'},
        ),
    ]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["field"] == "voice_prompt" and "custom-nobody" in body["error"], body
    assert voices.get("/api/jobs").json()["count"] == 0


def test_a_custom_voice_is_accepted_by_id_in_any_case(voices: Live, speech: np.ndarray) -> None:
    assert upload(voices, recording(speech, 2.0)).status_code == 201
    job = voices.submit(recording(speech, 1.0), voice_prompt="Custom-Anna")
    assert job.status_code == 202, job.text
    assert job.json()["job"]["params"]["voice_prompt"] == "custom-anna"
    refused = voices.submit(recording(speech, 1.0), voice_prompt="custom-bob")
    assert "custom-anna" in refused.json()["valid_voices"]


def test_only_the_uploading_key_or_an_admin_deletes_a_voice(
    serve: Callable[..., Live], speech: np.ndarray
) -> None:
    live = serve(**VOICE_LIMITS, api_keys=(("alice", "alice-key"), ("bob", "bob-key")), api_key=API_KEY)
    live.headers = {"Authorization": "Bearer alice-key"}
    assert upload(live, recording(speech, 2.0)).status_code == 201
    assert upload(live, recording(speech, 2.0), name="Second").status_code == 201
    live.headers = {"Authorization": "Bearer bob-key"}
    assert "custom-anna" in custom_ids(live)  # every key may use it
    assert "address" not in live.get("/api/voices/custom-anna").json()["consent"]
    assert live.delete("/api/voices/custom-anna").status_code == 403
    live.headers = {"Authorization": "Bearer alice-key"}
    assert live.get("/api/voices/custom-anna").json()["consent"]["address"] == "127.0.0.1"
    assert live.delete("/api/voices/custom-anna").status_code == 200
    live.headers = {"Authorization": f"Bearer {API_KEY}"}
    assert live.delete("/api/voices/custom-second").status_code == 200
    live.headers = {}
    assert live.post("/api/voices", data={"name": "x"}).status_code == 401

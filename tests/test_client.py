"""personaplex.client against the real web server, a private redis-server and (at the end) a real worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures import SPEECH_20S, RedisServer, free_port, speaker_recording

from personaplex.audio import encode_wav, load, probe
from personaplex.client import ClientError, OfflineResult, PersonaPlexClient, WaitTimeoutError
from personaplex.errors import PersonaPlexError
from web.server_thread import ServerThread

API_KEY = "client-key"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_wav(load(SPEECH_20S)[: 2 * 24000], 24000, subtype="PCM_16")


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3.5 s of one speaker: the 20 s recording from 5 s on (its first 5 s are silent)."""
    path = tmp_path_factory.mktemp("voice") / "anna.wav"
    path.write_bytes(speaker_recording())
    return path


@pytest.fixture
def serve(start_web: Callable[..., ServerThread]) -> Callable[..., str]:
    """serve(**settings_overrides) -> base URL of a running server with the API key set."""
    return lambda **overrides: start_web(**{"api_key": API_KEY, **overrides}).url


@pytest.fixture
def client(serve: Callable[..., str]) -> PersonaPlexClient:
    return PersonaPlexClient(serve(), api_key=API_KEY, timeout=10)


def test_catalog_and_service_calls(client: PersonaPlexClient) -> None:
    voices = client.voices()
    assert len(voices) == 18 and voices[2]["id"] == "NATF2.pt" and voices[2]["name"] == "Natural Female 2"
    assert any(p["id"] == "assistant" for p in client.prompts())
    assert client.health()["status"] == "degraded"  # Redis up, no worker yet
    assert client.gpu_status()["workers"] == []
    assert client.offload()["status"] == "not_loaded"


def test_submit_get_list_cancel(client: PersonaPlexClient, clip: bytes, tmp_path: Path) -> None:
    path = tmp_path / "question.wav"
    path.write_bytes(clip)
    from_path = client.submit_job(path, voice_prompt="NATF1", seed=3, greedy=True, text_prompt=None)
    from_bytes = client.submit_job(clip, filename="bytes.wav")
    job = client.get_job(from_path["job_id"])
    assert job["input_name"] == "question.wav"
    assert job["params"]["voice_prompt"] == "NATF1.pt" and job["params"]["greedy"] is True
    assert [j["id"] for j in client.list_jobs(status="queued")] == [from_bytes["job_id"], from_path["job_id"]]
    assert client.cancel_job(from_bytes["job_id"])["status"] == "cancelled"
    assert [j["id"] for j in client.list_jobs(status="cancelled", limit=5)] == [from_bytes["job_id"]]


def test_errors_carry_the_status_and_the_servers_text(client: PersonaPlexClient, clip: bytes) -> None:
    with pytest.raises(ClientError) as bad_voice:
        client.submit_job(clip, voice_prompt="NOBODY")
    assert bad_voice.value.status == 400
    assert "Unknown voice prompt 'NOBODY'" in str(bad_voice.value)
    assert isinstance(bad_voice.value, PersonaPlexError)
    with pytest.raises(ClientError) as missing:
        client.get_job("0" * 32)
    assert missing.value.status == 404 and "doesn't exist" in str(missing.value)
    with pytest.raises(ClientError) as not_ready:
        client.download_audio(client.submit_job(clip)["job_id"])
    assert not_ready.value.status == 409


def test_create_get_and_delete_a_custom_voice(client: PersonaPlexClient, voice_wav: Path) -> None:
    with voice_wav.open("rb") as handle:  # an open file works as a path or bytes do
        created = client.create_voice(handle, "Anna (studio)", consent=True)
    assert created["id"] == "custom-anna-studio" and created["custom"] is True
    assert created["duration_s"] == pytest.approx(3.5, abs=0.01) and created["consent"]["at"]
    assert client.get_voice("custom-anna-studio") == created
    assert client.get_voice("natf2")["id"] == "NATF2.pt"
    assert [v["id"] for v in client.voices() if v["custom"]] == ["custom-anna-studio"]
    job = client.submit_job(voice_wav, voice_prompt="custom-anna-studio")
    assert job["job"]["params"]["voice_prompt"] == "custom-anna-studio"
    assert client.delete_voice("custom-anna-studio") == {"voice_id": "custom-anna-studio", "deleted": True}
    with pytest.raises(ClientError) as gone:
        client.get_voice("custom-anna-studio")
    assert gone.value.status == 404 and gone.value.payload["field"] == "voice_id"
    assert len(client.voices()) == 18


def test_voice_errors_carry_the_status_and_the_field(client: PersonaPlexClient, voice_wav: Path) -> None:
    with pytest.raises(ClientError) as no_consent:
        client.create_voice(voice_wav.read_bytes(), "Anna", consent=False)
    assert no_consent.value.status == 400 and no_consent.value.payload["field"] == "consent"
    assert "consent is required" in str(no_consent.value)
    client.create_voice(voice_wav, "Anna", consent=True)
    with pytest.raises(ClientError) as taken:
        client.create_voice(voice_wav, "ANNA", consent=True)
    assert taken.value.status == 409 and taken.value.payload["voice_id"] == "custom-anna"
    with pytest.raises(ClientError) as catalog:
        client.delete_voice("NATF2.pt")
    assert catalog.value.status == 403
    with pytest.raises(ClientError) as malformed:  # quoted into the path, it reaches the voice route
        client.delete_voice("custom anna")
    assert malformed.value.status == 400 and malformed.value.payload["field"] == "voice_id"
    assert [v["id"] for v in client.voices() if v["custom"]] == ["custom-anna"]


def test_wrong_key_full_queue_and_unreachable_server(serve: Callable[..., str], clip: bytes) -> None:
    url = serve(max_queue=1)
    with pytest.raises(ClientError) as unauthorized:
        PersonaPlexClient(url, api_key="wrong").voices()
    assert unauthorized.value.status == 401
    client = PersonaPlexClient(url, api_key=API_KEY)
    client.submit_job(clip)
    with pytest.raises(ClientError) as full:
        client.submit_job(clip)
    assert full.value.status == 429 and full.value.retry_after >= 1
    with pytest.raises(ClientError) as unreachable:
        PersonaPlexClient(f"http://127.0.0.1:{free_port()}", timeout=2).voices()
    assert unreachable.value.status is None and "Cannot reach" in str(unreachable.value)


def test_wait_times_out_while_the_job_goes_on(client: PersonaPlexClient, clip: bytes) -> None:
    job_id = client.submit_job(clip)["job_id"]
    seen: list[str] = []
    with pytest.raises(WaitTimeoutError) as timeout:
        client.wait(job_id, timeout=0.3, poll_interval=0.1, on_update=lambda job: seen.append(job["status"]))
    assert timeout.value.job_id == job_id
    assert seen and set(seen) == {"queued"}


def test_health_reports_redis_down_without_raising(
    client: PersonaPlexClient, redis_server: RedisServer
) -> None:
    redis_server.stop()
    try:
        report = client.health()
    finally:
        redis_server.start()
    assert report["status"] == "unhealthy"
    assert client.health()["status"] == "degraded"


def test_from_env_reads_url_and_key(serve: Callable[..., str]) -> None:
    url = serve()
    client = PersonaPlexClient.from_env({"PERSONAPLEX_API_URL": url + "/", "PERSONAPLEX_API_KEY": API_KEY})
    assert client.base_url == url
    assert len(client.voices()) == 18


@pytest.mark.slow
def test_round_trip_with_a_real_worker(
    client: PersonaPlexClient, start_worker: Callable[..., Any], clip: bytes, tmp_path: Path
) -> None:
    start_worker("gpu0")
    job_id = client.submit_job(clip, seed=11)["job_id"]
    job = client.wait(job_id, timeout=120, poll_interval=0.2)
    assert job["status"] == "succeeded", job
    path = client.download_audio(job_id, tmp_path / "out" / "answer.wav")
    assert probe(path, None).duration_s == pytest.approx(2.0, abs=0.01)
    assert client.download_text(job_id)["frames"]
    result = client.offline(clip, voice_prompt="VARM2", timeout=120)
    assert isinstance(result, OfflineResult) and result.audio[:4] == b"RIFF"
    assert isinstance(result.text, list) and result.job_id
    assert client.gpu_status()["workers"][0]["worker"] == "gpu0@test"
    assert client.offload(worker="gpu0@test")["status"] in ("offloaded", "not_loaded")

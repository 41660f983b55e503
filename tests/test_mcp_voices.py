"""Custom voices through the MCP server (create_voice, list_voices, delete_voice, and voice_prompt in
process_audio) over real stdio, against the real service: `live_service` (its own redis-server, a
Celery worker on the tiny model, the web server) or, where no job runs, a web server alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import SPEECH_20S, speaker_recording
from mcp import Client
from test_mcp import call, rest, run_client

from personaplex.audio import encode_wav, load, probe
from personaplex.mcp_server import ToolError, check_voice
from personaplex.params import SAMPLE_RATE

VOICE_NAME = "MCP Anna"
VOICE_ID = "custom-mcp-anna"


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3.5 s voice (the 20 s recording speaks from 5 s on: its start is silence), a 2 s question
    and 3 s of digital silence."""
    folder = tmp_path_factory.mktemp("voice-recordings")
    speech = load(SPEECH_20S)
    cuts = {
        "question": speech[9 * SAMPLE_RATE : 11 * SAMPLE_RATE],
        "silent": np.zeros(3 * SAMPLE_RATE, np.float32),
    }
    paths = {name: folder / f"{name}.wav" for name in cuts}
    for name, samples in cuts.items():
        paths[name].write_bytes(encode_wav(samples, SAMPLE_RATE, subtype="PCM_16"))
    paths["voice"] = folder / "voice.wav"
    paths["voice"].write_bytes(speaker_recording())
    return paths


def custom_ids(url: str) -> list[str]:
    return [voice["id"] for voice in rest(url).voices() if voice.get("custom")]


@pytest.mark.slow
def test_a_voice_made_over_mcp_answers_a_job_until_it_is_deleted(
    live_service: str, recordings: dict[str, Path], tmp_path: Path
) -> None:
    answer, gone = tmp_path / "answer.wav", tmp_path / "never.wav"

    async def scenario(client: Client) -> dict[str, dict[str, Any]]:
        seen = {
            "created": await call(
                client, "create_voice", input_file=str(recordings["voice"]), name=VOICE_NAME, consent=True
            )
        }
        seen["listed"] = await call(client, "list_voices")
        # Any case works, as it does for the service: the MCP server lower-cases a custom id.
        question = str(recordings["question"])
        seen["job"] = await call(
            client,
            "process_audio",
            input_file=question,
            output_file=str(answer),
            voice_prompt="Custom-MCP-Anna",
        )
        seen["deleted"] = await call(client, "delete_voice", voice_id=VOICE_ID)
        seen["listed_after"] = await call(client, "list_voices")
        seen["job_after"] = await call(
            client, "process_audio", input_file=question, output_file=str(gone), voice_prompt=VOICE_ID
        )
        seen["deleted_again"] = await call(client, "delete_voice", voice_id=VOICE_ID)
        return seen

    seen = run_client(live_service, scenario)
    created = seen["created"]
    assert created["status"] == "ok", created
    voice = created["voice"]
    assert voice["id"] == VOICE_ID and voice["name"] == VOICE_NAME and voice["custom"] is True
    assert voice["duration_s"] == pytest.approx(3.5, abs=0.01) and voice["loudness_lufs"] > -70
    assert voice["consent"]["at"] == pytest.approx(voice["created_at"])
    assert f"voice_prompt='{VOICE_ID}'" in created["message"]

    listed = seen["listed"]
    assert listed["count"] == 19 == len(listed["voices"])
    assert listed["voices"][0]["custom"] is False and "created_at" not in listed["voices"][0]
    last = listed["voices"][-1]
    assert last["id"] == VOICE_ID and last["custom"] is True and last["category"] == "custom"
    assert last["duration_s"] == voice["duration_s"] and last["created_at"] == voice["created_at"]

    job = seen["job"]
    assert job["status"] == "success", job
    assert job["voice_used"] == VOICE_ID and job["output_audio"] == str(answer)
    assert probe(answer, None).duration_s == pytest.approx(2.0, abs=0.01)

    assert seen["deleted"] == {
        "status": "ok",
        "voice_id": VOICE_ID,
        "deleted": True,
        "message": f"Deleted {VOICE_ID}.",
    }
    assert seen["listed_after"]["count"] == 18
    assert not any(v.get("custom") for v in seen["listed_after"]["voices"])

    refused = seen["job_after"]
    assert refused["status"] == "error", refused
    assert f"Unknown voice prompt '{VOICE_ID}'" in refused["error"]
    assert "no custom voice has this id" in refused["error"] and "Valid voices: NATF0.pt" in refused["error"]
    assert not gone.exists()
    again = seen["deleted_again"]
    assert again["status"] == "error" and "(404)" in again["error"] and VOICE_ID in again["error"]


def test_bad_voice_uploads_are_explained_and_store_nothing(
    start_web: Callable[..., Any], recordings: dict[str, Path], tmp_path: Path
) -> None:
    """No worker needed: the MCP server or the web tier refuses each one."""
    url = start_web().url
    voice = str(recordings["voice"])
    cases = {
        "no consent": ("create_voice", {"input_file": voice, "name": "Anna", "consent": False}),
        "silent": (
            "create_voice",
            {"input_file": str(recordings["silent"]), "name": "Anna", "consent": True},
        ),
        "missing file": (
            "create_voice",
            {"input_file": str(tmp_path / "missing.wav"), "name": "Anna", "consent": True},
        ),
        "no name": ("create_voice", {"input_file": voice, "name": " ", "consent": True}),
        "catalog voice": ("delete_voice", {"voice_id": "NATF2.pt"}),
        "unknown voice": ("delete_voice", {"voice_id": "custom-nobody"}),
    }

    async def scenario(client: Client) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        results = {case: await call(client, tool, **arguments) for case, (tool, arguments) in cases.items()}
        return tools, results

    tools, results = run_client(url, scenario)
    assert tools["create_voice"].input_schema["required"] == ["input_file", "name", "consent"]
    assert tools["create_voice"].annotations.destructive_hint is False
    assert tools["delete_voice"].annotations.destructive_hint is True
    assert "voice" in tools["create_voice"].output_schema["properties"]
    assert "custom" in tools["list_voices"].output_schema["$defs"]["VoiceInfo"]["properties"]

    for case, result in results.items():
        assert result["status"] == "error", (case, result)
        assert "unexpectedly" not in result["error"], (case, result)
    assert "consent must be true" in results["no consent"]["error"]
    assert "(400)" in results["silent"]["error"] and "silent or nearly so" in results["silent"]["error"]
    assert "does not exist" in results["missing file"]["error"]
    assert "(400)" in results["no name"]["error"] and "name is required" in results["no name"]["error"]
    assert (
        "(403)" in results["catalog voice"]["error"]
        and "ships with the model" in results["catalog voice"]["error"]
    )
    assert "(404)" in results["unknown voice"]["error"]
    assert custom_ids(url) == []


def test_check_voice_takes_custom_ids_in_any_case_and_leaves_their_existence_to_the_service() -> None:
    assert check_voice("natf2") == "NATF2.pt"
    assert check_voice(" Custom-Anna ") == "custom-anna"
    assert check_voice("custom-never-made") == "custom-never-made"
    for bad in ("NOBODY", "custom-a.wav", "custom-", "custom--a"):
        with pytest.raises(ToolError, match="custom voice's id") as refused:
            check_voice(bad)
        assert "NATF2.pt" in str(refused.value), bad

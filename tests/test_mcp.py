"""The MCP server (personaplex.mcp_server) over real stdio, against the real running service.

Every test drives `python -m personaplex.mcp_server` as a subprocess through the mcp SDK's Client (or
the official MCP Inspector CLI), pointed at `live_service`: a private redis-server, a Celery worker
on the tiny model and the web server, started once for the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from fixtures import REPO_ROOT, SPEECH_20S, free_port, speech_clip, wait_until
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from personaplex.audio import encode_wav, load, probe
from personaplex.catalog import ASSISTANT_PROMPT, DEFAULT_SEED, DEFAULT_VOICE
from personaplex.client import PersonaPlexClient

TOOLS = {
    "health_check",
    "get_gpu_status",
    "offload_gpu",
    "list_voices",
    "get_prompt_examples",
    "create_voice",
    "delete_voice",
    "process_audio",
    "submit_audio_job",
    "get_job_status",
    "get_job_result",
    "cancel_job",
}
READ_ONLY = {"health_check", "get_gpu_status", "list_voices", "get_prompt_examples", "get_job_status"}

CALL_TIMEOUT_S = 120.0
"""Longest any one test waits on an MCP call (the whole module runs in well under a minute)."""


# -- helpers -------------------------------------------------------------------------------------


def server_params(url: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "personaplex.mcp_server"],
        env={"PERSONAPLEX_API_URL": url, "PYTHONPATH": str(REPO_ROOT), **env},
        cwd=str(REPO_ROOT),
    )


def run_client(url: str, scenario: Callable[[Client], Awaitable[Any]], **env: str) -> Any:
    """Start the MCP server as a stdio subprocess, run `scenario(client)`, return its result."""

    async def main() -> Any:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with Client(server_params(url, **env)) as client:
                return await scenario(client)

    return anyio.run(main)


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured result; a tool that raised (isError) fails the test."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def wav_clip(path: Path, seconds: float) -> Path:
    """The first `seconds` of the 20 s recording, as a 16-bit WAV at `path`."""
    samples = load(SPEECH_20S)[: int(seconds * 24_000)]
    path.write_bytes(encode_wav(samples, 24_000, subtype="PCM_16"))
    return path


def run_in_memory(url: str, scenario: Callable[[Client], Awaitable[Any]]) -> Any:
    """Connect the mcp SDK's Client to the server in this process (no subprocess: the file checks
    need no protocol round trip), run `scenario(client)`, return its result."""
    from personaplex.mcp_server import McpConfig, create_server

    async def main() -> Any:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with Client(create_server(McpConfig(url))) as client:
                return await scenario(client)

    return anyio.run(main)


def rest(url: str) -> PersonaPlexClient:
    return PersonaPlexClient(url, timeout=10)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    (long := folder / "long.wav").write_bytes(speech_clip(120.0))  # busy for seconds: cancels land mid-job
    return {
        "short": wav_clip(folder / "short.wav", 3.0),
        "medium": wav_clip(folder / "medium.wav", 10.0),
        "long": long,
    }


# -- discovery and the service/catalog tools ------------------------------------------------------


@pytest.mark.slow
def test_tools_publish_schemas_annotations_and_seed_defaults(live_service: str) -> None:
    async def scenario(client: Client) -> list[Any]:
        return (await client.list_tools()).tools

    tools = {tool.name: tool for tool in run_client(live_service, scenario)}
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        assert tool.output_schema and "status" in tool.output_schema["properties"], name
        assert tool.description and not tool.description.startswith(" "), name
        assert tool.annotations is not None
        assert tool.annotations.read_only_hint is (name in READ_ONLY), name
    assert tools["offload_gpu"].annotations.idempotent_hint is True
    arguments = tools["process_audio"].input_schema["properties"]
    assert list(arguments) == ["input_file", "output_file", "voice_prompt", "text_prompt", "seed"]
    assert arguments["voice_prompt"]["default"] == DEFAULT_VOICE == "NATF2.pt"
    assert arguments["text_prompt"]["default"] == ASSISTANT_PROMPT
    assert arguments["seed"]["default"] == DEFAULT_SEED == 42424242
    assert tools["process_audio"].input_schema["required"] == ["input_file", "output_file"]
    assert "output_audio" in tools["process_audio"].output_schema["properties"]


@pytest.mark.slow
def test_service_and_catalog_tools(live_service: str) -> None:
    async def scenario(client: Client) -> dict[str, dict[str, Any]]:
        names = ["health_check", "get_gpu_status", "list_voices", "get_prompt_examples", "offload_gpu"]
        return {name: await call(client, name) for name in names}

    results = run_client(live_service, scenario)
    health = results["health_check"]
    assert health["status"] == "healthy" and health["workers"] == 1 and health["redis"] == "ok"
    assert health["api_url"] == live_service
    assert health["live_slots_free"] == 4 and health["live_waiting"] == 0  # PERSONAPLEX_MAX_LIVE
    gpu = results["get_gpu_status"]
    assert gpu["status"] == "ok" and gpu["worker_count"] == 1
    assert gpu["workers"][0]["worker"] == "live@test"
    assert gpu["live_sessions"] == 0 and gpu["workers"][0]["live_slots_free"] == 4
    voices = results["list_voices"]
    assert voices["status"] == "ok" and voices["count"] == 18 == len(voices["voices"])
    assert voices["default"] == "NATF2.pt"
    legacy = {"id": "NATF2.pt", "name": "Natural Female 2", "filename": "NATF2.pt"}
    assert legacy.items() <= voices["voices"][2].items()
    assert all(voice["id"].endswith(".pt") for voice in voices["voices"])
    assert voices["default"] in {voice["id"] for voice in voices["voices"]}
    prompts = results["get_prompt_examples"]
    assert prompts["status"] == "ok" and prompts["default"] == ASSISTANT_PROMPT
    assert "assistant" in {p["id"] for p in prompts["prompts"]}
    assert results["offload_gpu"]["status"] in ("offloaded", "not_loaded", "deferred")


# -- process_audio ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_process_audio_reports_progress_and_writes_the_answer(
    live_service: str, clips: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "new" / "folders" / "answer.wav"
    updates: list[tuple[float, float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((time.monotonic(), progress, total, message))

    async def scenario(client: Client) -> Any:
        return await client.call_tool(
            "process_audio",
            {"input_file": str(clips["long"]), "output_file": str(output), "voice_prompt": "VARM1"},
            progress_callback=on_progress,
        )

    result = run_client(live_service, scenario)
    assert not result.is_error, result.content
    answer = result.structured_content
    assert answer["status"] == "success", answer
    assert answer["output_audio"] == str(output)
    assert answer["voice_used"] == "VARM1.pt" and answer["text_prompt_used"] == ASSISTANT_PROMPT
    assert answer["duration_s"] == pytest.approx(120.0, abs=0.01)
    assert isinstance(answer["generated_text"], str) and len(answer["job_id"]) == 32
    assert answer["frames"] == 1500 and answer["timings"]["rtf"] > 0

    info = probe(output, None)
    assert info.format == "WAV" and info.sample_rate == 24_000 and info.channels == 1
    assert info.duration_s == pytest.approx(120.0, abs=0.01)
    assert load(output).std() > 0  # audio, not silence
    assert sorted(p.name for p in output.parent.iterdir()) == ["answer.wav"]  # no temporary left

    values = [progress for _, progress, _, _ in updates]
    assert len(updates) >= 3, updates
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    assert updates[-1][1] == updates[-1][2] == 1501  # 1500 frames, plus writing the answer
    assert any(value.is_integer() and 0 < value < 1500 for value in values), values  # frames generated
    assert all(f"Job {answer['job_id']}" in (message or "") for *_, message in updates)
    beats = [t for t, *_ in updates[:-1]]  # the last update follows the download, not a heartbeat
    assert max(b - a for a, b in zip(beats, beats[1:], strict=False)) < 2.0  # a heartbeat every 1 s


@pytest.mark.slow
def test_cancelling_the_call_cancels_the_job(
    live_service: str, clips: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "never.wav"
    messages: list[str] = []

    async def scenario(client: Client) -> dict[str, Any]:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")
            if "generating" in (message or ""):
                scope.cancel()

        with anyio.CancelScope() as scope:
            await client.call_tool(
                "process_audio",
                {"input_file": str(clips["long"]), "output_file": str(output)},
                progress_callback=on_progress,
            )
        assert scope.cancelled_caught
        # Stay connected until the job ends: closing the client would stop the server, which is
        # what sends the cancel over HTTP.
        job_id = messages[-1].split()[1].rstrip(":")
        return await anyio.to_thread.run_sync(
            lambda: rest(live_service).wait(job_id, timeout=30, poll_interval=0.2)
        )

    job = run_client(live_service, scenario)
    assert job["status"] == "cancelled", job
    assert not output.exists()


@pytest.mark.slow
def test_wait_cap_returns_pending_then_get_job_result_finishes(
    live_service: str, clips: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "later" / "answer.wav"

    async def scenario(client: Client) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        pending = await call(
            client, "process_audio", input_file=str(clips["medium"]), output_file=str(output)
        )
        statuses = ["written" if output.exists() else "not written"]
        while True:
            result = await call(client, "get_job_result", job_id=pending["job_id"], output_file=str(output))
            statuses.append(result["status"])
            if result["status"] != "pending":
                return pending, result, statuses
            await anyio.sleep(0.3)

    # A cap of 0 hands the job back at its first read: deterministic however fast the worker is.
    pending, result, statuses = run_client(live_service, scenario, PERSONAPLEX_MCP_MAX_WAIT="0")
    assert pending["status"] == "pending", pending
    assert pending["job_status"] in ("queued", "running")
    assert "get_job_result" in pending["message"]
    assert result["status"] == "success", result
    assert result["job_id"] == pending["job_id"] and result["output_audio"] == str(output)
    assert probe(output, None).duration_s == pytest.approx(10.0, abs=0.01)
    assert statuses[0] == "not written" and statuses[-1] == "success"
    assert set(statuses[1:-1]) <= {"pending"}


# -- the job tools for clients that cut long calls ----------------------------------------------------


@pytest.mark.slow
def test_submit_status_result_and_cancel(live_service: str, clips: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "answer.wav"

    async def scenario(client: Client) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        first = await call(
            client, "submit_audio_job", input_file=str(clips["short"]), voice_prompt="natm3", seed=7
        )
        seen["submitted"] = first
        statuses = []
        while True:
            status = await call(client, "get_job_status", job_id=first["job_id"])
            statuses.append(status["status"])
            if status["status"] not in ("queued", "running"):
                break
            await anyio.sleep(0.2)
        seen["statuses"], seen["final"] = statuses, status
        seen["result"] = await call(client, "get_job_result", job_id=first["job_id"], output_file=str(output))
        seen["cancel_finished"] = await call(client, "cancel_job", job_id=first["job_id"])

        # A long job, then a queued one behind it: cancel the queued one, then the running one. The
        # second job is submitted only once the first runs, so the worker cannot claim it into its batch.
        running = await call(client, "submit_audio_job", input_file=str(clips["long"]))
        while (await call(client, "get_job_status", job_id=running["job_id"]))["status"] == "queued":
            await anyio.sleep(0.1)
        queued = await call(client, "submit_audio_job", input_file=str(clips["short"]))
        seen["cancel_queued"] = await call(client, "cancel_job", job_id=queued["job_id"])
        seen["cancel_running"] = await call(client, "cancel_job", job_id=running["job_id"])
        while (status := await call(client, "get_job_status", job_id=running["job_id"]))[
            "status"
        ] == "running":
            await anyio.sleep(0.1)
        seen["running_final"] = status
        seen["result_cancelled"] = await call(
            client, "get_job_result", job_id=running["job_id"], output_file=str(tmp_path / "x.wav")
        )
        seen["unknown"] = await call(client, "get_job_status", job_id="0" * 32)
        return seen

    seen = run_client(live_service, scenario)
    submitted = seen["submitted"]
    assert submitted["status"] == "submitted" and submitted["job_status"] == "queued"
    assert submitted["voice_used"] == "NATM3.pt" and submitted["seed"] == 7
    assert submitted["input_duration_s"] == pytest.approx(3.0)
    assert set(seen["statuses"][:-1]) <= {"queued", "running"} and seen["statuses"][-1] == "succeeded"
    final = seen["final"]
    assert final["percent"] == 100.0 and final["duration_s"] == pytest.approx(3.0)
    assert isinstance(final["generated_text"], str) and "get_job_result" in final["message"]
    result = seen["result"]
    assert result["status"] == "success" and result["voice_used"] == "NATM3.pt" and result["seed"] == 7
    assert probe(output, None).duration_s == pytest.approx(3.0, abs=0.01)
    # The answer is the service's WAV byte for byte: the tool adds no bytes of its own to what a seed fixes.
    assert output.read_bytes() == rest(live_service).download_audio(submitted["job_id"])

    assert seen["cancel_finished"]["status"] == "error"
    assert "already succeeded" in seen["cancel_finished"]["error"]
    assert seen["cancel_queued"]["status"] == "cancelled"
    assert seen["cancel_running"]["status"] in ("cancel_requested", "cancelled")
    assert seen["running_final"]["status"] == "cancelled"
    assert seen["result_cancelled"]["status"] == "error" and "cancelled" in seen["result_cancelled"]["error"]
    assert seen["unknown"]["status"] == "error" and "doesn't exist" in seen["unknown"]["error"]


# -- failures are results, never exceptions ---------------------------------------------------------


def test_every_tool_reports_a_service_that_is_down(tmp_path: Path, clips: dict[str, Path]) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    job_id = "0" * 32
    calls = {
        "health_check": {},
        "get_gpu_status": {},
        "offload_gpu": {},
        "list_voices": {},
        "get_prompt_examples": {},
        "create_voice": {"input_file": str(clips["short"]), "name": "Anna", "consent": True},
        "delete_voice": {"voice_id": "custom-anna"},
        "process_audio": {"input_file": str(clips["short"]), "output_file": str(tmp_path / "a.wav")},
        "submit_audio_job": {"input_file": str(clips["short"])},
        "get_job_status": {"job_id": job_id},
        "get_job_result": {"job_id": job_id, "output_file": str(tmp_path / "b.wav")},
        "cancel_job": {"job_id": job_id},
    }
    assert set(calls) == TOOLS

    async def scenario(client: Client) -> dict[str, dict[str, Any]]:
        return {name: await call(client, name, **arguments) for name, arguments in calls.items()}

    for name, result in run_client(down, scenario).items():
        assert result["status"] == "error", (name, result)
        assert f"service at {down} is unreachable (connection refused)" in result["error"], name
        assert "PERSONAPLEX_API_URL" in result["error"], name


@pytest.mark.slow
def test_bad_inputs_are_explained(live_service: str, clips: dict[str, Path], tmp_path: Path) -> None:
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("not audio at all")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    good = str(clips["short"])
    out = str(tmp_path / "out.wav")
    cases = {
        "bad voice": ("process_audio", {"input_file": good, "output_file": out, "voice_prompt": "NOBODY"}),
        "bad voice (submit)": ("submit_audio_job", {"input_file": good, "voice_prompt": "NOBODY.pt"}),
        "missing file": ("process_audio", {"input_file": str(tmp_path / "missing.wav"), "output_file": out}),
        "directory": ("process_audio", {"input_file": str(tmp_path), "output_file": out}),
        "empty file": ("submit_audio_job", {"input_file": str(empty)}),
        "not audio": ("process_audio", {"input_file": str(not_audio), "output_file": out}),
        "unwritable output": ("process_audio", {"input_file": good, "output_file": str(a_file / "x.wav")}),
        "output is a folder": ("process_audio", {"input_file": good, "output_file": str(tmp_path)}),
        "unwritable result": (
            "get_job_result",
            {"job_id": "0" * 32, "output_file": str(a_file / "sub" / "x.wav")},
        ),
    }

    async def scenario(client: Client) -> dict[str, dict[str, Any]]:
        return {case: await call(client, tool, **arguments) for case, (tool, arguments) in cases.items()}

    before = {job["id"] for job in rest(live_service).list_jobs()}
    results = run_client(live_service, scenario)
    for case, result in results.items():
        assert result["status"] == "error", (case, result)
    assert "Unknown voice prompt 'NOBODY'" in results["bad voice"]["error"]
    assert "NATF2.pt" in results["bad voice"]["error"] and "VARM4.pt" in results["bad voice"]["error"]
    assert "NATF2.pt" in results["bad voice (submit)"]["error"]
    assert "does not exist" in results["missing file"]["error"]
    assert "not a regular file" in results["directory"]["error"]
    assert "is empty" in results["empty file"]["error"]
    assert "(400)" in results["not audio"]["error"]  # the service's own check, passed on
    assert "not writable" in results["unwritable output"]["error"]
    assert "is a directory" in results["output is a folder"]["error"]
    assert "not writable" in results["unwritable result"]["error"]
    # Nothing was queued for a request that could not succeed.
    assert {job["id"] for job in rest(live_service).list_jobs()} == before


# -- file handling: only regular files are read, only regular files or new names are written -------


def special_files(folder: Path) -> dict[str, Path]:
    """A character device, a FIFO, a socket and a symlink to a file elsewhere, in `folder`.

    The device is a private null device where mknod is allowed (root), else the system's /dev/null,
    which a user who cannot mknod cannot replace either: the test never risks the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    device = folder / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        device = Path("/dev/null")
    os.mkfifo(folder / "fifo.wav")
    os.mknod(folder / "socket.wav", stat.S_IFSOCK | 0o600)  # no bind(): its path length is limited
    (elsewhere := folder.parent / "elsewhere").mkdir(exist_ok=True)
    (target := elsewhere / "keep.wav").write_bytes(b"not to be touched")
    (folder / "link.wav").symlink_to(target)
    return {
        "device": device,
        "fifo": folder / "fifo.wav",
        "socket": folder / "socket.wav",
        "link": folder / "link.wav",
    }


def kinds(paths: dict[str, Path]) -> dict[str, int]:
    return {name: stat.S_IFMT(os.lstat(path).st_mode) for name, path in paths.items()}


EXPECTED_KINDS = {
    "device": stat.S_IFCHR,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "link": stat.S_IFLNK,
}
KIND_WORDS = {
    "device": "a character device",
    "fifo": "a FIFO",
    "socket": "a socket",
    "link": "a symbolic link",
}


@pytest.mark.slow
def test_get_job_result_never_replaces_a_device_fifo_socket_or_link(
    live_service: str, clips: dict[str, Path], tmp_path: Path
) -> None:
    """The answer is written by renaming a temporary file over the path: over a device, a FIFO or a
    link that rename would replace it (as root, /dev/null itself). Only regular files are replaced."""
    job = rest(live_service).submit_job(clips["short"])
    assert rest(live_service).wait(job["job_id"], timeout=60, poll_interval=0.2)["status"] == "succeeded"
    targets = special_files(tmp_path / "out")
    (old := tmp_path / "out" / "old.wav").write_bytes(b"an earlier answer")
    listing = sorted(p.name for p in (tmp_path / "out").iterdir())

    async def scenario(client: Client) -> dict[str, dict[str, Any]]:
        paths = {**targets, "old": old}
        return {
            name: await call(client, "get_job_result", job_id=job["job_id"], output_file=str(path))
            for name, path in paths.items()
        }

    results = run_in_memory(live_service, scenario)
    for name, words in KIND_WORDS.items():
        assert results[name]["status"] == "error", (name, results[name])
        assert f"is {words}" in results[name]["error"] and "not a regular file" in results[name]["error"]
    assert kinds(targets) == EXPECTED_KINDS
    assert (tmp_path / "elsewhere" / "keep.wav").read_bytes() == b"not to be touched"
    assert results["old"]["status"] == "success"  # documented: an existing file is replaced
    assert old.read_bytes() == rest(live_service).download_audio(job["job_id"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == listing  # no temporary left


@pytest.mark.slow
def test_a_link_put_at_the_output_path_while_the_job_runs_is_not_replaced(
    live_service: str, clips: dict[str, Path], tmp_path: Path
) -> None:
    """check_output passes a new path; the link appears at the first progress report, long before
    the answer is written: the last check, right before the rename, refuses it."""
    output = tmp_path / "answer.wav"
    target = tmp_path / "elsewhere.wav"
    target.write_bytes(b"not to be touched")

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if not output.is_symlink():
            output.symlink_to(target)

    async def scenario(client: Client) -> Any:
        return await client.call_tool(
            "process_audio",
            {"input_file": str(clips["short"]), "output_file": str(output)},
            progress_callback=on_progress,
        )

    result = run_in_memory(live_service, scenario)
    assert result.structured_content["status"] == "error", result.structured_content
    assert "is a symbolic link" in result.structured_content["error"]
    assert "get_job_result" in result.structured_content["error"]  # the answer can still be fetched
    assert output.is_symlink() and target.read_bytes() == b"not to be touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.wav", "elsewhere.wav"]


def test_inputs_and_outputs_that_must_not_be_used_are_refused_before_anything_is_sent(
    start_web: Callable[..., Any], clips: dict[str, Path], tmp_path: Path
) -> None:
    """Against a real service (no worker needed): every case is refused by the MCP server itself,
    quickly, with a clear error, and no job is created."""
    url = start_web().url
    with (sparse := tmp_path / "sparse.wav").open("wb") as handle:
        handle.truncate(1 << 30)  # 1 GB that takes no disk: reading it whole takes seconds
    (environ_link := tmp_path / "environ.wav").symlink_to("/proc/self/environ")
    (zero_link := tmp_path / "zero.wav").symlink_to("/dev/zero")
    specials = special_files(tmp_path / "specials")
    good, out = str(clips["short"]), str(tmp_path / "answer.wav")
    too_long = str(tmp_path / ("x" * 10_000))
    long_name = str(tmp_path / ("y" * 300) / "answer.wav")
    inputs = {
        "1 GB sparse": (str(sparse), "is 1,024.0 MB, over the service's upload limit of 200 MB"),
        "/proc/self/environ": ("/proc/self/environ", "is in /proc"),
        "link to /proc/self/environ": (str(environ_link), "is in /proc"),
        "link to /dev/zero": (str(zero_link), "is in /dev"),
        "/sys file": ("/sys/kernel/uevent_seqnum", "is in /sys"),
        "FIFO": (str(specials["fifo"]), "not a regular file (a FIFO"),
        "NUL": (good + "\x00.wav", "contains a NUL character"),
        "10,000 characters": (too_long, "bytes long, over the system's limit of 4095"),
        "300-byte name": (long_name, "has a name of 300 bytes"),
    }
    outputs = {
        "device": (str(specials["device"]), "is a character device, not a regular file"),
        "FIFO": (str(specials["fifo"]), "is a FIFO (named pipe), not a regular file"),
        "link": (str(specials["link"]), "is a symbolic link, not a regular file"),
        "in /dev": ("/dev/shm/answer.wav", "is in /dev"),
        "NUL": (out + "\x00", "contains a NUL character"),
        "10,000 characters": (too_long, "bytes long, over the system's limit of 4095"),
        "300-byte name": (long_name, "has a name of 300 bytes"),
    }

    async def timed(client: Client, tool: str, **arguments: Any) -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        result = await call(client, tool, **arguments)
        return time.monotonic() - started, result

    async def scenario(client: Client) -> dict[str, tuple[float, dict[str, Any]]]:
        results = {}
        for case, (path, _) in inputs.items():
            results[f"submit_audio_job input {case}"] = await timed(
                client, "submit_audio_job", input_file=path
            )
            results[f"process_audio input {case}"] = await timed(
                client, "process_audio", input_file=path, output_file=out
            )
        for case, (path, _) in outputs.items():
            results[f"process_audio output {case}"] = await timed(
                client, "process_audio", input_file=good, output_file=path
            )
            results[f"get_job_result output {case}"] = await timed(
                client, "get_job_result", job_id="0" * 32, output_file=path
            )
        return results

    results = run_in_memory(url, scenario)
    expected = {
        f"{tool} input {case}": words
        for case, (_, words) in inputs.items()
        for tool in ("submit_audio_job", "process_audio")
    }
    expected |= {
        f"{tool} output {case}": words
        for case, (_, words) in outputs.items()
        for tool in ("process_audio", "get_job_result")
    }
    for case, words in expected.items():
        seconds, result = results[case]
        assert result["status"] == "error" and words in result["error"], (case, result)
        assert "unexpectedly" not in result["error"], (case, result)
        assert seconds < 2.0, (case, seconds)  # refused from a stat, not after reading a gigabyte
    assert "neither read nor sent" in results["submit_audio_job input 1 GB sparse"][1]["error"]
    assert "PERSONAPLEX_MAX_UPLOAD_MB" in results["submit_audio_job input 1 GB sparse"][1]["error"]
    assert rest(url).list_jobs() == []
    assert kinds(specials) == EXPECTED_KINDS
    assert not Path("/dev/shm/answer.wav").exists()


@pytest.mark.slow
def test_a_failed_job_reports_the_workers_reason(
    live_service: str, clips: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A job whose stored input is gone when the worker reaches it: the upload was sound (so the
    service queued it), the worker fails it, and its reason reaches the MCP client.

    The job waits behind a long running one, so its input can be deleted before the worker gets to
    it; then the long one is cancelled to free the worker. An offload asked for meanwhile (deferred
    until the loop drains) keeps the running loop from taking the job into a free row: without it,
    continuous batching would claim the job within 0.1 s, before its input could be deleted.
    """
    api = rest(live_service)
    busy = api.submit_job(clips["long"])["job_id"]
    wait_until(lambda: api.get_job(busy)["status"] == "running", 60, what="the long job to start")
    assert api.offload()["status"] == "deferred"

    def delete_the_queued_input() -> str:
        job_id = wait_until(
            lambda: next((j["job_id"] for j in api.list_jobs(status="queued")), None), 30, interval=0.05
        )
        # pytest links "live-servicecurrent" to the newest live-service folder: one folder, two names
        found = tmp_path_factory.getbasetemp().glob(f"live-service*/data/jobs/{job_id}")
        folders = {folder.resolve() for folder in found}
        assert len(folders) == 1, folders
        shutil.rmtree(folders.pop())
        api.cancel_job(busy)
        return job_id

    async def scenario(client: Client) -> dict[str, Any]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(anyio.to_thread.run_sync, delete_the_queued_input)
            return await call(
                client, "process_audio", input_file=str(clips["short"]), output_file=str(tmp_path / "o.wav")
            )

    result = run_client(live_service, scenario)
    assert result["status"] == "error", result
    assert re.search(r"Job [0-9a-f]{32} failed: .*input is missing", result["error"]), result["error"]
    job_id = result["error"].split()[1]
    job = api.get_job(job_id)
    assert job["status"] == "failed" and "input is missing" in job["error"]
    assert not (tmp_path / "o.wav").exists()


# -- the official MCP Inspector CLI -------------------------------------------------------------------


INSPECTOR = "@modelcontextprotocol/inspector"


def _skip_or_fail(reason: str) -> None:
    """CI must run the Inspector (issue 4); a developer machine without npm may skip it."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def inspector_dir() -> Path:
    """A folder outside the repository with the Inspector installed from npm (once; CI caches it)."""
    if not (shutil.which("node") and shutil.which("npm") and shutil.which("npx")):
        _skip_or_fail("node, npm and npx are needed to run the MCP Inspector CLI")
    default = Path.home() / ".cache" / "personaplex-tests" / "inspector"
    folder = Path(os.environ.get("PERSONAPLEX_INSPECTOR_DIR") or default)
    if not (folder / "node_modules" / INSPECTOR / "package.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = ["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund", INSPECTOR]
        try:
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
            )
        except subprocess.TimeoutExpired:
            _skip_or_fail(f"`{' '.join(command)}` took over 300 s (no network?)")
        if done.returncode != 0:
            _skip_or_fail(f"`{' '.join(command)}` failed (no network?): {done.stderr[-500:]}")
    return folder


def inspector(folder: Path, url: str, *args: str) -> Any:
    """Run `npx @modelcontextprotocol/inspector --cli <our server> ARGS` and parse its JSON output."""
    command = ["npx", "--no", "--", INSPECTOR, "--cli", "-e", f"PERSONAPLEX_API_URL={url}"]
    command += ["-e", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "personaplex.mcp_server", *args]
    done = subprocess.run(
        command, cwd=folder, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.slow
def test_inspector_cli_lists_and_calls_tools(live_service: str, inspector_dir: Path) -> None:
    listed = inspector(inspector_dir, live_service, "--method", "tools/list")
    assert {tool["name"] for tool in listed["tools"]} == TOOLS
    assert all("outputSchema" in tool for tool in listed["tools"])

    health = inspector(inspector_dir, live_service, "--method", "tools/call", "--tool-name", "health_check")
    assert not health.get("isError") and health["structuredContent"]["status"] == "healthy"

    voices = inspector(inspector_dir, live_service, "--method", "tools/call", "--tool-name", "list_voices")
    assert not voices.get("isError") and voices["structuredContent"]["count"] == 18
    assert len(voices["structuredContent"]["voices"]) == 18


# -- configuration and progress arithmetic (no service needed) ------------------------------------


def test_config_reads_the_environment() -> None:
    from personaplex.mcp_server import McpConfig

    assert McpConfig.from_env({}) == McpConfig("http://localhost:8998", None, 600.0)
    env = {"PERSONAPLEX_API_URL": "http://gpu-box:9000/", "PERSONAPLEX_API_KEY": "k"}
    assert McpConfig.from_env({**env, "PERSONAPLEX_MCP_MAX_WAIT": "50"}) == McpConfig(
        "http://gpu-box:9000", "k", 50.0
    )
    assert McpConfig.from_env({"PERSONAPLEX_MCP_MAX_WAIT": "soon"}).max_wait_s == 600.0
    assert McpConfig.from_env({}).max_upload_bytes == 200 * 1024 * 1024  # the service's default
    assert McpConfig.from_env({"PERSONAPLEX_MAX_UPLOAD_MB": "0.5"}).max_upload_bytes == 512 * 1024
    assert McpConfig.from_env({"PERSONAPLEX_MAX_UPLOAD_MB": "lots"}).max_upload_mb == 200.0


def test_progress_values_always_rise_and_end_at_the_total() -> None:
    from personaplex.mcp_server import ProgressMeter

    meter = ProgressMeter()
    queued = {"status": "queued", "progress": {}, "input_duration_s": 2.0}
    loading = {
        "status": "running",
        "progress": {"phase": "load", "done": 0, "total": 1},
        "input_duration_s": 2.0,
    }
    records = [queued] * 5 + [loading] * 3
    records += [
        {"status": "running", "progress": {"phase": "generate", "done": d, "total": 26}}
        for d in (0, 0, 5, 5, 26)
    ]
    records += [{"status": "running", "progress": {"phase": "decode", "done": 0, "total": 1}}] * 3
    values = [meter.update(record) for record in records]
    assert values[0] == (0.0, 26) and values[8][1] == 27  # estimated 25 frames, then the worker's 26
    progress = [value for value, _ in values]
    assert all(b > a for a, b in zip(progress, progress[1:], strict=False)), progress
    assert all(value < total for value, total in values)
    assert meter.finish(records[-1]) == (27.0, 27)

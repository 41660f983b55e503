"""The `personaplex` CLI as a subprocess, against the real service (`live_service`: web server, its own
Redis and a real worker on the tiny model)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import REPO_ROOT, SPEECH_40S, free_port, speaker_recording, speech_clip, wait_until

from personaplex.audio import encode_wav, load, probe
from personaplex.client import PersonaPlexClient

CLIP_SECONDS = 0.5
BATCH_FILES = 20


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 20 different 0.5 s clips of real speech, two of them in a subfolder."""
    folder = tmp_path_factory.mktemp("inputs")
    samples = load(SPEECH_40S)
    step = int(CLIP_SECONDS * 24_000)
    for i in range(BATCH_FILES):
        path = folder / ("sub" if i >= 18 else "") / f"q{i:02d}.wav"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode_wav(samples[i * step : (i + 1) * step], 24_000, subtype="PCM_16"))
    (folder / "notes.txt").write_text("not audio: a folder scan skips it")
    return folder


def personaplex(*args: str | Path, url: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "personaplex.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=_env(url),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "PERSONAPLEX_API_URL": url, "PYTHONPATH": str(REPO_ROOT)}


def _batch_ids(stderr: str) -> list[str]:
    return re.findall(r"Batch ([0-9a-f]{32}): \d+ jobs queued", stderr)


def _job_count(url: str) -> int:
    return len(PersonaPlexClient(url).list_jobs(limit=500))


@pytest.mark.slow
def test_a_20_file_batch_finishes_the_archive_matches_and_a_rerun_skips_everything(
    live_service: str, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # A fast poll, so the bars catch jobs mid-run even when short jobs take a fraction of a second.
    command = (
        "submit",
        inputs,
        "--out",
        out,
        "--seed",
        "7",
        "--voice",
        "NATM1",
        "--progress",
        "--poll-interval",
        "0.05",
    )
    first = personaplex(*command, url=live_service)
    assert first.returncode == 0, first.stderr
    stems = [f"q{i:02d}" for i in range(BATCH_FILES)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{e}" for s in stems for e in (".wav", ".json")
    )
    for stem in stems:
        assert probe(out / f"{stem}.wav").duration_s > 0
        document = json.loads((out / f"{stem}.json").read_text())
        assert {"job_id", "text", "frames"} <= set(document)
    assert "20 done, 0 failed, 0 skipped" in first.stderr
    assert "frame" in first.stderr and "batch" in first.stderr  # the bars were drawn

    (batch_id,) = _batch_ids(first.stderr)
    client = PersonaPlexClient(live_service)
    batch = client.get_batch(batch_id)
    assert batch["counts"]["succeeded"] == BATCH_FILES
    job = client.get_job(batch["jobs"][0]["job_id"])
    assert job["params"]["seed"] == 7 and job["params"]["voice_prompt"] == "NATM1.pt"

    archive = zipfile.ZipFile(io.BytesIO(client.download_batch_archive(batch_id)))  # type: ignore[arg-type]
    assert set(archive.namelist()) == {p.name for p in out.iterdir()} | {"_batch.json"}
    for path in out.iterdir():
        if path.suffix == ".wav":
            assert archive.read(path.name) == path.read_bytes(), path.name
        else:
            assert json.loads(archive.read(path.name)) == json.loads(path.read_text()), path.name
    saved = client.download_batch_archive(batch_id, tmp_path / "batch.zip")
    assert zipfile.ZipFile(saved).namelist() == archive.namelist()

    jobs_before = _job_count(live_service)
    rerun = personaplex(*command, url=live_service)
    assert rerun.returncode == 0, rerun.stderr
    assert "Skipping 20 of 20 inputs" in rerun.stderr and "Nothing to do." in rerun.stderr
    assert _job_count(live_service) == jobs_before

    (out / "q03.wav").unlink()
    (out / "q11.json").unlink()
    resumed = personaplex(*command, url=live_service)
    assert resumed.returncode == 0, resumed.stderr
    assert "Skipping 18 of 20 inputs" in resumed.stderr and "2 done, 0 failed, 18 skipped" in resumed.stderr
    assert (out / "q03.wav").is_file() and (out / "q11.json").is_file()
    assert _job_count(live_service) == jobs_before + 2


def test_exit_codes_for_usage_unreachable_service_and_bad_input(inputs: Path, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    usage = personaplex("submit", inputs, url=down)  # no --out
    assert usage.returncode == 2 and "--out" in usage.stderr
    both = personaplex(
        "submit", inputs, "--out", tmp_path, "--prompt", "x", "--prompt-file", "p.txt", url=down
    )
    assert both.returncode == 2

    missing = personaplex("submit", tmp_path / "nothing-here.wav", "--out", tmp_path / "out", url=down)
    assert missing.returncode == 2 and "nothing-here.wav: no such file or folder" in missing.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    not_audio = personaplex("submit", inputs / "q00.wav", bad, "--out", tmp_path / "out", url=down)
    assert not_audio.returncode == 2 and "bad.wav" in not_audio.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert personaplex("submit", empty, "--out", tmp_path / "out", url=down).returncode == 2

    unreachable = personaplex("submit", inputs / "q00.wav", "--out", tmp_path / "out", url=down)
    assert unreachable.returncode == 3 and "Cannot reach" in unreachable.stderr
    for command in (("voices",), ("status", "0" * 32), ("gpu",), ("workers",)):
        assert personaplex(*command, url=down).returncode == 3, command
    assert "exit codes:" in personaplex("--help", url=down).stdout


def test_workers_without_a_live_worker_is_exit_3(start_web: Callable[..., Any]) -> None:
    url = start_web().url
    none = personaplex("workers", url=url)
    assert none.returncode == 3 and "no live workers" in none.stderr
    as_json = personaplex("workers", "--json", url=url)
    assert as_json.returncode == 3 and json.loads(as_json.stdout) == []


def test_voice_add_lists_the_voice_and_voice_rm_deletes_it(
    start_web: Callable[..., Any], tmp_path: Path
) -> None:
    """No worker needed: custom voices live in the web tier and Redis."""
    url = start_web().url
    voice = tmp_path / "anna.wav"
    voice.write_bytes(speaker_recording())

    added = personaplex("voice-add", voice, "--name", "Anna (studio)", "--consent", url=url)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("created custom-anna-studio  Anna (studio) (custom, 3.5 s)")
    assert "--voice custom-anna-studio" in added.stdout

    listed = personaplex("voices", url=url)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 19 and lines[-1] == "custom-anna-studio Anna (studio) (custom, 3.5 s)"
    assert lines[2] == "NATF2.pt           Natural Female 2 (natural)"  # the ids in one column
    as_json = json.loads(personaplex("voices", "--json", url=url).stdout)
    assert as_json[-1]["id"] == "custom-anna-studio" and as_json[-1]["custom"] is True

    removed = personaplex("voice-rm", "custom-anna-studio", url=url)
    assert removed.returncode == 0 and removed.stdout.strip() == "deleted custom-anna-studio"
    assert len(personaplex("voices", url=url).stdout.splitlines()) == 18


def test_voice_add_and_voice_rm_errors_are_exit_2(start_web: Callable[..., Any], tmp_path: Path) -> None:
    url = start_web().url
    silent = tmp_path / "silent.wav"
    silent.write_bytes(encode_wav(np.zeros(3 * 24_000, np.float32), 24_000, subtype="PCM_16"))
    no_consent = personaplex("voice-add", silent, "--name", "Anna", url=url)
    assert no_consent.returncode == 2 and "--consent is required" in no_consent.stderr
    missing = personaplex("voice-add", tmp_path / "nope.wav", "--name", "Anna", "--consent", url=url)
    assert (
        missing.returncode == 2 and "nope.wav: cannot read it (No such file or directory)" in missing.stderr
    )
    refused = personaplex("voice-add", silent, "--name", "Anna", "--consent", url=url)
    assert refused.returncode == 2 and "(400): The voice recording is silent" in refused.stderr
    unknown = personaplex("voice-rm", "custom-nobody", url=url)
    assert unknown.returncode == 2 and "(404)" in unknown.stderr and "custom-nobody" in unknown.stderr
    catalog = personaplex("voice-rm", "NATF2.pt", url=url)
    assert catalog.returncode == 2 and "ships with the model" in catalog.stderr
    down = personaplex("voice-rm", "custom-nobody", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "Cannot reach" in down.stderr


@pytest.mark.slow
def test_the_service_refusing_input_is_exit_2_and_queues_nothing(
    live_service: str, inputs: Path, tmp_path: Path
) -> None:
    before = _job_count(live_service)
    refused = personaplex("submit", inputs, "--out", tmp_path / "out", "--voice", "NOBODY", url=live_service)
    assert refused.returncode == 2 and "Unknown voice prompt 'NOBODY'" in refused.stderr
    assert _job_count(live_service) == before


@pytest.mark.slow
def test_ctrl_c_without_a_terminal_cancels_the_remaining_jobs(
    live_service: str, inputs: Path, tmp_path: Path
) -> None:
    # q00 leads the first batch and keeps the worker busy for seconds, so most jobs are still queued
    # when the cancel lands, however fast the CPU.
    folder = shutil.copytree(inputs, tmp_path / "inputs")
    (folder / "q00.wav").write_bytes(speech_clip(120.0))
    process = subprocess.Popen(
        [sys.executable, "-m", "personaplex.cli", "submit", str(folder), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        env=_env(live_service),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines: list[str] = []
    wait_until(
        lambda: lines.append(process.stderr.readline()) or "jobs queued" in lines[-1], 60, what="queued"
    )
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 130, "".join(lines) + rest
    assert "stdin is not a terminal: cancelling" in rest
    (batch_id,) = _batch_ids("".join(lines))
    client = PersonaPlexClient(live_service)
    batch: dict[str, Any] = wait_until(  # type: ignore[assignment]
        lambda: (b := client.get_batch(batch_id))["finished"] and b, 60, what="the batch to stop"
    )
    assert batch["counts"]["cancelled"] >= 10, batch["counts"]
    written = {p.stem for p in (tmp_path / "out").glob("*.wav")}
    assert written == {p.stem for p in (tmp_path / "out").glob("*.json")}
    assert written <= {e["output"] for e in batch["jobs"] if e["status"] == "succeeded"}


# A SIGINT raised inside the CLI at one exact point, so each window is hit every run, not by luck.
# `raise_signal` runs the Python-level handler before it returns, i.e. inside the hooked code.
SIGINT_AT = r"""
import signal, sys
import urllib3.response
from personaplex import cli
from personaplex.client import PersonaPlexClient

point = sys.argv.pop(1)
armed = False

def ctrl_c():
    signal.raise_signal(signal.SIGINT)

write = cli.BatchRun._write
def _write(self, message):
    global armed
    write(self, message)
    if "jobs queued" in message:
        armed = True
        if point == "queued":
            ctrl_c()
cli.BatchRun._write = _write

if point == "finalizer":
    # The IOBase finalizer of each HTTP response reads `closed` when the response is freed (at the end
    # of every request) and silently drops any exception, a KeyboardInterrupt included.
    closed = urllib3.response.HTTPResponse.closed
    def closed_in_finalizer(self):
        global armed
        if armed:
            armed = False
            ctrl_c()
        return closed.fget(self)
    urllib3.response.HTTPResponse.closed = property(closed_in_finalizer)

if point == "upload":
    submit = PersonaPlexClient.submit_batch
    def submit_batch(self, *args, **kwargs):
        answer = submit(self, *args, **kwargs)
        ctrl_c()  # the service has queued the jobs; the CLI has not yet seen their ids
        return answer
    PersonaPlexClient.submit_batch = submit_batch

sys.exit(cli.main())
"""


@pytest.mark.parametrize("point", ["queued", "finalizer", "upload"])
def test_ctrl_c_at_any_point_cancels_every_job_and_exits_130(
    start_web: Callable[..., Any], inputs: Path, tmp_path: Path, point: str
) -> None:
    """No worker runs, so the jobs stay queued: a lost SIGINT shows as a CLI that never ends."""
    url = start_web().url
    files = [inputs / f"q{i:02d}.wav" for i in range(4)]
    command = [sys.executable, "-c", SIGINT_AT, point, "submit", *map(str, files), "--out", str(tmp_path)]
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=_env(url),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the SIGINT at {point!r} was lost: the CLI kept waiting\n{exc.stderr}")
    assert done.returncode == 130, done.stderr
    assert "stdin is not a terminal: cancelling the 4 unfinished jobs" in done.stderr, done.stderr
    jobs = PersonaPlexClient(url).list_jobs()
    assert len(jobs) == 4 and {job["status"] for job in jobs} == {"cancelled"}, jobs


@pytest.mark.slow
def test_status_catalog_gpu_and_workers(live_service: str, inputs: Path, tmp_path: Path) -> None:
    client = PersonaPlexClient(live_service)
    batch = client.submit_batch([inputs / "q00.wav", inputs / "q01.wav"], seed=1)
    for entry in batch["inputs"]:
        assert client.wait(entry["job_id"], timeout=60, poll_interval=0.2)["status"] == "succeeded"

    job = personaplex("status", batch["inputs"][0]["job_id"], url=live_service)
    assert job.returncode == 0 and "succeeded" in job.stdout and "q00.wav" in job.stdout
    whole = personaplex("status", batch["batch_id"], "--json", url=live_service)
    assert whole.returncode == 0 and json.loads(whole.stdout)["counts"]["succeeded"] == 2
    unknown = personaplex("status", "f" * 32, url=live_service)
    assert unknown.returncode == 2 and "no job or batch" in unknown.stderr

    (long := tmp_path / "long.wav").write_bytes(speech_clip(300.0))  # still running when the cancel lands
    cancelled = client.submit_batch([long])
    client.cancel_batch(cancelled["batch_id"])
    wait_until(lambda: client.get_batch(cancelled["batch_id"])["finished"], 30, what="the cancel")
    failed = personaplex("status", cancelled["batch_id"], url=live_service)
    assert failed.returncode == 1 and "1 cancelled" in failed.stdout

    voices = personaplex("voices", url=live_service)
    assert voices.returncode == 0 and len(voices.stdout.splitlines()) == 18
    assert "NATF2.pt   Natural Female 2 (natural)" in voices.stdout.splitlines()
    prompts = personaplex("prompts", "--json", url=live_service)
    assert prompts.returncode == 0 and any(p["id"] == "assistant" for p in json.loads(prompts.stdout))

    workers = personaplex("workers", "--json", url=live_service)
    assert workers.returncode == 0, workers.stderr
    (worker,) = json.loads(workers.stdout)
    name = worker["worker"]
    assert personaplex("workers", url=live_service).stdout.startswith(name)
    gpu = personaplex("gpu", url=live_service)
    assert gpu.returncode == 0 and "workers: 1" in gpu.stdout and name in gpu.stdout
    assert (
        json.loads(personaplex("gpu", "--worker", name, "--json", url=live_service).stdout)["worker"] == name
    )
    assert personaplex("gpu", "--worker", "nobody@nowhere", url=live_service).returncode == 2
    offload = personaplex("gpu", "--offload", "--worker", name, url=live_service)
    assert offload.returncode == 0 and "offload:" in offload.stdout

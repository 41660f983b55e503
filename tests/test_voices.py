"""Custom voices end to end: uploaded over real HTTP, used by id on a real Celery worker.

The golden cases whose voice is a WAV are the test of fidelity: their `voice.wav`, uploaded as a
custom voice, gives the reference's output exactly, in a job and in a live conversation. Then, on
the tiny model, a job with a custom voice gives the same bytes as `python -m personaplex.offline
--voice-prompt that.wav` (a 44.1 kHz stereo file, so the decoding counts too), in a batch as alone;
the codes a worker made are stored and reused; a voice deleted while its job is queued fails the
job with a reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from chat_client import ChatClient
from fixtures import SPEECH_20S, WorkerProcess, wait_for_job
from test_chat import case_query
from test_golden import CASES, GoldenCase
from test_offline_cli import run_offline_cli
from web_helpers import Live

from personaplex import audio as audio_io
from personaplex.custom_voices import AUDIO_FIELD, CODES_FIELD_PREFIX
from personaplex.jobs import JobStatus, Keys
from personaplex.params import FRAME_SIZE, SAMPLE_RATE

StartWorker = Callable[..., WorkerProcess]
WAV_VOICE_CASES = [case for case in CASES if case.spec["voice_prompt"].endswith(".wav")]
SERVICE_LIMITS = {"max_upload_mb": 8.0, "max_audio_seconds": 60.0, "offline_timeout": 120.0}


def upload_voice(live: Live, data: bytes, name: str) -> str:
    answer = live.post(
        "/api/voices", files={"file": ("voice.wav", data)}, data={"name": name, "consent": "yes"}
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def run_job(live: Live, audio: bytes, timeout: float = 180.0, **fields: Any) -> tuple[bytes, list[str]]:
    """Submit, wait for success; the output WAV's bytes and the per-frame text."""
    answer = live.submit(audio, **fields)
    assert answer.status_code == 202, answer.text
    job = wait_for_job(live.jobs, answer.json()["job_id"], timeout=timeout)
    assert job.status is JobStatus.SUCCEEDED, job.error
    wav = live.get(f"/api/jobs/{job.id}/audio").content
    return wav, live.get(f"/api/jobs/{job.id}/text").json()["frames"]


def case_form(case: GoldenCase, voice_id: str) -> dict[str, Any]:
    spec = case.spec
    form = {"voice_prompt": voice_id, "text_prompt": spec.get("text_prompt", ""), "greedy": "true"}
    return {**form, **{key: spec[key] for key in ("seed", "temp_text", "topk_text") if key in spec}}


def assert_golden(case: GoldenCase, audio: np.ndarray, text: list[str]) -> None:
    expected_text = json.loads((case.folder / "expected_text.json").read_text())
    expected_audio, _ = sf.read(case.folder / "expected.wav", dtype="float32")
    assert text[: len(expected_text)] == expected_text, case.name
    assert float(np.abs(audio[: len(expected_audio)] - expected_audio).max()) <= 1e-4, case.name


@pytest.mark.slow
@pytest.mark.parametrize("case", WAV_VOICE_CASES, ids=[case.name for case in WAV_VOICE_CASES])
def test_an_uploaded_voice_gives_the_reference_output_in_a_job_and_a_conversation(
    case: GoldenCase, serve: Callable[..., Live], start_worker: StartWorker, redis_client: Any
) -> None:
    live = serve(**SERVICE_LIMITS)
    start_worker("gpu0", PERSONAPLEX_MODEL=str(case.checkpoint))
    voice_id = upload_voice(live, (case.folder / "voice.wav").read_bytes(), name=case.name)

    wav, text = run_job(live, case.input.read_bytes(), **case_form(case, voice_id))
    assert_golden(case, audio_io.load(wav), text)
    stored = redis_client.hkeys(Keys.voice(voice_id))
    assert any(key.startswith(CODES_FIELD_PREFIX.encode()) for key in stored), stored  # prepared once

    client = ChatClient(live.url, **{**case_query(case), "voice_prompt": voice_id}).connect()
    samples = audio_io.load(case.input, SAMPLE_RATE)
    frames = -(-len(samples) // FRAME_SIZE)
    client.send_frames(samples)
    client.wait_for_audio(frames)
    client.hang_up()
    client.wait_closed()
    expected_text = json.loads((case.folder / "expected_text.json").read_text())
    assert client.received.text == [t for t in expected_text if t not in ("PAD", "EPAD")], case.name
    expected_audio, _ = sf.read(case.folder / "expected.wav", dtype="float32")
    assert float(np.abs(client.received.pcm()[: len(expected_audio)] - expected_audio).max()) <= 1e-4


@pytest.fixture(scope="module")
def voice_44k_stereo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three seconds of speech as a 44.1 kHz stereo WAV, the two channels different."""
    import soxr

    speech = audio_io.load(SPEECH_20S)[5 * SAMPLE_RATE : 8 * SAMPLE_RATE]  # where it speaks
    left = soxr.resample(speech, SAMPLE_RATE, 44_100)
    path = tmp_path_factory.mktemp("voice") / "speaker.wav"
    sf.write(path, np.stack([left, 0.5 * left[::-1]], axis=1), 44_100, subtype="PCM_16")
    return path


def offline_cli(
    checkpoint: Path, question: Path, voice: Path, persona: str, out: Path
) -> tuple[bytes, list[str]]:
    """`python -m personaplex.offline --voice-prompt voice --greedy`: its WAV's bytes and its text."""
    out.mkdir()
    args = ["--model", str(checkpoint), "--device", "cpu", "--greedy", "--text-prompt", persona]
    args += ["--input-wav", str(question), "--voice-prompt", str(voice)]
    args += ["--output-wav", str(out / "a.wav"), "--output-text", str(out / "a.json")]
    run = run_offline_cli(args, out)
    assert run.returncode == 0, run.stderr
    return (out / "a.wav").read_bytes(), json.loads((out / "a.json").read_text())


@pytest.mark.slow
def test_a_custom_voice_job_equals_the_offline_cli_with_that_wav_and_its_codes_are_reused(
    serve: Callable[..., Live],
    start_worker: StartWorker,
    tiny_checkpoint: Path,
    voice_44k_stereo: Path,
    redis_client: Any,
    tmp_path: Path,
) -> None:
    question = tmp_path / "question.wav"
    question.write_bytes(audio_io.encode_wav(audio_io.load(SPEECH_20S)[7 * SAMPLE_RATE : 9 * SAMPLE_RATE]))
    expected = offline_cli(tiny_checkpoint, question, voice_44k_stereo, "You are Anna.", tmp_path / "anna")

    live = serve(**SERVICE_LIMITS)
    start_worker("gpu0")
    voice_id = upload_voice(live, voice_44k_stereo.read_bytes(), name="Anna")
    form = {"voice_prompt": voice_id, "greedy": "true", "text_prompt": "You are Anna."}
    assert run_job(live, question.read_bytes(), **form) == expected
    offline = live.post(
        "/api/offline", files={"file": ("q.wav", question.read_bytes())}, data=form, timeout=150
    )
    assert offline.status_code == 200 and offline.content == expected[0], offline.text[:200]
    assert json.loads(offline.headers["X-Text-Output"]) == [
        t for t in expected[1] if t not in ("PAD", "EPAD")
    ]

    # A batch row with the voice, beside a row with a catalog voice, gives the same bytes.
    batch = live.post(
        "/api/batches",
        files=[("files", ("a.wav", question.read_bytes())), ("files", ("b.wav", question.read_bytes()))],
        data={**form, "per_file": json.dumps({"b.wav": {"voice_prompt": "NATM1"}})},
    )
    assert batch.status_code == 202, batch.text
    rows = batch.json()["jobs"]
    jobs = [wait_for_job(live.jobs, rows[name], timeout=180) for name in ("a.wav", "b.wav")]
    assert (
        all(job.status is JobStatus.SUCCEEDED for job in jobs) and jobs[0].params["voice_prompt"] == voice_id
    )
    assert live.get(f"/api/jobs/{rows['a.wav']}/audio").content == expected[0]

    # The codes are what later jobs use: with the recording gone, a new persona (no cached prompt
    # state) still conditions on the voice, and gives what the offline CLI gives with that persona.
    redis_client.hset(Keys.voice(voice_id), AUDIO_FIELD, b"not audio any more")
    other = {**form, "text_prompt": "You are Anna, a pilot."}
    wav, text = run_job(live, question.read_bytes(), **other)
    assert text != expected[1] or wav != expected[0]
    pilot = offline_cli(tiny_checkpoint, question, voice_44k_stereo, other["text_prompt"], tmp_path / "pilot")
    assert (wav, text) == pilot


@pytest.mark.slow
def test_a_job_queued_with_a_voice_deleted_before_it_runs_fails_saying_so(
    serve: Callable[..., Live], start_worker: StartWorker, voice_44k_stereo: Path
) -> None:
    live = serve(**SERVICE_LIMITS)
    voice_id = upload_voice(live, voice_44k_stereo.read_bytes(), name="Brief")
    answer = live.submit(audio_io.encode_wav(np.zeros(SAMPLE_RATE, np.float32)), voice_prompt=voice_id)
    assert answer.status_code == 202, answer.text
    assert live.delete(f"/api/voices/{voice_id}").status_code == 200
    start_worker("gpu0")
    job = wait_for_job(live.jobs, answer.json()["job_id"], timeout=120)
    assert job.status is JobStatus.FAILED
    assert voice_id in job.error and "deleted" in job.error, job.error

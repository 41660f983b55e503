"""`python -m personaplex.offline`, the drop-in for the reference's CLI, as a real subprocess on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch  # noqa: F401 (the engine extra must be installed)
from fixtures import SPEECH_20S

from personaplex.engine.core import Engine
from personaplex.params import FRAME_SIZE, SAMPLE_RATE, GenerationParams

REPO_ROOT = Path(__file__).resolve().parent.parent
INPUT_RATE = 16000
INPUT_SECONDS = 1.3


@pytest.fixture(scope="module")
def input_16k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    speech, rate = sf.read(SPEECH_20S, dtype="float32")
    piece = soxr.resample(speech[rate : rate + int(INPUT_SECONDS * rate)], rate, INPUT_RATE)
    path = tmp_path_factory.mktemp("cli") / "question.wav"
    sf.write(path, piece, INPUT_RATE)
    return path


def run_offline_cli(args: list[str], cwd: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **environ}
    env.pop("PERSONAPLEX_MODEL", None)
    return subprocess.run(
        [sys.executable, "-m", "personaplex.offline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _flags(**options: str) -> list[str]:
    """--input-wav X style arguments from keyword arguments (input_wav=X)."""
    return [part for key, value in options.items() for part in (f"--{key.replace('_', '-')}", value)]


def test_cli_writes_wav_and_per_frame_text(
    tiny_checkpoint: Path, tiny_engine: Engine, input_16k: Path, tmp_path: Path
) -> None:
    out_wav, out_json = tmp_path / "out" / "answer.wav", tmp_path / "answer.json"
    args = _flags(
        input_wav=str(input_16k),
        output_wav=str(out_wav),
        output_text=str(out_json),
        voice_prompt="NATM1.pt",
        text_prompt="You enjoy having a good conversation.",
        model=str(tiny_checkpoint),
        device="cpu",
    )
    done = run_offline_cli([*args, "--greedy"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stderr  # the progress bar goes to stderr
    assert done.stdout == ""

    info = sf.info(out_wav)
    input_info = sf.info(input_16k)
    assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
    assert abs(info.frames / SAMPLE_RATE - input_info.frames / input_info.samplerate) <= 1 / INPUT_RATE
    frames = json.loads(out_json.read_text())
    assert isinstance(frames, list) and all(isinstance(text, str) for text in frames)
    assert len(frames) == math.ceil(info.frames / FRAME_SIZE)

    # The CLI writes what the engine produces for the same request.
    params = GenerationParams(
        voice_prompt="NATM1.pt", text_prompt="You enjoy having a good conversation.", greedy=True
    )
    expected = tiny_engine.process(input_16k, params)
    assert frames == expected.text_frames
    written, _ = sf.read(out_wav, dtype="float32")
    assert float(np.abs(written - expected.audio).max()) <= 1e-4


def test_cli_bad_voice_exits_with_a_clear_message(
    tiny_checkpoint: Path, input_16k: Path, tmp_path: Path
) -> None:
    out_wav = tmp_path / "never.wav"
    args = _flags(
        input_wav=str(input_16k),
        output_wav=str(out_wav),
        output_text=str(tmp_path / "never.json"),
        voice_prompt="NOBODY.pt",
        model=str(tiny_checkpoint),
        device="cpu",
    )
    done = run_offline_cli(args, cwd=tmp_path)
    assert done.returncode != 0
    assert "Unknown voice prompt 'NOBODY.pt'" in done.stderr
    assert "NATF2.pt" in done.stderr  # lists the valid voices
    assert "Traceback" not in done.stderr
    assert not out_wav.exists()


def test_cli_runs_with_the_same_seed_write_the_same_bytes(
    tiny_checkpoint: Path, input_16k: Path, tmp_path: Path
) -> None:
    def run(name: str) -> bytes:
        out_wav = tmp_path / f"{name}.wav"
        args = _flags(
            input_wav=str(input_16k),
            output_wav=str(out_wav),
            output_text=str(tmp_path / f"{name}.json"),
            voice_prompt="NATF2.pt",
            seed="1234",
            model=str(tiny_checkpoint),
            device="cpu",
        )
        done = run_offline_cli(args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return out_wav.read_bytes()

    first = run("first")
    time.sleep(1.1)  # a write-time stamp (libsndfile's PEAK chunk) has second resolution
    assert run("second") == first
    assert (tmp_path / "second.json").read_bytes() == (tmp_path / "first.json").read_bytes()


def test_a_malformed_setting_is_the_services_start_up_error(input_16k: Path, tmp_path: Path) -> None:
    """CPU_OFFLOAD=maybe is refused as web and worker refuse it, not silently read as false."""
    args = _flags(
        input_wav=str(input_16k),
        output_wav=str(tmp_path / "never.wav"),
        output_text=str(tmp_path / "never.json"),
        voice_prompt="NATF2.pt",
    )
    done = run_offline_cli(args, cwd=tmp_path, CPU_OFFLOAD="maybe")
    assert done.returncode == 2
    assert "CPU_OFFLOAD" in done.stderr and "'maybe'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "never.wav").exists()


def test_sampling_defaults_are_the_jobs() -> None:
    from personaplex.offline import build_parser
    from personaplex.settings import Settings

    args = build_parser(Settings(device="cpu", cpu_offload=True, model="m")).parse_args(
        ["--input-wav", "i", "--output-wav", "o", "--output-text", "t", "--voice-prompt", "v"]
    )
    defaults = GenerationParams()
    for name in ("text_prompt", "greedy", "temp_audio", "temp_text", "topk_audio", "topk_text"):
        assert getattr(args, name) == getattr(defaults, name), name
    assert (args.device, args.cpu_offload, args.model) == ("cpu", True, "m")

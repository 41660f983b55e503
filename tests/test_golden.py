"""Fidelity: every golden case of ../shared/golden reproduced exactly (README there).

What NVIDIA's reference produced from a tiny random checkpoint with greedy decoding: identical tokens
and per-frame text, audio within 1e-4 max abs. This is the test that says we run PersonaPlex, so its
tolerances never get loosened. Cases are discovered, so a different set of cases (other sizes, seeds,
contexts) is checked the same way; a case may carry its own `checkpoint/` folder (or name one in
case.json's "checkpoint", relative to the golden folder). PERSONAPLEX_GOLDEN_DIR points elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fixtures import SHARED_DIR

torch = pytest.importorskip("torch")

from personaplex.engine import Engine, wrap_with_system_tags  # noqa: E402
from personaplex.params import FRAME_SIZE, GenerationParams  # noqa: E402

GOLDEN = Path(os.environ.get("PERSONAPLEX_GOLDEN_DIR") or SHARED_DIR / "golden")
CASES_DIR = GOLDEN / "cases"
AUDIO_TOLERANCE = 1e-4
PARAM_KEYS = ("seed", "temp_audio", "temp_text", "topk_audio", "topk_text")


def _case_names() -> list[str]:
    if not CASES_DIR.is_dir():
        return []
    return sorted(p.name for p in CASES_DIR.iterdir() if (p / "case.json").is_file())


CASES = _case_names()


def _checkpoint_for(case_dir: Path, case: dict[str, Any]) -> Path:
    if (case_dir / "checkpoint").is_dir():
        return case_dir / "checkpoint"
    if case.get("checkpoint"):
        return (GOLDEN / case["checkpoint"]).resolve()
    return GOLDEN / "checkpoint"


@pytest.fixture(scope="module")
def engines(torch_single_thread: None) -> dict[Path, Engine]:
    """One engine per checkpoint directory, shared by the cases that use it."""
    return {}


def _engine(engines: dict[Path, Engine], checkpoint: Path) -> Engine:
    if checkpoint not in engines:
        # The normal checkpoint path: resolve_model → read_checkpoint → convert → extract voices.tgz.
        engines[checkpoint] = Engine(checkpoint, device="cpu")
    return engines[checkpoint]


def test_golden_cases_present(shared_dir: Path) -> None:
    assert CASES, f"no golden cases (folders with case.json) found under {CASES_DIR}"


@pytest.mark.parametrize("name", CASES)
def test_golden_case(name: str, engines: dict[Path, Engine]) -> None:
    case_dir = CASES_DIR / name
    case = json.loads((case_dir / "case.json").read_text())
    voice = case["voice_prompt"]
    if voice.endswith(".wav"):
        voice = str(case_dir / voice)  # "voice.wav" is the file in the case folder
    params = GenerationParams(
        voice_prompt=voice,
        text_prompt=case.get("text_prompt", ""),
        greedy=case.get("greedy", True),
        **{key: case[key] for key in PARAM_KEYS if key in case},
    )
    engine = _engine(engines, _checkpoint_for(case_dir, case))

    result = engine.process(case_dir / "input.wav", params)

    expected_tokens = json.loads((case_dir / "expected_tokens.json").read_text())
    expected_text = json.loads((case_dir / "expected_text.json").read_text())
    expected_audio, rate = sf.read(case_dir / "expected.wav", dtype="float32")
    input_info = sf.info(case_dir / "input.wav")

    # The text prompt is tokenized as the reference did.
    if "text_prompt_tokens" in case and case.get("text_prompt", "").strip():
        models = engine._models
        assert models is not None
        tokens = list(models.tokenizer.encode(wrap_with_system_tags(case["text_prompt"])))
        assert tokens == case["text_prompt_tokens"]
    if "frames" in case:
        assert len(expected_tokens) == case["frames"]

    assert len(result.tokens) == len(expected_tokens)
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(result.tokens, expected_tokens, strict=True)) if a != b), None
    )
    assert first_diff is None, (
        f"{name}: tokens differ first at frame {first_diff}: "
        f"got {result.tokens[first_diff]}, expected {expected_tokens[first_diff]}"
    )
    assert result.text_frames == expected_text
    if input_info.samplerate == result.sample_rate:
        assert len(result.tokens) == -(-input_info.frames // FRAME_SIZE)

    assert rate == result.sample_rate
    assert result.audio.dtype == np.float32
    assert result.audio.shape == expected_audio.shape
    max_diff = float(np.abs(result.audio - expected_audio).max())
    assert max_diff <= AUDIO_TOLERANCE, f"{name}: audio differs by {max_diff:.3g} (max abs)"

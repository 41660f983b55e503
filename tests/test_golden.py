"""Fidelity: every golden case of tests/data/golden reproduced exactly, on every path that produces a result.

What NVIDIA's reference produced from tiny random checkpoints with greedy decoding: identical tokens
and per-frame text, audio within 1e-4 max abs (README there). This is the test that says we run
PersonaPlex, so its tolerances never get loosened. Each case runs through:

- `eager`: `Engine.process` on FrameLoop (transformers' modules, the reference for a frame);
- `fast`: `Engine.process` on the fast loop (the GPU path; eager on the CPU);
- `batched`: `Engine.process_batch`, every case of a checkpoint in one batch beside a job of another
  length, voice and sampling mode, so rows of different lengths and prompts share the loop;
- `cached`: the fast loop again, its prompt state now from the engine's prompt cache.

Each path prefills the prompt phase in one pass (personaplex.engine.prompt), as the service runs
it; `eager-stepped` and `fast-stepped` step it frame by frame instead (`Engine(prefill=False)`).

Cases are discovered, so a different set (other sizes, seeds, contexts) is checked the same way; a
case may carry its own `checkpoint/` folder, or name one in case.json's "checkpoint" (relative to the
golden folder). PERSONAPLEX_GOLDEN_DIR points at another golden folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fixtures import GOLDEN_DIR, SPEECH_40S

from personaplex import audio as audio_io
from personaplex.engine.batching import BatchRequest
from personaplex.engine.core import Engine, wrap_with_system_tags
from personaplex.params import FRAME_SIZE, SAMPLE_RATE, EngineResult, GenerationParams

GOLDEN = Path(os.environ.get("PERSONAPLEX_GOLDEN_DIR") or GOLDEN_DIR)
CASES_DIR = GOLDEN / "cases"
AUDIO_TOLERANCE = 1e-4
PARAM_KEYS = ("seed", "temp_audio", "temp_text", "topk_audio", "topk_text")
PATHS = ("eager", "eager-stepped", "fast", "fast-stepped", "cached", "batched")


@dataclass(frozen=True)
class GoldenCase:
    name: str

    @property
    def folder(self) -> Path:
        return CASES_DIR / self.name

    @cached_property
    def spec(self) -> dict[str, Any]:
        return json.loads((self.folder / "case.json").read_text())

    @property
    def checkpoint(self) -> Path:
        if (self.folder / "checkpoint").is_dir():
            return self.folder / "checkpoint"
        if self.spec.get("checkpoint"):
            return (GOLDEN / self.spec["checkpoint"]).resolve()
        return GOLDEN / "checkpoint"

    @property
    def params(self) -> GenerationParams:
        voice = self.spec["voice_prompt"]
        if voice.endswith(".wav"):
            voice = str(self.folder / voice)  # "voice.wav" is the file in the case folder
        return GenerationParams(
            voice_prompt=voice,
            text_prompt=self.spec.get("text_prompt", ""),
            greedy=self.spec.get("greedy", True),
            **{key: self.spec[key] for key in PARAM_KEYS if key in self.spec},
        )

    @property
    def input(self) -> Path:
        return self.folder / "input.wav"


def _case_names() -> list[str]:
    if not CASES_DIR.is_dir():
        return []
    return sorted(p.name for p in CASES_DIR.iterdir() if (p / "case.json").is_file())


CASES = [GoldenCase(name) for name in _case_names()]


class Engines:
    """One engine per (checkpoint, loop), and one batched run per checkpoint, shared by the cases."""

    def __init__(self) -> None:
        self._engines: dict[tuple[Path, bool, bool], Engine] = {}
        self._batched: dict[Path, dict[str, EngineResult]] = {}

    def engine(self, checkpoint: Path, fast: bool, prefill: bool = True) -> Engine:
        key = (checkpoint, fast, prefill)
        if key not in self._engines:
            # The normal checkpoint path: resolve_model → read_checkpoint → convert → extract voices.tgz.
            self._engines[key] = Engine(checkpoint, device="cpu", captured=fast, prefill=prefill)
        return self._engines[key]

    def result(self, case: GoldenCase, path: str) -> EngineResult:
        if path == "batched":
            return self._batch_for(case.checkpoint)[case.name]
        if path == "cached":
            engine = self.engine(case.checkpoint, fast=True)
            engine.prompt_cache.clear()
            assert not engine.process(case.input, case.params).timings.prompt_cached
            result = engine.process(case.input, case.params)
            assert result.timings.prompt_cached
            return result
        loop, _, stepped = path.partition("-")
        engine = self.engine(case.checkpoint, fast=loop == "fast", prefill=not stepped)
        return engine.process(case.input, case.params)

    def _batch_for(self, checkpoint: Path) -> dict[str, EngineResult]:
        if checkpoint not in self._batched:
            cases = [case for case in CASES if case.checkpoint == checkpoint]
            requests = [BatchRequest(case.input, case.params) for case in cases]
            requests.append(BatchRequest(_neighbour_audio(cases), NEIGHBOUR_PARAMS))
            outcomes = self.engine(checkpoint, fast=True).process_batch(requests)
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
            self._batched[checkpoint] = {
                case.name: outcome for case, outcome in zip(cases, outcomes, strict=False)
            }
        return self._batched[checkpoint]


NEIGHBOUR_PARAMS = GenerationParams(voice_prompt="VARF3.pt", text_prompt="Be brief.", seed=7)
"""A sampled (not greedy) job with another voice and prompt, batched beside the golden cases."""


def _neighbour_audio(cases: list[GoldenCase]) -> bytes:
    """Real speech one and a half frames longer than the longest case, so no case is the longest row."""
    longest = max(sf.info(case.input).frames for case in cases)
    return audio_io.encode_wav(audio_io.load(SPEECH_40S, SAMPLE_RATE)[: longest + FRAME_SIZE * 3 // 2])


@pytest.fixture(scope="module")
def engines(torch_single_thread: None) -> Engines:
    return Engines()


def test_golden_cases_present() -> None:
    assert CASES, f"no golden cases (folders with case.json) found under {CASES_DIR}"


PROMPTED = [case for case in CASES if case.spec.get("text_prompt", "").strip()]


@pytest.mark.parametrize("case", PROMPTED, ids=[case.name for case in PROMPTED])
def test_text_prompt_tokenized_as_the_reference(case: GoldenCase, engines: Engines) -> None:
    engine = engines.engine(case.checkpoint, fast=False)
    engine.load()
    assert engine._models is not None
    tokens = list(engine._models.tokenizer.encode(wrap_with_system_tags(case.spec["text_prompt"])))
    assert tokens == case.spec["text_prompt_tokens"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_golden_case(case: GoldenCase, path: str, engines: Engines) -> None:
    result = engines.result(case, path)

    expected_tokens = json.loads((case.folder / "expected_tokens.json").read_text())
    expected_text = json.loads((case.folder / "expected_text.json").read_text())
    expected_audio, rate = sf.read(case.folder / "expected.wav", dtype="float32")
    input_info = sf.info(case.input)
    if "frames" in case.spec:
        assert len(expected_tokens) == case.spec["frames"]

    assert len(result.tokens) == len(expected_tokens)
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(result.tokens, expected_tokens, strict=True)) if a != b), None
    )
    assert first_diff is None, (
        f"{case.name} ({path}): tokens differ first at frame {first_diff}: "
        f"got {result.tokens[first_diff]}, expected {expected_tokens[first_diff]}"
    )
    assert result.text_frames == expected_text
    if input_info.samplerate == result.sample_rate:
        assert len(result.tokens) == -(-input_info.frames // FRAME_SIZE)

    assert rate == result.sample_rate
    assert result.audio.dtype == np.float32
    assert result.audio.shape == expected_audio.shape
    max_diff = float(np.abs(result.audio - expected_audio).max())
    assert max_diff <= AUDIO_TOLERANCE, f"{case.name} ({path}): audio differs by {max_diff:.3g} (max abs)"

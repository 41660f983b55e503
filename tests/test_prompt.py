"""The prompt phase in one pass, and the prompt-state cache (personaplex.engine.prompt), on the CPU.

The golden cases (test_golden.py) hold on the prefilled, stepped and cached paths; here: the state
the one pass leaves is the one the steps leave, the cache gives identical results and is bounded,
and what the cache is keyed by.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import SPEECH_40S

from personaplex import audio as audio_io
from personaplex.engine.batching import BatchRequest, never_cancelled, no_progress
from personaplex.engine.core import Engine
from personaplex.engine.prompt import PromptCache, PromptState, prefill
from personaplex.params import SAMPLE_RATE, GenerationParams

CONTEXT = 12
"""The short checkpoint's context: every prompt crosses its window."""
PROMPT = "You are a careful assistant who answers briefly."


@pytest.fixture(scope="module")
def short_context(tmp_path_factory: pytest.TempPathFactory, torch_single_thread: None) -> Engine:
    from personaplex.engine.tiny import write_tiny_checkpoint

    engine = Engine(
        write_tiny_checkpoint(tmp_path_factory.mktemp("ctx12") / "ckpt", context=CONTEXT), device="cpu"
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return audio_io.load(SPEECH_40S, SAMPLE_RATE)


@pytest.fixture(scope="module")
def voice_wav(speech: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("voices") / "speaker.wav"
    sf.write(path, speech[3 * SAMPLE_RATE : 5 * SAMPLE_RATE], SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def clip(speech: np.ndarray) -> bytes:
    return audio_io.encode_wav(speech[22 * SAMPLE_RATE : 24 * SAMPLE_RATE])


def _stepped_and_prefilled(engine: Engine, params: GenerationParams) -> tuple[object, PromptState]:
    """The eager loop after its prompt frames were stepped, and the state the one pass computes."""
    models = engine._models
    assert models is not None and engine._info is not None
    voice = engine._voice_prompt(models, params.voice_prompt)
    tokens = engine._text_prompt_tokens(models, params.text_prompt)
    stepped = engine._new_loop(models, params)
    engine._prompt(stepped, voice, tokens, no_progress, never_cancelled)
    no_audio = torch.empty(1, 0, 0, dtype=torch.long)
    state = prefill(models, engine._plan(models, no_audio, voice, params), engine._info.lm.delays)
    return stepped, state


@pytest.mark.parametrize("which", ["tiny", "short-context"])
@pytest.mark.parametrize("voice", ["NATF2.pt", "wav"])
@pytest.mark.parametrize("text", [PROMPT, ""], ids=["prompt", "no-prompt"])
def test_one_pass_leaves_the_state_the_steps_leave(
    which: str, voice: str, text: str, tiny_engine: Engine, short_context: Engine, voice_wav: Path
) -> None:
    engine = tiny_engine if which == "tiny" else short_context
    params = GenerationParams(voice_prompt=str(voice_wav) if voice == "wav" else voice, text_prompt=text)
    with torch.inference_mode():
        stepped, state = _stepped_and_prefilled(engine, params)
    ring = stepped.ring
    assert torch.equal(state.tokens, ring.tokens[0]) and torch.equal(state.provided, ring.provided[0])
    assert (state.offset, state.positions) == (ring.offset, stepped.position)
    layers = stepped.cache.layers
    kept = state.keys.shape[2]
    assert kept == min(state.positions, engine._models.moshi.config.sliding_window - 1)
    if which == "short-context":
        assert state.positions > CONTEXT  # the window was crossed: only its last keys are kept
    for index, layer in enumerate(layers):
        # Summed in another order (one matrix product over the positions): equal to the last bits.
        torch.testing.assert_close(state.keys[index], layer.keys[0, :, -kept:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.values[index], layer.values[0, :, -kept:], atol=1e-5, rtol=1e-5)


def test_prefilled_jobs_equal_stepped_jobs(tiny_engine: Engine, clip: bytes, monkeypatch) -> None:
    """Sampled jobs too: the prompt draws no noise, so a seed means the same either way."""
    params = [GenerationParams(voice_prompt="NATM1.pt", text_prompt=PROMPT, seed=seed) for seed in (1, 2)]
    prefilled = [tiny_engine.process(clip, p) for p in params]
    monkeypatch.setattr(tiny_engine, "prefill", False)
    stepped = [tiny_engine.process(clip, p) for p in params]
    for a, b in zip(prefilled, stepped, strict=True):
        assert a.tokens == b.tokens and a.audio.tobytes() == b.audio.tobytes()
    assert prefilled[0].tokens != prefilled[1].tokens


def test_cached_prompt_gives_identical_results(tiny_engine: Engine, clip: bytes) -> None:
    params = GenerationParams(voice_prompt="VARF2.pt", text_prompt="Tell me about trains.", seed=11)
    tiny_engine.prompt_cache.clear()
    first = tiny_engine.process(clip, params)
    [batched] = tiny_engine.process_batch([BatchRequest(clip, params)])
    again = tiny_engine.process(clip, params)
    assert not first.timings.prompt_cached
    assert batched.timings.prompt_cached and again.timings.prompt_cached
    for result in (batched, again):
        assert result.tokens == first.tokens and result.audio.tobytes() == first.audio.tobytes()
    assert again.timings.prompt_s < first.timings.prompt_s


def test_a_batch_with_one_persona_prepares_it_once(tiny_engine: Engine, speech: np.ndarray) -> None:
    cache = tiny_engine.prompt_cache
    cache.clear()
    hits, misses = cache.hits, cache.misses
    params = GenerationParams(voice_prompt="NATF1.pt", text_prompt=PROMPT, seed=3)
    clips = [audio_io.encode_wav(speech[i * SAMPLE_RATE : (i + 1) * SAMPLE_RATE]) for i in range(3, 9)]
    outcomes = tiny_engine.process_batch([BatchRequest(c, params) for c in clips])
    assert all(not isinstance(o, Exception) for o in outcomes)
    assert (cache.misses - misses, cache.hits - hits) == (1, 5)
    assert [o.timings.prompt_cached for o in outcomes] == [False] + [True] * 5
    assert len(cache) == 1
    stats = cache.stats()  # what the worker's status record reports
    assert (stats["entries"], stats["hits"] - hits, stats["misses"] - misses) == (1, 5, 1)
    assert 0 < stats["megabytes"] < stats["budget_megabytes"] == 1024


def test_the_cache_key_is_the_voice_file_and_the_prompt(
    tiny_engine: Engine, clip: bytes, speech: np.ndarray, tmp_path: Path
) -> None:
    cache = tiny_engine.prompt_cache
    cache.clear()
    voice = tmp_path / "someone.wav"
    sf.write(voice, speech[5 * SAMPLE_RATE : 7 * SAMPLE_RATE], SAMPLE_RATE)
    params = GenerationParams(voice_prompt=str(voice), text_prompt=PROMPT, seed=5)  # greedy, the tiny
    # model's tokens barely depend on the voice
    first = tiny_engine.process(clip, params)
    assert tiny_engine.process(clip, params).timings.prompt_cached
    other_prompt = tiny_engine.process(
        clip, GenerationParams(voice_prompt=str(voice), text_prompt="Hi.", greedy=True)
    )
    assert not other_prompt.timings.prompt_cached
    # The same file name with another recording in it is another voice.
    sf.write(voice, speech[21 * SAMPLE_RATE : 23 * SAMPLE_RATE], SAMPLE_RATE)
    os.utime(voice, ns=(1, 1))
    changed = tiny_engine.process(clip, params)
    assert not changed.timings.prompt_cached and changed.tokens != first.tokens
    assert len(cache) == 3


def _state(nbytes: int) -> PromptState:
    keys = torch.zeros(nbytes // 8, dtype=torch.float32)[None, None, :, None]  # 4 bytes each, keys and values
    tokens = torch.zeros(0, 0, dtype=torch.long)
    return PromptState(keys, keys.clone(), 1, tokens, tokens.bool(), 1, 1)


def test_the_cache_is_bounded_in_bytes_least_recently_used_out_first() -> None:
    cache = PromptCache(max_bytes=3000)
    for key in "abc":
        cache.put(key, _state(1000))
    assert len(cache) == 3 and cache.nbytes == 3000
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", _state(1000))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    cache.put("huge", _state(4000))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 3
    cache.put("e", _state(2000))
    assert cache.nbytes <= 3000 and cache.get("e") is not None


def test_a_cache_of_zero_bytes_keeps_nothing(tiny_checkpoint: Path, clip: bytes) -> None:
    engine = Engine(tiny_checkpoint, device="cpu", prompt_cache_mb=0)
    params = GenerationParams(greedy=True)
    first, second = engine.process(clip, params), engine.process(clip, params)
    assert not second.timings.prompt_cached and len(engine.prompt_cache) == 0
    assert first.tokens == second.tokens


def test_offload_empties_the_cache(tiny_checkpoint: Path, clip: bytes) -> None:
    engine = Engine(tiny_checkpoint, device="cpu")
    engine.process(clip, GenerationParams(greedy=True))
    assert len(engine.prompt_cache) == 1
    engine.offload()
    assert len(engine.prompt_cache) == 0
    assert not engine.process(clip, GenerationParams(greedy=True)).timings.prompt_cached


def test_the_prompt_state_is_small(tiny_engine: Engine) -> None:
    """What one cached persona holds: the kept positions' keys and values, and the token ring."""
    models = tiny_engine._models
    params = GenerationParams(text_prompt=PROMPT)
    with torch.inference_mode():
        _, state = _stepped_and_prefilled(tiny_engine, params)
    config = models.moshi.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    assert state.nbytes == 2 * layers * hidden * state.keys.shape[2] * 4 + state.tokens.numel() * 9

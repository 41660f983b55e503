"""The engine on the tiny model, CPU: prompt phases, voices, seeds, durations, errors, codec, offload,
progress, cancellation and thread safety. One session engine (`tiny_engine`) serves most tests.
"""

from __future__ import annotations

import gc
import math
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from fixtures import SPEECH_20S, SPEECH_40S

from personaplex import audio as audio_io
from personaplex.catalog import voice_ids
from personaplex.engine import codec
from personaplex.engine import core as engine_module
from personaplex.engine import prompt as prompt_module
from personaplex.engine.core import Engine
from personaplex.engine.frames import SILENCE_TOKENS, SINE_TOKENS, FrameLoop
from personaplex.errors import AudioError, CancelledError, UnknownVoiceError
from personaplex.params import FRAME_SIZE, SAMPLE_RATE, GenerationParams

PROMPT_SILENCE = 6  # documented: 6 frames of silence before and after the text prompt
TEXT_PAD = 3
CLIP_SECONDS = 1.5
SHORT_PROMPT = "You enjoy having a good conversation."


# ---- inputs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """20 s of speech at 24 kHz, float32 mono."""
    samples, rate = sf.read(SPEECH_20S, dtype="float32")
    assert rate == SAMPLE_RATE
    return samples


@pytest.fixture(scope="module")
def clip(speech: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.5 s of speech, 24 kHz mono WAV (19 frames)."""
    path = tmp_path_factory.mktemp("clips") / "clip.wav"
    sf.write(path, speech[SAMPLE_RATE : SAMPLE_RATE + int(CLIP_SECONDS * SAMPLE_RATE)], SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 s of another speaker, as a voice prompt WAV."""
    samples, rate = sf.read(SPEECH_40S, dtype="float32")
    path = tmp_path_factory.mktemp("voices") / "speaker.wav"
    sf.write(path, samples[2 * rate : 4 * rate], rate)
    return path


def _params(**overrides) -> GenerationParams:
    base = {"voice_prompt": "NATF2.pt", "text_prompt": SHORT_PROMPT, "seed": 1234}
    return GenerationParams(**{**base, **overrides})


def _frames_for(samples: int) -> int:
    return math.ceil(samples / FRAME_SIZE)


# ---- prompt phases ---------------------------------------------------------------------------------


class RecordingLoop(FrameLoop):
    """Records, per frame entered, whether embeddings were replayed and the tokens the model is fed
    (None for the first frame, which runs no model): in steps, and in the prompt's one pass."""

    calls: list[dict] = []

    def enter_frame(self, user=None, agent=None, text=None, replaying=False):
        fed = super().enter_frame(user, agent, text, replaying)
        RecordingLoop.calls.append({"replay": replaying, "input": None if fed is None else fed[0].tolist()})
        return fed


@pytest.fixture(params=[False, True], ids=["stepped", "prefilled"])
def recorded(
    request: pytest.FixtureRequest, tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> list[dict]:
    """The frames the next job enters, its prompt stepped or prefilled (uncached)."""
    monkeypatch.setattr(engine_module, "FrameLoop", RecordingLoop)
    monkeypatch.setattr(prompt_module, "FrameLoop", RecordingLoop)
    monkeypatch.setattr(tiny_engine, "prefill", request.param)
    monkeypatch.setattr(RecordingLoop, "calls", [])
    tiny_engine.prompt_cache.clear()
    return RecordingLoop.calls


def _documented_schedule(text_tokens: list[int], user_codes: torch.Tensor) -> list[tuple]:
    """What each step after the voice prompt forces: (text, agent[8], user[8]); None = sampled."""
    silence = (TEXT_PAD, SILENCE_TOKENS, SINE_TOKENS)
    schedule = [silence] * PROMPT_SILENCE
    schedule += [(token, SILENCE_TOKENS, SINE_TOKENS) for token in text_tokens]
    schedule += [silence] * PROMPT_SILENCE
    schedule += [(None, None, tuple(user_codes[0, :, f].tolist())) for f in range(user_codes.shape[-1])]
    return schedule


def _check_inputs(calls: list[dict], start: int, schedule: list[tuple]) -> int:
    """Model input at step i: delay-0 streams (0, 1, 9) forced at step i-1, the others at i-2."""
    checked = 0
    for offset in range(2, len(schedule)):
        fed = calls[start + offset]["input"]
        assert fed is not None
        (text1, agent1, user1), (_, agent2, user2) = schedule[offset - 1], schedule[offset - 2]
        where = f"step {offset} after the voice prompt"
        if text1 is not None:
            assert fed[0] == text1, where
        if agent1 is not None:
            assert fed[1] == agent1[0], where
        if agent2 is not None:
            assert tuple(fed[2:9]) == tuple(agent2[1:]), where
        assert fed[9] == user1[0], where
        assert tuple(fed[10:17]) == tuple(user2[1:]), where
        checked += 1
    return checked


def _text_tokens(engine: Engine, prompt: str) -> list[int]:
    if not prompt.strip():
        return []
    return list(engine._models.tokenizer.encode(f"<system> {prompt.strip()} <system>"))


def _user_codes(engine: Engine, path: Path) -> torch.Tensor:
    return codec.encode(engine._models.mimi, audio_io.load(path))


@pytest.mark.parametrize("prompt", [SHORT_PROMPT, ""])
def test_prompt_phases_force_documented_tokens_catalog_voice(
    tiny_engine: Engine, clip: Path, recorded: list[dict], prompt: str
) -> None:
    result = tiny_engine.process(clip, _params(text_prompt=prompt, greedy=True))
    calls = recorded

    voice = torch.load(tiny_engine._voices_dir / "NATF2.pt", weights_only=True)
    replayed = voice["embeddings"].shape[0]
    assert [c["replay"] for c in calls[:replayed]] == [True] * replayed
    assert not any(c["replay"] for c in calls[replayed:])

    text_tokens = _text_tokens(tiny_engine, prompt)
    assert bool(text_tokens) == bool(prompt)
    schedule = _documented_schedule(text_tokens, _user_codes(tiny_engine, clip))
    assert len(calls) == replayed + len(schedule)
    assert _check_inputs(calls, replayed, schedule) == len(schedule) - 2
    # Right after the replay, the model is fed the voice file's stored token cache.
    assert calls[replayed]["input"] == voice["cache"][0, :, 0].tolist()
    assert len(result.tokens) == _frames_for(int(CLIP_SECONDS * SAMPLE_RATE))


def test_prompt_phases_force_documented_tokens_wav_voice(
    tiny_engine: Engine, clip: Path, voice_wav: Path, recorded: list[dict]
) -> None:
    result = tiny_engine.process(clip, _params(voice_prompt=str(voice_wav), greedy=True))
    calls = recorded

    voice_frames = _frames_for(len(audio_io.load(voice_wav)))
    assert not any(c["replay"] for c in calls)
    # Voice frames: text PAD and the user's sine are forced while the agent plays the voice's codes.
    # (The first step runs no model and positions up to each delay hold the initial tokens.)
    for i in range(3, voice_frames):
        fed = calls[i]["input"]
        assert fed[0] == TEXT_PAD and fed[9] == SINE_TOKENS[0] and tuple(fed[10:]) == SINE_TOKENS[1:]
    schedule = _documented_schedule(_text_tokens(tiny_engine, SHORT_PROMPT), _user_codes(tiny_engine, clip))
    assert len(calls) == voice_frames + len(schedule)
    assert _check_inputs(calls, voice_frames, schedule) == len(schedule) - 2
    assert len(result.tokens) == _frames_for(int(CLIP_SECONDS * SAMPLE_RATE))


# ---- voices ----------------------------------------------------------------------------------------


def test_empty_prompt_works(tiny_engine: Engine, clip: Path) -> None:
    for prompt in ("", "   "):
        result = tiny_engine.process(clip, _params(text_prompt=prompt, greedy=True))
        assert len(result.text_frames) == _frames_for(int(CLIP_SECONDS * SAMPLE_RATE))
        assert len(result.audio) == int(CLIP_SECONDS * SAMPLE_RATE)


def test_both_voice_forms_work_and_differ(tiny_engine: Engine, clip: Path, voice_wav: Path) -> None:
    catalog = tiny_engine.process(clip, _params(voice_prompt="NATF2.pt", greedy=True))
    by_id = tiny_engine.process(clip, _params(voice_prompt="natf2", greedy=True))
    other = tiny_engine.process(clip, _params(voice_prompt="VARM4.pt", greedy=True))
    from_wav = tiny_engine.process(clip, _params(voice_prompt=str(voice_wav), greedy=True))
    assert catalog.tokens == by_id.tokens
    for result in (catalog, other, from_wav):
        assert len(result.audio) == int(CLIP_SECONDS * SAMPLE_RATE)
        assert np.all(np.isfinite(result.audio))
    assert catalog.tokens != other.tokens
    assert catalog.tokens != from_wav.tokens


def test_silent_voice_wav_is_an_audio_error(tiny_engine: Engine, clip: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(2 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="silent"):
        tiny_engine.process(clip, _params(voice_prompt=str(silent)))
    short = tmp_path / "short.wav"
    sf.write(short, np.full(SAMPLE_RATE // 10, 0.1, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="short"):
        tiny_engine.process(clip, _params(voice_prompt=str(short)))


@pytest.mark.parametrize("voice", ["NOBODY.pt", "NATF9", "voice.mp3", "/nonexistent/speaker.wav"])
def test_unknown_voice_lists_valid_names(tiny_engine: Engine, clip: Path, voice: str) -> None:
    with pytest.raises(UnknownVoiceError) as info:
        tiny_engine.process(clip, _params(voice_prompt=voice))
    assert info.value.voice == voice
    assert info.value.valid == voice_ids()
    assert len(info.value.valid) == 18
    assert "NATF0.pt" in str(info.value) and "VARM4.pt" in str(info.value)


# ---- seeds -----------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tiny_engine: Engine, clip: Path) -> None:
    first = tiny_engine.process(clip, _params(seed=7))
    again = tiny_engine.process(clip, _params(seed=7))
    other = tiny_engine.process(clip, _params(seed=8))
    assert first.audio.tobytes() == again.audio.tobytes()
    assert first.tokens == again.tokens
    assert first.text_frames == again.text_frames
    assert first.tokens != other.tokens
    assert first.audio.tobytes() != other.audio.tobytes()


def test_random_seed_works(tiny_engine: Engine, clip: Path) -> None:
    a = tiny_engine.process(clip, _params(seed=-1))
    b = tiny_engine.process(clip, _params(seed=-1))
    assert len(a.tokens) == len(b.tokens) == _frames_for(int(CLIP_SECONDS * SAMPLE_RATE))
    assert a.tokens != b.tokens  # two fresh random seeds


# ---- input formats and durations -------------------------------------------------------------------


def _write_variant(
    path: Path, speech: np.ndarray, rate: int, channels: int, fmt: str, seconds: float
) -> Path:
    piece = speech[SAMPLE_RATE : SAMPLE_RATE + int(seconds * SAMPLE_RATE)]
    if rate != SAMPLE_RATE:
        piece = soxr.resample(piece, SAMPLE_RATE, rate).astype(np.float32)
    if channels == 2:
        piece = np.stack([piece, 0.5 * piece[::-1]], axis=1)
    sf.write(path, piece, rate, format=fmt)
    return path


@pytest.mark.parametrize(
    "rate,channels,fmt,seconds",
    [
        (8000, 1, "WAV", CLIP_SECONDS),
        (16000, 1, "WAV", CLIP_SECONDS),
        (44100, 1, "WAV", 1.37),
        (24000, 2, "WAV", CLIP_SECONDS),
        (48000, 2, "FLAC", 1.21),
        (24000, 1, "FLAC", CLIP_SECONDS),
        (24000, 1, "WAV", 0.05),
    ],
    ids=["8k", "16k", "44k1", "stereo", "flac-48k-stereo", "flac", "0.05s"],
)
def test_output_duration_equals_input_duration(
    tiny_engine: Engine,
    speech: np.ndarray,
    tmp_path: Path,
    rate: int,
    channels: int,
    fmt: str,
    seconds: float,
) -> None:
    path = _write_variant(tmp_path / f"in.{fmt.lower()}", speech, rate, channels, fmt, seconds)
    info = sf.info(path)
    input_seconds = info.frames / info.samplerate
    result = tiny_engine.process(path, _params(text_prompt="", seed=3))

    assert result.audio.dtype == np.float32 and result.audio.ndim == 1
    assert result.sample_rate == SAMPLE_RATE
    assert abs(len(result.audio) / SAMPLE_RATE - input_seconds) <= 1 / SAMPLE_RATE + 1 / info.samplerate
    assert result.input_duration_s == pytest.approx(input_seconds, abs=1e-3)
    expected_frames = _frames_for(len(audio_io.load(path)))
    assert len(result.text_frames) == len(result.tokens) == expected_frames
    assert np.all(np.isfinite(result.audio))


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "empty"),
        (b"this is not audio at all " * 40, "decode"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "decode"),
    ],
    ids=["empty", "garbage", "truncated-header"],
)
def test_unusable_input_is_a_clear_audio_error(tiny_engine: Engine, payload: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        tiny_engine.process(payload, _params())


def test_empty_file_and_zero_samples(tiny_engine: Engine, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        tiny_engine.process(empty, _params())
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no samples"):
        tiny_engine.process(zero, _params())
    with pytest.raises(AudioError, match="not found"):
        tiny_engine.process(tmp_path / "missing.wav", _params())


def test_over_long_input_is_refused(tiny_checkpoint: Path, clip: Path) -> None:
    engine = Engine(tiny_checkpoint, device="cpu", max_audio_seconds=1.0)
    with pytest.raises(AudioError, match=r"1\.5 s long; the limit is 1 s"):
        engine.process(clip, _params())
    assert not engine.is_loaded  # refused before loading anything


def test_per_frame_text_matches_tokens(tiny_engine: Engine, speech: np.ndarray, tmp_path: Path) -> None:
    samples = 1920 * 13 + 7  # 14 frames, the last one partial
    path = tmp_path / "odd.wav"
    sf.write(path, speech[:samples], SAMPLE_RATE, subtype="FLOAT")
    result = tiny_engine.process(path, _params(temp_text=1.5, topk_text=90))
    assert len(result.text_frames) == len(result.tokens) == math.ceil(samples / 1920) == 14
    tokenizer = tiny_engine._models.tokenizer
    for row, text in zip(result.tokens, result.text_frames, strict=True):
        assert len(row) == 9
        assert 0 <= row[0] < tokenizer.get_piece_size()
        assert all(0 <= code < 2048 for code in row[1:])
        expected = {0: "EPAD", 3: "PAD"}.get(row[0], tokenizer.id_to_piece(row[0]).replace("▁", " "))
        assert text == expected
    assert isinstance(result.text, str)
    assert "PAD" not in result.text.replace("EPAD", "")


# ---- codec -----------------------------------------------------------------------------------------


def test_streaming_encode_equals_one_shot(tiny_engine: Engine, speech: np.ndarray) -> None:
    mimi = tiny_engine._models.mimi
    samples = torch.from_numpy(speech[: 30 * FRAME_SIZE].copy()).view(1, 1, -1)
    with torch.inference_mode():
        one_shot = mimi.encode(samples).audio_codes
        encoder_cache = padding_cache = None
        pieces = []
        for start in range(0, samples.shape[-1], FRAME_SIZE):
            out = mimi.encode(
                samples[..., start : start + FRAME_SIZE],
                encoder_cache=encoder_cache,
                padding_cache=padding_cache,
                use_streaming=True,
            )
            encoder_cache, padding_cache = out.encoder_cache, out.padding_cache
            pieces.append(out.audio_codes)
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape == one_shot.shape == (1, 8, 30)
    assert torch.equal(streamed, one_shot)


def test_chunked_encode_and_decode_equal_one_shot(tiny_engine: Engine, speech: np.ndarray) -> None:
    mimi = tiny_engine._models.mimi
    context = codec.context_frames(mimi)
    samples = speech[: (context + 120) * FRAME_SIZE - 300]  # long enough for chunks past the context
    frames = math.ceil(len(samples) / FRAME_SIZE)
    whole = codec.encode(mimi, samples)
    chunked = codec.encode(mimi, samples, chunk_frames=50)
    assert whole.shape == (1, 8, frames)
    assert torch.equal(chunked, whole)

    audio = codec.decode(mimi, whole)
    audio_chunked = codec.decode(mimi, whole, chunk_frames=50)
    assert audio.shape == audio_chunked.shape == (frames * FRAME_SIZE,)
    assert float(np.abs(audio - audio_chunked).max()) <= 1e-5
    assert float(np.abs(audio).max()) > 1e-3  # not trivially silent


# ---- offload, progress, cancellation, threads ------------------------------------------------------


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_offload_frees_the_model_and_reload_is_identical(tiny_checkpoint: Path, clip: Path) -> None:
    engine = Engine(tiny_checkpoint, device="cpu")
    params = _params(seed=11)
    first = engine.process(clip, params)
    assert engine.status()["loaded"] is True
    models = engine._models
    refs = [
        weakref.ref(models.moshi),
        weakref.ref(models.mimi),
        weakref.ref(models.moshi.decoder.model.layers[0]),
    ]
    refs.append(weakref.ref(models.moshi.decoder.model.embed_tokens.weight))
    del models

    report = engine.offload()
    assert report["offloaded"] is True
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * len(refs)
    status = engine.status()
    assert status["loaded"] is False and not engine.is_loaded
    after_first_offload = _live_tensors()

    second = engine.process(clip, params)  # reloads on demand
    assert engine.is_loaded
    assert second.tokens == first.tokens
    assert second.audio.tobytes() == first.audio.tobytes()
    third = engine.process(clip, params)
    assert third.tokens == first.tokens
    assert engine.offload()["offloaded"] is True
    assert engine.offload()["offloaded"] is False  # nothing left to drop
    assert _live_tensors() <= after_first_offload + 8  # a cycle leaves nothing behind


def test_progress_is_reported_in_order(tiny_engine: Engine, clip: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    tiny_engine.process(
        clip, _params(), progress=lambda phase, done, total: calls.append((phase, done, total))
    )
    phases = list(dict.fromkeys(phase for phase, _, _ in calls))
    assert phases == ["load", "prompt", "generate", "decode"]
    for phase in phases:
        reports = [(done, total) for p, done, total in calls if p == phase]
        dones = [done for done, _ in reports]
        assert dones == sorted(dones), phase
        assert len({total for _, total in reports}) == 1, phase
        assert dones[-1] == reports[-1][1], phase  # ends complete
    generate = [done for p, done, _ in calls if p == "generate"]
    assert generate[-1] == _frames_for(int(CLIP_SECONDS * SAMPLE_RATE))
    assert len(generate) >= 3  # every few frames, not only at the end


def test_cancel_mid_generation(tiny_engine: Engine, clip: Path) -> None:
    state = {"generating": 0}

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "generate":
            state["generating"] = done

    with pytest.raises(CancelledError, match="frame"):
        tiny_engine.process(
            clip, _params(), progress=progress, should_cancel=lambda: state["generating"] >= 5
        )
    assert state["generating"] >= 5
    with pytest.raises(CancelledError, match="prompt"):
        tiny_engine.process(clip, _params(), should_cancel=lambda: True)
    # The engine stays usable after a cancelled job.
    assert len(tiny_engine.process(clip, _params(text_prompt="")).tokens) == 19


def test_a_cancel_during_the_decode_phase_cancels_the_job(tiny_engine: Engine, clip: Path) -> None:
    """A cancel that comes while the frames are decoded is honoured (issue 10, item 6): before, the
    decode ran on and the job succeeded after its DELETE had answered cancel_requested."""
    from personaplex.engine.batching import BatchRequest

    state = {"decoding": False}

    def progress(phase: str, done: int, total: int) -> None:
        state["decoding"] = phase == "decode"

    def should_cancel() -> bool:
        return state["decoding"]

    with pytest.raises(CancelledError, match="decode phase"):
        tiny_engine.process(clip, _params(), progress=progress, should_cancel=should_cancel)
    state["decoding"] = False
    [outcome] = tiny_engine.process_batch([BatchRequest(clip, _params(), progress, should_cancel)])
    assert isinstance(outcome, CancelledError) and "decode phase" in str(outcome)


def test_decode_runs_its_hook_before_every_chunk(tiny_engine: Engine, speech: np.ndarray) -> None:
    mimi = tiny_engine._models.mimi
    codes = codec.encode(mimi, speech[: 2 * SAMPLE_RATE])  # 25 frames
    calls: list[int] = []
    audio = codec.decode(mimi, codes, chunk_frames=10, before_chunk=lambda: calls.append(1))
    assert len(calls) == 3 and np.array_equal(audio, codec.decode(mimi, codes, chunk_frames=10))

    def stop() -> None:
        if calls:
            raise CancelledError("stop")
        calls.append(1)

    calls.clear()
    with pytest.raises(CancelledError):
        codec.decode(mimi, codes, chunk_frames=10, before_chunk=stop)
    assert calls == [1]  # the second chunk never ran


def test_concurrent_process_calls_equal_sequential(
    tiny_engine: Engine, tiny_checkpoint: Path, clip: Path
) -> None:
    """Two threads on a fresh engine: one loads the model, both get what sequential runs give."""
    params = [_params(seed=21), _params(seed=22, voice_prompt="NATM1.pt")]
    sequential = [tiny_engine.process(clip, p) for p in params]
    engine = Engine(tiny_checkpoint, device="cpu")
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(index: int) -> None:
        try:
            start.wait(timeout=30)
            results[index] = engine.process(clip, params[index])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(results[i].timings.load_s > 0 for i in range(2)) == [False, True]  # loaded once
    for index, expected in enumerate(sequential):
        assert results[index].tokens == expected.tokens
        assert results[index].audio.tobytes() == expected.audio.tobytes()
    engine.offload()

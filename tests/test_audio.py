"""Audio input and output: probe and load WAV/FLAC/OGG at any rate and channel count, clear errors,
atomic WAV writes. No torch needed."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures import silent_flac

from personaplex import audio
from personaplex.errors import AudioError
from personaplex.params import SAMPLE_RATE


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# ---- probe -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,subtype,rate,channels",
    [
        ("WAV", "PCM_16", 16000, 1),
        ("WAV", "FLOAT", 44100, 2),
        ("FLAC", None, 48000, 2),
        ("OGG", "VORBIS", 24000, 1),
    ],
)
def test_probe_reads_the_header(
    tmp_path: Path, fmt: str, subtype: str | None, rate: int, channels: int
) -> None:
    samples = _tone(1.25, rate)
    if channels == 2:
        samples = np.stack([samples, samples], axis=1)
    data = _encode(samples, rate, fmt, subtype)
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        info = audio.probe(source)
        assert (info.sample_rate, info.channels, info.format) == (rate, channels, fmt)
        assert info.frames == len(samples)
        assert info.duration_s == pytest.approx(1.25, abs=1e-9)


def test_probe_enforces_the_duration_limit() -> None:
    data = _encode(_tone(2.0, 8000), 8000, "WAV")
    assert audio.probe(data, max_seconds=2.0).duration_s == 2.0
    assert audio.probe(data, max_seconds=None).duration_s == 2.0
    with pytest.raises(AudioError, match=r"2\.0 s long; the limit is 1 s"):
        audio.probe(data, max_seconds=1.0)
    with pytest.raises(AudioError, match="limit"):
        audio.load(data, max_seconds=1.5)


# ---- load ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_load_resamples_to_24k(rate: int, fmt: str) -> None:
    seconds = 1.0
    data = _encode(_tone(seconds, rate), rate, fmt, "VORBIS" if fmt == "OGG" else None)
    out = audio.load(data)
    assert out.dtype == np.float32 and out.ndim == 1 and out.flags.c_contiguous
    assert abs(len(out) - seconds * SAMPLE_RATE) <= 1
    # The tone survives resampling (checked away from the edges; Vorbis is lossy).
    expected = _tone(seconds, SAMPLE_RATE)[: len(out)]
    middle = slice(2400, len(out) - 2400)
    tolerance = 0.05 if fmt == "OGG" else 2e-3
    assert float(np.abs(out[middle] - expected[middle]).max()) < tolerance


def test_load_keeps_24k_float_samples_exactly() -> None:
    samples = np.random.default_rng(0).uniform(-0.9, 0.9, 5000).astype(np.float32)
    out = audio.load(_encode(samples, SAMPLE_RATE, "WAV", "FLOAT"))
    assert np.array_equal(out, samples)


def test_load_downmixes_stereo_to_the_mean() -> None:
    left = _tone(0.5, SAMPLE_RATE, 300.0)
    right = _tone(0.5, SAMPLE_RATE, 500.0)
    out = audio.load(_encode(np.stack([left, right], axis=1), SAMPLE_RATE, "WAV", "FLOAT"))
    assert np.allclose(out, (left + right) / 2, atol=1e-7)
    four = np.stack([left, right, -left, right], axis=1)
    out4 = audio.load(_encode(four, SAMPLE_RATE, "WAV", "FLOAT"))
    assert np.allclose(out4, right / 2, atol=1e-7)


def test_load_to_another_rate() -> None:
    out = audio.load(_encode(_tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "WAV"), sample_rate=16000)
    assert len(out) == 16000


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "empty"),
        (b"\x00" * 1000, "decode"),
        (b"definitely not an audio file, just some text " * 20, "decode"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "decode"),
        (b"fLaC" + os.urandom(200), "decode"),
    ],
    ids=["empty", "zeros", "text", "wav-header-only", "flac-garbage"],
)
def test_unusable_bytes_give_clear_errors(payload: bytes, message: str) -> None:
    for call in (audio.probe, audio.load):
        with pytest.raises(AudioError, match=message) as info:
            call(payload)
        assert "b'" not in str(info.value) and 'b"' not in str(info.value)  # no repr of the input
        assert len(str(info.value)) < 300  # a sentence, not a dump


def test_truncated_wav_is_refused() -> None:
    data = _encode(_tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "WAV", "PCM_16")
    for cut in (len(data) // 2, len(data) - 2, 60):
        with pytest.raises(AudioError, match="truncated"):
            audio.load(data[:cut])
        with pytest.raises(AudioError, match="truncated"):
            audio.probe(data[:cut])
    assert len(audio.load(data)) == SAMPLE_RATE


def test_truncated_wavex_is_refused() -> None:
    data = _encode(_tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "WAVEX", "PCM_16")
    assert audio.probe(data).format == "WAVEX"
    with pytest.raises(AudioError, match="truncated"):
        audio.probe(data[: len(data) // 2])


def test_truncated_flac_is_refused() -> None:
    data = _encode(_tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "FLAC")
    audio.check_decodes(data)  # whole: decodes to its end
    audio.probe(data[: len(data) // 2])  # the header alone cannot tell
    with pytest.raises(AudioError, match="truncated"):
        audio.check_decodes(data[: len(data) // 2])
    with pytest.raises(AudioError):
        audio.load(data[: len(data) // 2])


def test_truncated_ogg_is_refused() -> None:
    data = _encode(_tone(1.0, SAMPLE_RATE), SAMPLE_RATE, "OGG")
    audio.check_decodes(data)
    with pytest.raises(AudioError):  # Ogg's length comes from its last page: the header check fails
        audio.probe(data[: len(data) // 2])


def test_files_empty_missing_and_without_samples(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        audio.load(empty)
    with pytest.raises(AudioError, match="not found"):
        audio.load(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="not found"):
        audio.probe(tmp_path)  # a directory is no audio file
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no samples"):
        audio.load(zero)


def test_non_finite_samples_are_refused() -> None:
    samples = _tone(0.2, SAMPLE_RATE)
    samples[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        audio.load(_encode(samples, SAMPLE_RATE, "WAV", "FLOAT"))


# ---- output ----------------------------------------------------------------------------------------


def test_write_wav_atomic(tmp_path: Path) -> None:
    samples = np.random.default_rng(1).uniform(-1, 1, 12345).astype(np.float32)
    target = tmp_path / "deep" / "er" / "out.wav"
    assert audio.write_wav_atomic(target, samples) == target
    read, rate = sf.read(target, dtype="float32")
    assert rate == SAMPLE_RATE and np.array_equal(read, samples)
    assert sf.info(target).subtype == "FLOAT"

    # Overwriting replaces the file in one step (a new inode), leaving no temporary files behind.
    inode = target.stat().st_ino
    audio.write_wav_atomic(target, samples[:100], sample_rate=16000)
    read, rate = sf.read(target, dtype="float32")
    assert rate == 16000 and np.array_equal(read, samples[:100])
    assert target.stat().st_ino != inode
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.wav"]


def test_failed_atomic_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        audio.write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_encode_wav_round_trips() -> None:
    samples = _tone(0.1, SAMPLE_RATE)
    data = audio.encode_wav(samples)
    assert data[:4] == b"RIFF"
    assert np.array_equal(audio.load(data), samples)


def test_encode_wav_gives_the_same_bytes_a_second_later() -> None:
    rng = np.random.default_rng(7)
    signals = [rng.uniform(-1, 1, 2400).astype(np.float32), rng.uniform(-1, 1, (2400, 2)).astype(np.float32)]
    first = [audio.encode_wav(samples) for samples in signals]
    time.sleep(1.1)  # libsndfile's PEAK chunk stamps the time in whole seconds
    assert [audio.encode_wav(samples) for samples in signals] == first
    for samples, data in zip(signals, first, strict=True):
        assert b"PEAK" not in data
        info = sf.info(io.BytesIO(data))
        assert (info.subtype, info.channels, info.samplerate) == ("FLOAT", samples.ndim, SAMPLE_RATE)
        read, _ = sf.read(io.BytesIO(data), dtype="float32")
        assert np.array_equal(read, samples)
    # 16-bit WAVs never had a PEAK chunk; the switch leaves them as they were.
    pcm = audio.encode_wav(signals[0], subtype="PCM_16")
    assert pcm == _encode(signals[0], SAMPLE_RATE, "WAV", "PCM_16")


# ---- bounded decoding (issue 10, item 4) -------------------------------------------------------------


def _load_one_shot(source: bytes | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """What audio.load did before it streamed: read everything, downmix, one soxr.resample call."""
    import soxr

    data, rate = sf.read(
        io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32", always_2d=True
    )
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="VHQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


@pytest.fixture(scope="module")
def crafted_flac() -> bytes:
    """384 kHz, 8 channels, 40 s of silence: 123 million samples (492 MB as float32) in about 130 KB."""
    return silent_flac(384_000, 8, 40)


def test_a_file_over_the_decode_budget_is_refused_from_its_header(
    crafted_flac: bytes, tmp_path: Path
) -> None:
    assert len(crafted_flac) < 300_000
    path = tmp_path / "crafted.flac"
    path.write_bytes(crafted_flac)
    limit = f"{audio.MAX_DECODED_SAMPLES:,}"
    for source in (crafted_flac, path):
        started = time.perf_counter()
        for call in (audio.probe, audio.load, audio.check_decodes):
            with pytest.raises(AudioError, match=f"decodes to 122,880,000 samples.*the limit is {limit}"):
                call(source)
        assert time.perf_counter() - started < 1.0  # refused from the header, nothing decoded


def test_the_decode_budget_fits_every_legal_input_and_grows_with_the_duration_limit() -> None:
    assert audio.MAX_DECODED_SAMPLES == 115_200_000
    assert audio.decode_budget(None) == audio.decode_budget(10.0) == audio.MAX_DECODED_SAMPLES
    assert audio.decode_budget(600.0) >= 48_000 * 2 * 600  # any 24-48 kHz stereo input of 600 s
    assert audio.decode_budget(3600.0) == 96_000 * 2 * 3600  # a raised duration limit keeps 96 kHz stereo


def test_a_multichannel_high_rate_file_below_the_budget_loads_like_before() -> None:
    rng = np.random.default_rng(3)
    samples = (0.3 * rng.standard_normal((3 * 96_000 + 123, 6))).astype(np.float32)
    data = _encode(samples, 96_000, "FLAC")
    audio.check_decodes(data)
    out = audio.load(data)
    assert len(out) == 3 * SAMPLE_RATE + 31  # 123 frames at 96 kHz are 30.75 at 24 kHz
    np.testing.assert_allclose(out, _load_one_shot(data), rtol=0, atol=1e-6)


STREAM_TOLERANCE = 1e-6
"""Largest difference allowed between load (streamed: blocks through soxr.ResampleStream) and the
former one-shot load (soxr.resample) where a file is resampled. libsoxr's output does not depend on
how its input is split, and soxr.resample itself feeds it in pieces: with soxr 1.1 the two are
identical, 0.0 apart. 1e-6 (-120 dBFS) leaves room for another soxr build, far below what a 24-bit
sample can hold. Without resampling (24 kHz input) the two must be bit-identical."""


@pytest.mark.parametrize(
    "rate,channels,fmt,subtype",
    [
        (24_000, 1, "WAV", "FLOAT"),
        (24_000, 2, "WAV", "PCM_16"),
        (24_000, 3, "FLAC", None),
        (44_100, 1, "WAV", "PCM_24"),
        (48_000, 2, "FLAC", None),
        (22_050, 2, "OGG", "VORBIS"),
        (8_000, 1, "WAV", "PCM_16"),
    ],
)
def test_streamed_load_equals_the_one_shot_load(
    rate: int, channels: int, fmt: str, subtype: str | None
) -> None:
    rng = np.random.default_rng(rate + channels)
    frames = 2 * audio.DECODE_BLOCK_FRAMES + 777  # several blocks and a partial one
    samples = (0.3 * rng.standard_normal((frames, channels))).astype(np.float32)
    data = _encode(samples, rate, fmt, subtype)
    out, reference = audio.load(data), _load_one_shot(data)
    assert out.dtype == np.float32 and out.flags.c_contiguous and len(out) == len(reference)
    if rate == SAMPLE_RATE:
        assert np.array_equal(out, reference)
    else:
        np.testing.assert_allclose(out, reference, rtol=0, atol=STREAM_TOLERANCE)


def test_the_golden_inputs_load_bit_identically() -> None:
    from fixtures import GOLDEN_DIR

    inputs = sorted((GOLDEN_DIR / "cases").glob("*/input.wav"))
    assert inputs
    for path in inputs:
        assert np.array_equal(audio.load(path), _load_one_shot(path)), path


def test_loading_a_long_file_keeps_memory_bounded(tmp_path: Path) -> None:
    """120 s of 48 kHz stereo: read whole as float32 it is 46 MB, and the old load held that, its
    mono mean and the resampled copy at once. Streamed, the peak is the 11.5 MB result (its chunks
    and their join) plus one block."""
    import tracemalloc

    path = tmp_path / "long.wav"
    block = (0.1 * np.random.default_rng(5).standard_normal((48_000, 2))).astype(np.float32)
    with sf.SoundFile(path, "w", 48_000, 2, "PCM_16", format="WAV") as f:
        for _ in range(120):
            f.write(block)
    result_bytes = 120 * SAMPLE_RATE * 4
    whole_file_bytes = 120 * 48_000 * 2 * 4
    tracemalloc.start()
    try:
        out = audio.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == 120 * SAMPLE_RATE
    assert peak < 2 * result_bytes + 4 * 1024 * 1024 < whole_file_bytes, (peak, result_bytes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_check_decodes_refuses_non_finite_float_wavs(bad: float, subtype: str) -> None:
    samples = _tone(0.5, 44_100)
    samples[2000] = bad
    data = _encode(samples, 44_100, "WAV", subtype)
    audio.probe(data)  # the header is sound
    with pytest.raises(AudioError, match="NaN or infinite"):
        audio.check_decodes(data)
    audio.check_decodes(_encode(_tone(0.5, 44_100), 44_100, "WAV", subtype))  # finite: accepted

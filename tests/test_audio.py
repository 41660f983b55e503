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

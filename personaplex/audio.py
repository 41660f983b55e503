"""Audio input and output: decode whatever soundfile reads, downmix, resample to 24 kHz with soxr.

No torch here: the web tier validates uploads with these functions too.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from personaplex.errors import AudioError
from personaplex.params import SAMPLE_RATE

AudioSource = str | os.PathLike | bytes

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: umask() can only be read by setting it, which races threads
DEFAULT_MAX_SECONDS = 600.0
"""Longest input accepted unless configured otherwise (seconds)."""


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int
    frames: int
    format: str


def _open(source: AudioSource) -> sf.SoundFile:
    if isinstance(source, bytes):
        if not source:
            raise AudioError("The audio file is empty.")
        handle: object = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"Audio file not found: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"The audio file is empty: {path}")
        handle = str(path)
    try:
        return sf.SoundFile(handle)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)
        raise AudioError(f"Could not decode the audio ({reason}). Send WAV, FLAC or OGG audio.") from exc


RIFF_FORMATS = frozenset({"WAV", "WAVEX"})
"""libsndfile's names for RIFF/WAVE files, whose data chunk probe checks against the file size."""


def probe(source: AudioSource, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> AudioInfo:
    """Read the header only and check the duration; raises AudioError on anything unusable."""
    header = source[:65536] if isinstance(source, bytes) else _head(source)
    with _open(source) as f:
        info = AudioInfo(
            duration_s=f.frames / f.samplerate if f.samplerate else 0.0,
            sample_rate=f.samplerate,
            channels=f.channels,
            frames=f.frames,
            format=f.format,
        )
    _check_duration(info.frames, info.duration_s, max_seconds)
    if info.format.upper() in RIFF_FORMATS:
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        _check_wav_complete(header, size)
    return info


def _head(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(65536)
    except OSError:
        return b""  # _open() reports the missing file


def _check_wav_complete(header: bytes, total_size: int) -> None:
    """Refuse a RIFF/WAVE file whose data chunk declares more bytes than the file holds.

    libsndfile silently reads what is there, so a cut-off upload would pass unnoticed.
    """
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(header):
        chunk_id = header[offset : offset + 4]
        (size,) = struct.unpack("<I", header[offset + 4 : offset + 8])
        if chunk_id == b"data":
            available = total_size - offset - 8
            if 0 < size < 0xFFFFFFFF and size > available:
                raise AudioError(
                    f"The WAV file is truncated: its header declares {size} bytes of audio "
                    f"but only {available} arrived."
                )
            return
        offset += 8 + size + (size & 1)


def _check_duration(frames: int, duration_s: float, max_seconds: float | None) -> None:
    if frames <= 0:
        raise AudioError("The audio holds no samples.")
    if max_seconds is not None and duration_s > max_seconds:
        raise AudioError(
            f"The audio is {duration_s:.1f} s long; the limit is {max_seconds:.0f} s. "
            "Split it or raise PERSONAPLEX_MAX_AUDIO_SECONDS."
        )


DECODE_CHECK_BLOCK = 1 << 16
"""Frames decoded at a time by check_decodes (bounded memory whatever the length)."""


def check_decodes(source: AudioSource) -> None:
    """Decode a compressed file (FLAC, OGG) to its end, so a cut-off upload is refused up front.

    Its header names the full length even when the stream stops halfway; only decoding tells. WAV
    needs no decode: probe compares its data chunk with the file size.
    """
    with _open(source) as f:
        if f.format.upper() in RIFF_FORMATS:
            return
        decoded = 0
        try:
            while block := len(f.read(DECODE_CHECK_BLOCK, dtype="float32", always_2d=True)):
                decoded += block
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"The audio is truncated or corrupt ({exc}).") from exc
        if decoded < f.frames:
            raise AudioError(f"The audio is truncated: {decoded} of {f.frames} frames decode.")


def load(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode, downmix to mono and resample: float32 samples [T] at `sample_rate`."""
    probe(source, max_seconds)
    with _open(source) as f:
        try:
            data = f.read(dtype="float32", always_2d=True)  # [T, C]
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"The audio is truncated or corrupt ({exc}).") from exc
        source_rate = f.samplerate
    if data.shape[0] == 0:
        raise AudioError("The audio holds no samples.")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="VHQ").astype(np.float32)
    if not np.all(np.isfinite(mono)):
        raise AudioError("The audio contains NaN or infinite samples.")
    return np.ascontiguousarray(mono, dtype=np.float32)


SFC_SET_ADD_PEAK_CHUNK = 0x1050
"""libsndfile's sf_command switch for the PEAK chunk (sndfile.h); soundfile's cdef leaves it out."""


def encode_wav(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, subtype: str = "FLOAT") -> bytes:
    """WAV bytes of `samples` ([T] or [T, C]); the same samples always give the same bytes.

    Every WAV the service writes comes from here, so that callers can hash outputs to cache them.
    """
    data = np.asarray(samples, dtype=np.float32)
    channels = 1 if data.ndim == 1 else data.shape[1]
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", sample_rate, channels, subtype, format="WAV") as f:
        _drop_peak_chunk(f)
        f.write(data)
    return buffer.getvalue()


def _drop_peak_chunk(f: sf.SoundFile) -> None:
    """Turn off the PEAK chunk of float WAVs: it carries the time of writing, so the same samples
    gave different bytes a second later. Only works before the first frame is written.

    soundfile has no API for this switch but binds sf_command, so it goes through soundfile's cffi
    handle (`_snd`, `SoundFile._file`) rather than stripping the chunk from the bytes afterwards.
    The header libsndfile wrote at open is rewritten with a zero-filled PAD chunk where PEAK was:
    fixed bytes, so still deterministic. Other subtypes have no PEAK chunk; the command is a no-op.
    """
    handle = f._file
    sf._snd.sf_command(handle, SFC_SET_ADD_PEAK_CHUNK, sf._ffi.NULL, sf._snd.SF_FALSE)
    # Switching off returns SF_FALSE on success and on failure alike: only the error state tells.
    if error := sf._snd.sf_error(handle):
        raise sf.LibsndfileError(error, prefix="Could not drop the WAV PEAK chunk: ")


def write_wav_atomic(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a WAV next to its final name and rename it into place, so readers never see half a file."""
    return write_bytes_atomic(path, encode_wav(samples, sample_rate))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared files
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

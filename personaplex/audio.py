"""Audio input and output: decode whatever soundfile reads, downmix, resample to 24 kHz with soxr.

No torch here: the web tier validates uploads with these functions too.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
from collections.abc import Iterator
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
        info = _info(f)
    _check_duration(info.frames, info.duration_s, max_seconds)
    _check_decoded_size(info, max_seconds)
    if info.format.upper() in RIFF_FORMATS:
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        _check_wav_complete(header, size)
    return info


def _info(f: sf.SoundFile) -> AudioInfo:
    return AudioInfo(
        duration_s=f.frames / f.samplerate if f.samplerate else 0.0,
        sample_rate=f.samplerate,
        channels=f.channels,
        frames=f.frames,
        format=f.format,
    )


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


MAX_DECODE_RATE = 96_000 * 2
"""Samples per second of the duration limit a file may decode to: 96 kHz stereo."""
MAX_DECODED_SAMPLES = MAX_DECODE_RATE * int(DEFAULT_MAX_SECONDS)
"""The least decode budget (frames x channels): 600 s of 96 kHz stereo, 115.2 million samples.

Every 24-48 kHz stereo input of the default 600 s limit fits with room to spare, while a 384 kHz
8-channel file (3 million samples a second, which FLAC compresses to almost nothing when silent)
is refused from its header after 37.5 s, before anything is decoded."""


def decode_budget(max_seconds: float | None) -> int:
    """Most samples (frames x channels) a file may decode to under the duration limit `max_seconds`.

    It grows with the duration limit (an operator who raises it keeps 96 kHz stereo) but never
    drops below MAX_DECODED_SAMPLES, so short limits do not refuse ordinary high-rate files.
    """
    if max_seconds is None:
        return MAX_DECODED_SAMPLES
    return max(MAX_DECODED_SAMPLES, math.ceil(max_seconds * MAX_DECODE_RATE))


def _budget_error(samples: int, limit: int, detail: str = "") -> AudioError:
    return AudioError(
        f"The audio decodes to {samples:,} samples{detail}; the limit is {limit:,} samples "
        "(sample rate x channels x seconds: 96 kHz stereo for the duration limit, at least 600 s). "
        "Downmix it or resample it to 48 kHz or less first."
    )


def _check_decoded_size(info: AudioInfo, max_seconds: float | None) -> None:
    """Refuse, from the header alone, a file whose decoded samples would exceed the budget."""
    samples, limit = info.frames * info.channels, decode_budget(max_seconds)
    if samples > limit:
        detail = f" ({info.sample_rate} Hz x {info.channels} channels x {info.duration_s:.1f} s)"
        raise _budget_error(samples, limit, detail)


DECODE_BLOCK_FRAMES = 1 << 16
"""Frames decoded at a time by load and check_decodes: memory stays at one block, whatever the length."""
DECODE_CHECK_BLOCK = DECODE_BLOCK_FRAMES  # the former name
RESAMPLE_QUALITY = "VHQ"
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
"""Sample formats that can hold NaN, infinity or values far outside [-1, 1]."""


class _MonoStream:
    """Decode, downmix and resample an open file block by block: float32 mono chunks at `sample_rate`.

    The chunks joined are exactly what a whole-file read, mean over channels and soxr.resample give:
    the mean is taken frame by frame, and libsoxr's output does not depend on how its input is cut
    into chunks (soxr.resample itself feeds soxr_process piece by piece). Each output chunk is
    checked for NaN and infinity, so a file load refuses is refused by check_decodes too.
    """

    def __init__(self, f: sf.SoundFile, sample_rate: int, budget: int) -> None:
        self.file = f
        self.budget = budget
        self.frames_read = 0
        self._resampler = (
            None
            if f.samplerate == sample_rate
            else soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        )

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            block = self._read()
            last = len(block) == 0
            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
            if self._resampler is not None:
                mono = self._resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
            if not np.all(np.isfinite(mono)):
                raise AudioError("The audio contains NaN or infinite samples.")
            if len(mono):
                yield mono
            if last:
                return

    def _read(self) -> np.ndarray:
        try:
            block = self.file.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)  # [T, C]
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"The audio is truncated or corrupt ({exc}).") from exc
        self.frames_read += len(block)
        if self.frames_read * block.shape[1] > self.budget:  # the header understated the length
            raise _budget_error(
                self.frames_read * block.shape[1], self.budget, " (more than its header says)"
            )
        return block


def check_decodes(
    source: AudioSource, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> None:
    """Run what load runs (decode, downmix, resample, in blocks) to the end, keeping nothing, so an
    upload the worker would refuse is refused up front: a cut-off compressed stream (its header names
    the full length even when it stops halfway; only decoding tells) or NaN and infinite samples.

    PCM WAV needs none of it: probe compares its data chunk with the file size, and integer samples
    are always finite. Float WAV is decoded, since only its samples tell whether they are finite.
    """
    with _open(source) as f:
        _check_decoded_size(_info(f), max_seconds)
        if f.format.upper() in RIFF_FORMATS and f.subtype.upper() not in FLOAT_SUBTYPES:
            return
        stream = _MonoStream(f, sample_rate, decode_budget(max_seconds))
        for _ in stream:
            pass
        if stream.frames_read < f.frames:
            raise AudioError(f"The audio is truncated: {stream.frames_read} of {f.frames} frames decode.")


def load(
    source: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode, downmix to mono and resample: float32 samples [T] at `sample_rate`.

    Done in blocks (see _MonoStream): memory holds the result and one block, not the whole file
    decoded as float32 at its own rate and channel count.
    """
    probe(source, max_seconds)
    with _open(source) as f:
        stream = _MonoStream(f, sample_rate, decode_budget(max_seconds))
        chunks = list(stream)
    if stream.frames_read == 0:
        raise AudioError("The audio holds no samples.")
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def integrated_loudness(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """ITU-R BS.1770 integrated loudness (LUFS) by pyloudnorm's meter, the one the reference
    normalises voice prompts with; -inf for silence, ValueError under one 400 ms block."""
    import pyloudnorm  # it imports scipy (a second or so): only voice prompts pay for it

    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(samples))


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

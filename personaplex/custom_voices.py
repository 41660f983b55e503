"""Custom voices: a recording uploaded once, kept in Redis, and used by id wherever a voice is.

The web tier checks an upload (`check_voice_recording`) and stores its samples, decoded to 24 kHz
mono float32 exactly as the engine's `--voice-prompt file.wav` path decodes a file, so a job with the
voice conditions on the same samples as the offline CLI does with the original WAV. The first worker
that uses the voice loudness-normalises and Mimi-encodes them, and stores the codes beside the
recording, keyed by the Mimi weights, device type and dtype that made them (`codes_key`): later jobs,
on any worker with the same model, never re-encode. Redis is the only thing web and workers share, so
nothing assumes a shared disk, and the voice survives restarts of both.

Keys (personaplex.jobs.Keys): `voices` (zset: id -> created_at) and `voice:<id>` (hash: `meta` JSON,
`audio` float WAV, `codes:<codes key>` .npy bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import redis

from personaplex import audio as audio_io
from personaplex.errors import AudioError, UnknownVoiceError
from personaplex.jobs import Keys
from personaplex.params import SAMPLE_RATE

CUSTOM_PREFIX = "custom-"
CUSTOM_CATEGORY = "custom"
VOICE_ID_PATTERN = r"^custom-[a-z0-9]+(?:-[a-z0-9]+)*$"
_VOICE_ID = re.compile(VOICE_ID_PATTERN)
MAX_NAME_CHARS = 64
MAX_SLUG_CHARS = 48
MIN_SECONDS = 1.0
MAX_SECONDS = 60.0
MIN_LOUDNESS_LUFS = -70.0
"""Quieter than this is silence to the meter (its absolute gate); the −24 LUFS normalisation of
silence would scale the samples to infinity."""

AUDIO_FIELD = "audio"
META_FIELD = "meta"
CODES_FIELD_PREFIX = "codes:"


class VoiceNameTaken(ValueError):
    """Another custom voice already has this name (or one that gives the same id)."""

    def __init__(self, name: str, voice_id: str) -> None:
        self.voice_id = voice_id
        super().__init__(f"The name {name!r} is taken: the voice {voice_id} exists. Pick another name.")


def is_custom_voice(name: str) -> bool:
    """Whether `name` is a custom voice's id in form (it may not exist); 'custom-a.wav' is a file."""
    return bool(_VOICE_ID.fullmatch(name))


def check_voice_id(voice_id: str) -> str:
    """The id if it is a well-formed custom voice id (safe in keys, paths and URLs), else ValueError."""
    if not _VOICE_ID.fullmatch(voice_id):
        raise ValueError(
            f"Invalid custom voice id {voice_id[:80]!r}: ids look like 'custom-my-voice' "
            "(lower-case letters, digits and single hyphens)."
        )
    return voice_id


def voice_id_for(name: str) -> str:
    """The id a voice named `name` gets: 'Anna (studio)' -> 'custom-anna-studio'; ValueError for a
    name with no letter or digit to keep."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    slug = "-".join(re.findall(r"[a-z0-9]+", ascii_name))[:MAX_SLUG_CHARS].strip("-")
    if not slug:
        raise ValueError(
            "name must hold at least one ASCII letter or digit (the voice's id is made from it)."
        )
    return CUSTOM_PREFIX + slug


def check_voice_name(name: str) -> str:
    """The name, stripped, if it is 1..MAX_NAME_CHARS printable characters with a letter or digit."""
    name = name.strip()
    if not name:
        raise ValueError("name is required: the voice's display name, e.g. 'Anna'.")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"name is too long: the limit is {MAX_NAME_CHARS} characters, got {len(name)}.")
    if any(unicodedata.category(c)[0] == "C" for c in name):
        raise ValueError("name must not hold control or format characters.")
    voice_id_for(name)
    return name


@dataclass(frozen=True)
class Recording:
    """A checked upload: 24 kHz mono float32 samples, their length and loudness."""

    samples: np.ndarray
    duration_s: float
    loudness_lufs: float


def check_voice_recording(data: bytes) -> Recording:
    """Decode and check an uploaded voice: 1-60 s of audio at any rate and channel count, finite
    samples, integrated loudness above MIN_LOUDNESS_LUFS. Raises AudioError saying what is wrong."""
    if not data:
        raise AudioError("The uploaded voice recording is empty.")
    length = audio_io.probe(data, max_seconds=None).duration_s
    if length > MAX_SECONDS:
        raise AudioError(
            f"The voice recording is too long: {length:.1f} s; a voice takes {MAX_SECONDS:g} s at most."
        )
    samples = audio_io.load(data, SAMPLE_RATE, max_seconds=MAX_SECONDS)  # NaN and inf checked
    duration = len(samples) / SAMPLE_RATE
    if duration < MIN_SECONDS:
        raise AudioError(
            f"The voice recording is too short: {duration:.2f} s; it needs {MIN_SECONDS:g} s or more."
        )
    loudness = audio_io.integrated_loudness(samples)
    if not loudness > MIN_LOUDNESS_LUFS:
        shown = "silence" if not np.isfinite(loudness) else f"{loudness:.1f} LUFS"
        raise AudioError(
            f"The voice recording is silent or nearly so ({shown}); it must be louder than "
            f"{MIN_LOUDNESS_LUFS:g} LUFS to be normalised."
        )
    return Recording(samples=samples, duration_s=round(duration, 3), loudness_lufs=round(loudness, 2))


@dataclass(frozen=True)
class Consent:
    """The uploader's attestation that the speaker agreed to this use of their voice."""

    at: float
    address: str | None


@dataclass(frozen=True)
class CustomVoice:
    """A custom voice's record (its samples and codes are stored beside it)."""

    id: str
    name: str
    created_at: float
    duration_s: float
    loudness_lufs: float
    digest: str
    """SHA-256 of the stored samples: what the workers' prompt cache keys on."""
    consent: Consent
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> CustomVoice:
        data = json.loads(raw)
        return cls(**{**data, "consent": Consent(**data["consent"])})


class VoiceStore:
    """The custom voices in Redis; every method is one or two round trips."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(
        self, name: str, recording: Recording, address: str | None, owner: str | None = None
    ) -> CustomVoice:
        """Store a checked recording as a new voice; VoiceNameTaken if its id exists already."""
        name = check_voice_name(name)
        voice_id = voice_id_for(name)
        audio = audio_io.encode_wav(recording.samples)
        now = time.time()
        voice = CustomVoice(
            id=voice_id,
            name=name,
            created_at=now,
            duration_s=recording.duration_s,
            loudness_lufs=recording.loudness_lufs,
            digest=hashlib.sha256(recording.samples.tobytes()).hexdigest(),
            consent=Consent(at=now, address=address),
            owner=owner,
        )
        keys = [Keys.voice(voice_id), Keys.VOICES]
        if not self.redis.eval(_CREATE, 2, *keys, json.dumps(voice.to_dict()), audio, voice_id, now):
            raise VoiceNameTaken(name, voice_id)
        return voice

    def get(self, voice_id: str) -> CustomVoice | None:
        """The voice, or None if it does not exist (a malformed id does not either)."""
        try:
            key = Keys.voice(check_voice_id(voice_id))
        except ValueError:
            return None
        raw = self.redis.hget(key, META_FIELD)
        return None if raw is None else CustomVoice.from_json(raw)

    def require(self, voice_id: str) -> CustomVoice:
        """The voice, or UnknownVoiceError saying it was deleted or never made."""
        voice = self.get(voice_id)
        if voice is None:
            raise UnknownVoiceError(
                voice_id,
                reason="no custom voice has this id: it was deleted, or never created (GET /api/voices)",
            )
        return voice

    def list_voices(self) -> list[CustomVoice]:
        """Every custom voice, oldest first."""
        ids = [i.decode() if isinstance(i, bytes) else i for i in self.redis.zrange(Keys.VOICES, 0, -1)]
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for voice_id in ids:
                pipe.hget(Keys.voice(voice_id), META_FIELD)
            raws = pipe.execute()
        return [CustomVoice.from_json(raw) for raw in raws if raw is not None]

    def delete(self, voice_id: str) -> bool:
        """Remove the voice, its recording and its codes; False if there was none."""
        key = Keys.voice(check_voice_id(voice_id))
        with self.redis.pipeline() as pipe:
            pipe.delete(key)
            pipe.zrem(Keys.VOICES, voice_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def samples(self, voice: CustomVoice) -> np.ndarray:
        """The stored 24 kHz samples of `voice`; UnknownVoiceError if it was deleted meanwhile."""
        audio = self.redis.hget(Keys.voice(voice.id), AUDIO_FIELD)
        if audio is None:
            self.require(voice.id)  # raises: the record went with it
            raise AudioError(f"The recording of the custom voice {voice.id} is missing; upload it again.")
        return audio_io.load(audio, SAMPLE_RATE, max_seconds=None)

    def codes(self, voice: CustomVoice, codes_key: str) -> np.ndarray | None:
        """The Mimi codes [8, F] a model with `codes_key` made of `voice`, or None if none has yet."""
        raw = self.redis.hget(Keys.voice(voice.id), CODES_FIELD_PREFIX + codes_key)
        return None if raw is None else np.load(io.BytesIO(raw), allow_pickle=False)

    def save_codes(self, voice: CustomVoice, codes_key: str, codes: np.ndarray) -> None:
        """Keep the codes for the next job; not written if the voice was deleted meanwhile."""
        buffer = io.BytesIO()
        np.save(buffer, codes.astype(np.int16), allow_pickle=False)
        key = Keys.voice(voice.id)
        self.redis.eval(
            _SAVE_IF_SAME_VOICE, 1, key, CODES_FIELD_PREFIX + codes_key, buffer.getvalue(), voice.digest
        )


_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'audio', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
"""
"""A voice is stored whole or not at all, and never over another of the same id."""

_SAVE_IF_SAME_VOICE = """
local meta = redis.call('HGET', KEYS[1], 'meta')
if not meta or not string.find(meta, ARGV[3], 1, true) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
"""Codes are written only into the voice they were made from: a voice deleted and made again under
the same name while a worker encoded the old one has another digest."""

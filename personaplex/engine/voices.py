"""Voice prompts: what a voice name means, and how it conditions the LM.

A catalog voice (`NATF2.pt`, ...) is a `.pt` of precomputed embeddings and the cache the reference
saved after replaying them; a `.wav` voice is encoded by Mimi after loudness normalisation, as the
reference conditions it. A custom voice (`custom-<slug>`, personaplex.custom_voices) is a WAV voice
whose samples and codes live in Redis. Files outside the catalog are for local callers (the CLI,
offline); the web tier sends catalog and custom ids only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex.catalog import normalize_voice_name, voice_ids
from personaplex.custom_voices import VoiceStore
from personaplex.engine import codec
from personaplex.engine.loaders import LoadedModels
from personaplex.errors import AudioError, UnknownVoiceError
from personaplex.params import SAMPLE_RATE

VOICE_LOUDNESS_LUFS = -24.0
"""Integrated loudness a `.wav` voice is normalised to before Mimi encodes it (the reference's)."""


@dataclass
class VoicePrompt:
    """What a voice feeds the prompt phase: catalog embeddings and cache, or a WAV's Mimi codes."""

    embeddings: torch.Tensor | None = None  # [N, 1, 1, D] from a catalog .pt
    cache: torch.Tensor | None = None  # [1, 17, 4]
    codes: torch.Tensor | None = None  # [1, 8, F] from a .wav


@dataclass(frozen=True)
class VoiceSource:
    """A job's voice before it is loaded: what identifies its content (the prompt cache's key) and
    how to load it."""

    key: tuple[Hashable, ...]
    load: Callable[[LoadedModels], VoicePrompt]


def file_voice_source(path: Path) -> VoiceSource:
    """The voice of a `.pt` or `.wav` file, keyed by where it is and its size and mtime."""
    stat = path.stat()
    return VoiceSource(
        key=(str(path.resolve()), stat.st_mtime_ns, stat.st_size), load=lambda m: load_voice_prompt(m, path)
    )


def codes_key(mimi_weights: Path, models: LoadedModels) -> str:
    """Names the Mimi that encodes WAV voices: its weights (size, first and last MiB, so a hub
    snapshot and its copy on another host agree without hashing the whole file), device type and
    dtype. Codes made under one key are what any worker with that key would make."""
    size = mimi_weights.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with mimi_weights.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read())
    dtype = str(models.mimi.dtype).removeprefix("torch.")
    return f"{digest.hexdigest()[:16]}-{models.device.type}-{dtype}"


def custom_voice_source(store: VoiceStore, voice_id: str, key: str) -> VoiceSource:
    """A custom voice (UnknownVoiceError if it is gone), keyed by its content; loading it takes the
    codes a worker with the same `key` stored, or encodes them and stores them for the next job."""
    voice = store.require(voice_id)

    def load(models: LoadedModels) -> VoicePrompt:
        codes = store.codes(voice, key)
        if codes is not None:
            return VoicePrompt(codes=torch.from_numpy(codes.astype(np.int64))[None].to(models.device))
        encoded = encode_voice(models, store.samples(voice), voice.id)
        store.save_codes(voice, key, encoded[0].cpu().numpy())
        return VoicePrompt(codes=encoded)

    return VoiceSource(key=("custom", voice.id, voice.digest), load=load)


def resolve_voice(name: str, voices_dir: Path, voice_prompt_dir: Path | None = None) -> Path:
    """The file `name` means: a catalog id in `voices_dir`, else a `.pt`/`.wav` path (first under
    `voice_prompt_dir`, then as given); UnknownVoiceError lists the catalog otherwise."""
    catalog_name = normalize_voice_name(name)
    if catalog_name is not None:
        path = voices_dir / catalog_name
        if path.is_file():
            return path
    candidates = [Path(name)]
    if voice_prompt_dir is not None:
        candidates.insert(0, voice_prompt_dir / name)
    for path in candidates:
        if path.suffix in (".pt", ".wav") and path.is_file():
            return path
    raise UnknownVoiceError(name, voice_ids())


def load_voice_prompt(models: LoadedModels, path: Path) -> VoicePrompt:
    """The voice at `path`, on the models' device and dtype."""
    if path.suffix == ".pt":
        state = torch.load(path, map_location=models.device, weights_only=True)
        return VoicePrompt(embeddings=state["embeddings"].to(models.dtype), cache=state["cache"])
    samples = audio_io.load(path, SAMPLE_RATE, max_seconds=None)
    return VoicePrompt(codes=encode_voice(models, samples, path.name))


def encode_voice(models: LoadedModels, samples: np.ndarray, label: str) -> torch.Tensor:
    """Mimi codes [1, 8, F] of voice samples at SAMPLE_RATE, normalised as the reference does."""
    return codec.encode(models.mimi, normalized_voice_samples(samples, label))


def normalized_voice_samples(samples: np.ndarray, label: str) -> np.ndarray:
    """Voice samples at SAMPLE_RATE normalised to VOICE_LOUDNESS_LUFS with pyloudnorm."""
    import pyloudnorm

    try:
        loudness = audio_io.integrated_loudness(samples)
    except ValueError as exc:
        raise AudioError(f"The voice prompt {label} is too short to measure its loudness.") from exc
    if not np.isfinite(loudness):
        raise AudioError(f"The voice prompt {label} is silent: it has no loudness to normalise.")
    normalized = pyloudnorm.normalize.loudness(samples, loudness, VOICE_LOUDNESS_LUFS)
    return np.asarray(normalized, dtype=np.float32)

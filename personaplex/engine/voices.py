"""Voice prompts: which file a voice name means, and how it conditions the LM.

A catalog voice (`NATF2.pt`, ...) is a `.pt` of precomputed embeddings and the cache the reference
saved after replaying them; a `.wav` voice is encoded by Mimi after loudness normalisation, as the
reference conditions it. Files outside the catalog are for local callers (the CLI, offline); the
web tier sends catalog ids only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from personaplex import audio as audio_io
from personaplex.catalog import normalize_voice_name, voice_ids
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
    return VoicePrompt(codes=codec.encode(models.mimi, normalized_voice_audio(path)))


def normalized_voice_audio(path: Path) -> np.ndarray:
    """A voice WAV at SAMPLE_RATE, normalised to VOICE_LOUDNESS_LUFS with pyloudnorm."""
    import pyloudnorm  # it imports scipy (a second or so): only WAV voices pay for that

    samples = audio_io.load(path, SAMPLE_RATE, max_seconds=None)
    try:
        loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(samples)
    except ValueError as exc:
        raise AudioError(f"The voice prompt {path.name} is too short to measure its loudness.") from exc
    if not np.isfinite(loudness):
        raise AudioError(f"The voice prompt {path.name} is silent: it has no loudness to normalise.")
    normalized = pyloudnorm.normalize.loudness(samples, loudness, VOICE_LOUDNESS_LUFS)
    return np.asarray(normalized, dtype=np.float32)

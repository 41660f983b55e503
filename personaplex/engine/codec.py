"""Mimi encode and decode over whole recordings.

Offline, the input is known in full: encode it once and decode once, instead of per frame.
Long recordings go in chunks that carry enough left context for the causal convolutions and
every transformer layer's sliding window, so chunking changes nothing but memory use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from transformers import MimiModel

from personaplex.params import FRAME_SIZE

CHUNK_FRAMES = 1500
"""Frames (120 s) per encode/decode call; bounds the attention mask's memory."""
CONV_MARGIN_FRAMES = 16
"""Extra left context for the convolutions around the transformers (frames)."""


def context_frames(mimi: MimiModel) -> int:
    """Frames of history that can reach an output: one window per transformer layer (at 25 Hz)."""
    config = mimi.config
    steps_per_frame = config.encodec_frame_rate / config.frame_rate
    return math.ceil(config.num_hidden_layers * config.sliding_window / steps_per_frame) + CONV_MARGIN_FRAMES


def pad_to_frames(samples: np.ndarray) -> np.ndarray:
    """Zero-pad to a whole number of frames, as the reference pads its last chunk."""
    frames = max(1, math.ceil(len(samples) / FRAME_SIZE))
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[: len(samples)] = samples
    return padded


@torch.inference_mode()
def encode(mimi: MimiModel, samples: np.ndarray, chunk_frames: int = CHUNK_FRAMES) -> torch.Tensor:
    """Mono 24 kHz samples → codes [1, Q, F], F = ceil(len / 1920)."""
    padded = torch.from_numpy(pad_to_frames(samples)).to(mimi.device)
    frames = padded.numel() // FRAME_SIZE
    context = context_frames(mimi)
    pieces = []
    for start in range(0, frames, chunk_frames):
        stop = min(frames, start + chunk_frames)
        left = max(0, start - context)
        audio = padded[left * FRAME_SIZE : stop * FRAME_SIZE].view(1, 1, -1)
        codes = mimi.encode(audio).audio_codes  # [1, Q, stop - left]
        pieces.append(codes[..., start - left :])
    return torch.cat(pieces, dim=-1)


@torch.inference_mode()
def decode(
    mimi: MimiModel,
    codes: torch.Tensor,
    chunk_frames: int = CHUNK_FRAMES,
    before_chunk: Callable[[], None] | None = None,
) -> np.ndarray:
    """Codes [1, Q, F] → float32 samples [F * 1920].

    `before_chunk` runs before each chunk; what it raises stops the decode (the engine's cancel check).
    """
    frames = codes.shape[-1]
    context = context_frames(mimi)
    pieces = []
    for start in range(0, frames, chunk_frames):
        if before_chunk is not None:
            before_chunk()
        stop = min(frames, start + chunk_frames)
        left = max(0, start - context)
        audio = mimi.decode(codes[..., left:stop].to(mimi.device)).audio_values  # [1, 1, samples]
        pieces.append(audio[0, 0, (start - left) * FRAME_SIZE :].float().cpu())
    return torch.cat(pieces).numpy()

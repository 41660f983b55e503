"""Token sampling: temperature, top-k, then the exponential race (argmax of p / Exp(1)).

The race uses one exponential per candidate, drawn from the job's own generator, so a job's seed
alone decides its tokens, whatever else runs in the process. The frame loops draw a frame's noise
up front with `draw_noise` (text, then the 8 audio steps), the same calls eagerly and captured,
so both give the same tokens for the same seed.
"""

from __future__ import annotations

import os

import torch


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A per-job generator; seed -1 draws a fresh random seed."""
    if seed == -1:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def draw_noise(generator: torch.Generator | None, text: torch.Tensor, audio: torch.Tensor) -> None:
    """One row's race noise for one frame, in place: text [k_text] first, then audio [8 * k_audio]."""
    text.exponential_(1.0, generator=generator)
    audio.exponential_(1.0, generator=generator)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    greedy: bool,
    generator: torch.Generator | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] → token ids [B]. `noise` [B, min(top_k, V)]: the race's draws, if made already."""
    assert logits.dim() == 2, logits.shape
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    race = noise if noise is not None else torch.empty_like(top_p).exponential_(1.0, generator=generator)
    winner = (top_p / race).argmax(dim=-1, keepdim=True)
    return top_i.gather(-1, winner)[:, 0]

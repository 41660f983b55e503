"""Token sampling: temperature, top-k, then the exponential race (argmax of p / Exp(1)).

The race draws one exponential per candidate from the job's own generator, so a job's seed
alone decides its tokens, whatever else runs in the process.
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


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits [B, V] → token ids [B]."""
    assert logits.dim() == 2, logits.shape
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    race = torch.empty_like(top_p).exponential_(1.0, generator=generator)
    winner = (top_p / race).argmax(dim=-1, keepdim=True)
    return top_i.gather(-1, winner)[:, 0]

"""The prompt phase in one pass, and a cache of the state it leaves.

Every token of the prompt phase (voice, silence, text prompt, silence) is forced, and its outputs
are discarded: the state it leaves, the temporal keys and values of its positions and the token
ring, depends only on the model, the voice and the text prompt, never on sampling or the seed.
So instead of one temporal step per prompt frame, `prefill` walks the token ring through the
prompt frames (no model), embeds each frame's input as a step would, and runs the temporal
transformer over all of them in one causal pass (`fast.temporal_prefill`). Both loops can start
from that state (`FrameLoop.start_from`, a `JobPlan`'s `prompt`), and `PromptCache` keeps it on the
device for the next job with the same voice and prompt.

In fp32 on a CPU the pass sums in another order than single steps (one matrix product over the
prompt's positions instead of one per position), so its keys differ from the stepped ones in the
last bits; the golden cases hold on both (tests/test_golden.py runs each), and `Engine(prefill=
False)` keeps the stepwise phase.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

from personaplex.engine.fast import JobPlan, temporal_prefill
from personaplex.engine.frames import FrameLoop, Sampling
from personaplex.engine.loaders import LoadedModels
from personaplex.fleet import PromptCacheStats


@dataclass(frozen=True)
class PromptState:
    """What a job's prompt phase leaves behind: enough to start its first generate frame."""

    keys: torch.Tensor
    """[layers, H, W, head_dim]: the temporal keys of the last W prompt positions, oldest first
    (W = all of them, or one less than the sliding window: the next step attends to no older ones)."""
    values: torch.Tensor
    positions: int
    """Temporal steps the prompt ran: the position of the first generate frame."""
    tokens: torch.Tensor
    """[K, ring slots]: the token ring."""
    provided: torch.Tensor
    """[K, ring slots] bool: which of its tokens are forced."""
    offset: int
    """The ring's offset."""
    frames: int
    """Prompt frames it stands for."""

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.tokens, self.provided)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kept_positions(self) -> range:
        """The positions whose keys and values it holds."""
        return range(self.positions - self.keys.shape[2], self.positions)


@torch.inference_mode()
def prefill(models: LoadedModels, plan: JobPlan, delays: tuple[int, ...]) -> PromptState:
    """The state after `plan`'s prompt frames (its first `prompt_frames`), computed in one pass."""
    loop = FrameLoop(models, delays, Sampling(), None, device=torch.device("cpu"))
    tokens = torch.cat(list(_prompt_tokens(loop, plan)))  # [P, K], on the CPU
    inputs = loop.embed(tokens.clamp(min=0))[:, 0]  # [P, D]; replayed frames may hold unset slots
    if plan.replay_frames:  # every replayed frame runs the model: they are the first inputs
        inputs[: plan.replay_frames] = plan.embeddings.to(inputs.dtype)
    keys, values = temporal_prefill(models, inputs)
    positions = inputs.shape[0]
    keep = min(positions, int(models.moshi.config.sliding_window) - 1)
    ring, device = loop.ring, models.device
    return PromptState(
        keys=keys[:, :, positions - keep :].contiguous(),
        values=values[:, :, positions - keep :].contiguous(),
        positions=positions,
        tokens=ring.tokens[0].to(device),
        provided=ring.provided[0].to(device),
        offset=ring.offset,
        frames=plan.prompt_frames,
    )


def _prompt_tokens(loop: FrameLoop, plan: JobPlan) -> Iterator[torch.Tensor]:
    """The tokens [1, K] each prompt frame that runs the model is fed, with `loop`'s token ring walked
    through the frames as `FrameLoop`'s prompt methods (and `FastLoop`'s schedule) walk it."""
    texts, agents, users = plan.text.tolist(), plan.agent.cpu(), plan.user.cpu()
    for t in range(plan.prompt_frames):
        replaying = t < plan.replay_frames
        fed = loop.enter_frame(users[t][None], agents[t][None], texts[t], replaying)
        if fed is not None:
            assert loop.ring.all_forced(), (
                f"prompt frame {t} leaves a token to sample: it cannot be prefilled"
            )
            loop.ring.finish_forced()
            yield fed.clone()
        if t == plan.replay_frames - 1:
            assert plan.voice_cache is not None
            # FrameLoop.replay_voice_embeddings: only the tokens are restored
            loop.ring.tokens.copy_(plan.voice_cache.cpu().expand_as(loop.ring.tokens))


class PromptCache:
    """Prompt states on the worker's device, bounded in bytes, least recently used out first.

    Keyed by what the state depends on (the voice file and the text prompt's tokens; the engine
    builds the key); one cache belongs to one loaded model and is cleared when the model goes.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[Hashable, PromptState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: Hashable) -> PromptState | None:
        with self._lock:
            state = self._states.get(key)
            if state is None:
                self.misses += 1
                return None
            self._states.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: Hashable, state: PromptState) -> None:
        """Keep `state` (unless it alone exceeds the budget), dropping the least recently used."""
        with self._lock:
            self._states.pop(key, None)
            if state.nbytes > self.max_bytes:
                return
            self._states[key] = state
            while self.nbytes > self.max_bytes:
                self._states.popitem(last=False)

    def stats(self) -> PromptCacheStats:
        with self._lock:
            entries, nbytes = len(self._states), self.nbytes
        return {
            "entries": entries,
            "megabytes": round(nbytes / 2**20, 3),
            "budget_megabytes": round(self.max_bytes / 2**20, 3),
            "hits": self.hits,
            "misses": self.misses,
        }

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

"""The per-frame loop: PersonaPlex's offline generation, driven over transformers' modules.

Streams per frame (K = 17): 0 text, 1-8 agent audio, 9-16 user audio. Tokens wait in a small
ring (`TokenRing`) at their delayed slot; each step reads the previous slot as the model's input
and fills the current one, forced where a token was provided, sampled elsewhere. The ring's
rules, down to which slot keeps which stale value, are the reference's: the golden vectors only
match if they are kept exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from personaplex.engine.loaders import LoadedModels
from personaplex.engine.sampling import draw_noise, sample
from personaplex.params import GenerationParams

if TYPE_CHECKING:
    from personaplex.engine.prompt import PromptState

TEXT_PAD = 3
"""Text id forced during prompts (and printed as PAD); 0 is EPAD."""
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
AUDIO_STREAMS = 8
AGENT = slice(1, 1 + AUDIO_STREAMS)
USER = slice(1 + AUDIO_STREAMS, 1 + 2 * AUDIO_STREAMS)
UNGENERATED = -2


@dataclass(frozen=True)
class Sampling:
    """The sampling part of GenerationParams (its defaults are those, the reference CLI's)."""

    greedy: bool = GenerationParams.greedy
    temp_audio: float = GenerationParams.temp_audio
    temp_text: float = GenerationParams.temp_text
    topk_audio: int = GenerationParams.topk_audio
    topk_text: int = GenerationParams.topk_text


class TokenRing:
    """Tokens per stream at their delayed positions, `max_delay + 3` slots deep."""

    def __init__(self, batch: int, delays: tuple[int, ...], initial: torch.Tensor) -> None:
        device = initial.device
        self.delays = torch.tensor(delays, device=device)
        self.max_delay = max(delays)
        self.slots = self.max_delay + 3
        self.initial = initial  # [K]
        shape = (batch, len(delays), self.slots)
        self.tokens = torch.full(shape, UNGENERATED, dtype=torch.long, device=device)
        self.provided = torch.zeros(shape, dtype=torch.bool, device=device)
        self.offset = 0
        self._streams = torch.arange(len(delays), device=device)

    def force(self, streams: slice, values: torch.Tensor) -> None:
        """Provide `values` [B, n] for `streams`, each at offset + its delay."""
        ks = self._streams[streams]
        slots = (self.offset + self.delays[streams]) % self.slots
        self.tokens[:, ks, slots] = values
        self.provided[:, ks, slots] = True

    def begin_step(self) -> bool:
        """Seed the initial tokens; False for the very first step, which runs no model."""
        for k, delay in enumerate(self.delays.tolist()):
            if self.offset <= delay:
                slot = self.offset % self.slots
                self.tokens[:, k, slot] = self.initial[k]
                self.provided[:, k, slot] = True
        if self.offset == 0:
            self.tokens[:, :, 0] = self.initial
            self.offset = 1
            return False
        return True

    @property
    def input_slot(self) -> int:
        return (self.offset - 1) % self.slots

    @property
    def target_slot(self) -> int:
        return self.offset % self.slots

    def model_input(self) -> torch.Tensor:
        return self.tokens[:, :, self.input_slot]  # [B, K]

    def all_forced(self) -> bool:
        """Whether every generated stream's token at the target slot was provided (a prompt frame)."""
        return bool(self.provided[:, : 1 + AUDIO_STREAMS, self.target_slot].all())

    def finish_forced(self) -> torch.Tensor | None:
        """`finish_step` for a frame whose every token is forced: nothing sampled is stored."""
        forced = self.tokens[:, : 1 + AUDIO_STREAMS, self.target_slot]
        return self.finish_step(forced[:, 0], forced[:, 1:])

    def finish_step(self, text: torch.Tensor, audio: torch.Tensor) -> torch.Tensor | None:
        """Store sampled tokens where nothing was forced; return the undelayed frame [B, 9] if ready."""
        target = self.target_slot
        self.provided[:, :, self.input_slot] = False
        keep = self.provided[:, : 1 + AUDIO_STREAMS, target]
        sampled = torch.cat([text[:, None], audio], dim=1)
        current = self.tokens[:, : 1 + AUDIO_STREAMS, target]
        self.tokens[:, : 1 + AUDIO_STREAMS, target] = torch.where(keep, current, sampled)
        if self.offset <= self.max_delay:
            self.offset += 1
            return None
        gen_delays = self.delays[: 1 + AUDIO_STREAMS]
        slots = (self.offset - self.max_delay + gen_delays) % self.slots
        frame = self.tokens[:, self._streams[: 1 + AUDIO_STREAMS], slots]
        self.offset += 1
        return frame


class FrameLoop:
    """One job's (or one batch's) generation state: token ring, temporal KV cache, sampling."""

    def __init__(
        self,
        models: LoadedModels,
        delays: tuple[int, ...],
        sampling: Sampling,
        generator: torch.Generator | None,
        batch: int = 1,
        device: torch.device | None = None,
    ) -> None:
        """`device`: where the token ring lives (default: the models'); a ring on the CPU walks
        forced frames without a kernel launch per token (personaplex.engine.prompt)."""
        self.models = models
        self.moshi = models.moshi
        self.sampling = sampling
        self.generator = generator
        device = device or models.device
        config = self.moshi.config
        initial = torch.tensor(
            [config.vocab_size] + [config.audio_vocab_size] * (len(delays) - 1), device=device
        )
        self.ring = TokenRing(batch, delays, initial)
        self.cache = DynamicCache(config=config)
        self.position = 0
        self.silence = torch.tensor(SILENCE_TOKENS, device=device).expand(batch, -1)
        self.sine = torch.tensor(SINE_TOKENS, device=device).expand(batch, -1)
        self.batch = batch

    # ---- the model -------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the 16 audio embeddings then the text one, in the reference's order: [B, 1, D].

        Row by row the same sums whatever B is, so the prompt's frames are embedded in one call."""
        tokens = tokens.to(self.models.device)
        total = None
        for i, table in enumerate(self.moshi.embed_tokens):
            emb = table(tokens[:, 1 + i])
            total = emb if total is None else total + emb
        total = total + self.moshi.decoder.model.embed_tokens(tokens[:, 0])
        return total[:, None]

    def temporal(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the temporal transformer: normed hidden [B, 1, D], text logits [B, V]."""
        positions = torch.full((self.batch, 1), self.position, device=embeddings.device)
        out = self.moshi.decoder.model(
            inputs_embeds=embeddings, position_ids=positions, cache=self.cache, use_cache=True
        )
        self.position += 1
        hidden = out.last_hidden_state
        return hidden, self.moshi.decoder.lm_head(hidden)[:, 0].float()

    def depth(
        self,
        text: torch.Tensor,
        hidden: torch.Tensor,
        forced: torch.Tensor,
        provided: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 8 depth steps: each fed the previous token (forced where provided). Returns sampled [B, 8]."""
        depth = self.moshi.depth_decoder
        cache = DynamicCache(config=depth.config)
        previous, sampled = text, []
        s = self.sampling
        for step in range(AUDIO_STREAMS):
            table = depth.text_embed_tokens if step == 0 else depth.embed_tokens[step - 1]
            out = depth(
                input_ids=previous[:, None],
                inputs_embeds=table(previous)[:, None],
                last_hidden_state=hidden,
                cache=cache,
                use_cache=True,
            )
            step_noise = None if noise is None else noise[:, step]
            token = sample(
                out.logits[:, 0].float(), s.temp_audio, s.topk_audio, s.greedy, self.generator, step_noise
            )
            sampled.append(token)
            previous = torch.where(provided[:, step], forced[:, step], token)
        return torch.stack(sampled, dim=1)

    # ---- one frame -------------------------------------------------------------------------
    def step(
        self,
        user: torch.Tensor | None = None,
        agent: torch.Tensor | None = None,
        text: int | torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Advance one frame. Tokens given are forced; `embeddings` replaces the model's input sum."""
        tokens = self.enter_frame(user, agent, text, replaying=embeddings is not None)
        if tokens is None:
            return None
        hidden, text_logits = self.temporal(self.embed(tokens) if embeddings is None else embeddings)
        return self._sample_and_store(hidden, text_logits)

    def enter_frame(
        self,
        user: torch.Tensor | None = None,
        agent: torch.Tensor | None = None,
        text: int | torch.Tensor | None = None,
        replaying: bool = False,
    ) -> torch.Tensor | None:
        """A frame's token work before the model: force the tokens given, seed the ring; returns the
        tokens the model is fed [B, K] (replayed embeddings replace their sum), or None on the very
        first frame, which runs no model."""
        ring = self.ring
        while True:
            if user is not None:
                ring.force(USER, user)
            if agent is not None:
                ring.force(AGENT, agent)
            if text is not None:
                ring.force(slice(0, 1), self._text_column(text))
            if ring.begin_step():
                return ring.model_input()
            if not replaying:
                return None
            # Replayed voice embeddings skip the reference's silent first step, as it does.

    def _text_column(self, text: int | torch.Tensor) -> torch.Tensor:
        if isinstance(text, int):
            return torch.full((self.batch, 1), text, device=self.silence.device)
        return text.view(self.batch, 1)

    def _sample_and_store(self, hidden: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor | None:
        ring = self.ring
        target = ring.target_slot
        provided = ring.provided[:, : 1 + AUDIO_STREAMS, target]
        forced = ring.tokens[:, : 1 + AUDIO_STREAMS, target]
        if ring.all_forced():
            # Prompt frames force every token: sampling would be discarded, so skip it.
            return ring.finish_forced()
        s = self.sampling
        text_noise, audio_noise = self._draw_noise(text_logits.shape[-1])
        text = sample(text_logits, s.temp_text, s.topk_text, s.greedy, self.generator, text_noise)
        next_text = torch.where(provided[:, 0], forced[:, 0], text)
        audio = self.depth(next_text, hidden, forced[:, 1:], provided[:, 1:], audio_noise)
        return ring.finish_step(text, audio)

    def _draw_noise(self, text_vocab: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The frame's race noise, drawn up front per row (text, then audio), as the fast loop draws it."""
        s = self.sampling
        if s.greedy or self.generator is None:
            return None, None
        device = self.silence.device
        k_text = min(s.topk_text, text_vocab)
        k_audio = min(s.topk_audio, self.moshi.config.audio_vocab_size)
        text = torch.empty(self.batch, k_text, device=device)
        audio = torch.empty(self.batch, AUDIO_STREAMS, k_audio, device=device)
        for row in range(self.batch):
            draw_noise(self.generator, text[row], audio[row].view(-1))
        return text, audio

    # ---- prompt phases ---------------------------------------------------------------------
    def start_from(self, state: PromptState) -> None:
        """Take up the state a prompt phase left (`personaplex.engine.prompt`), instead of stepping it:
        the token ring, the position, and the temporal cache as transformers' layers hold it."""
        ring = self.ring
        ring.tokens.copy_(state.tokens.expand_as(ring.tokens))
        ring.provided.copy_(state.provided.expand_as(ring.provided))
        ring.offset = state.offset
        self.position = state.positions
        batch = (self.batch, -1, -1, -1)
        for index, layer in enumerate(self.cache.layers):
            layer.update(state.keys[index].expand(batch), state.values[index].expand(batch))
            if hasattr(layer, "cumulative_length"):  # a sliding layer counts every position it saw
                layer.cumulative_length = state.positions

    def replay_voice_embeddings(self, embeddings: torch.Tensor, cache: torch.Tensor) -> None:
        """Voice prompt from a catalog .pt: replay its inputs, then restore its token ring."""
        dummy = self.ring.initial[AGENT].expand(self.batch, -1)
        for frame in embeddings:  # [N, B, 1, D]
            self.step(user=dummy, agent=dummy, text=TEXT_PAD, embeddings=frame)
        # Only the tokens are restored; the provided flags stay as the replay left them.
        self.ring.tokens.copy_(cache.expand_as(self.ring.tokens))

    def voice_frame(self, codes: torch.Tensor) -> None:
        self.step(user=self.sine, agent=codes, text=TEXT_PAD)

    def silence_frame(self) -> None:
        self.step(user=self.sine, agent=self.silence, text=TEXT_PAD)

    def text_prompt_frame(self, token: int) -> None:
        self.step(user=self.sine, agent=self.silence, text=token)

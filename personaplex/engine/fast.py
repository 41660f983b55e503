"""The fast frame loop: one batched, static-shape step per frame, captured in a CUDA graph on a GPU.

`FrameLoop` (frames.py) drives transformers' modules and is the reference for what a frame does.
This loop does the same work with compact functions over the *same* weight tensors, in a form a
CUDA graph can hold, with as few kernels per frame as the same results allow:

- each layer's q, k and v projections are one matmul: the temporal layers' parameters are
  rebound, once, to row slices of one fused tensor (no extra memory, FrameLoop sees the same
  weights); the depth layers' stacked weights get a fused copy (~300 MB at the real size);
  per-layer work that does not depend on the layer (the attention mask, the rotary angles, the
  depth input projections, the race noise) is done once per frame; bench/kernels.py counts it;
- every buffer is allocated once (token ring, KV caches, schedules, noise, outputs) and updated
  in place; shapes never change between frames;
- the temporal KV cache is a ring per layer, `[B, H, slots, head_dim]`, written at
  `position % window` where `window = min(sliding_window, frames)`; each slot remembers the position
  it holds, so an explicit per-row mask admits exactly the last `sliding_window` positions that row
  wrote (the config's window, `context - 1` as the reference attends: see convert.moshi_config);
- each row has its own position, token-ring offset and frame counter, so rows of different
  lengths and prompts run side by side and each gets exactly what it gets alone;
- what each row is fed at each frame (forced text, agent and user tokens, replayed voice
  embeddings, the voice's token cache) is a schedule on the device, indexed by the row's frame
  counter inside the step: nothing is copied in per frame;
- sampling keeps `personaplex.engine.sampling.sample`'s semantics; the exponential race noise is drawn
  outside the step, per row from the row's own generator, into a static buffer (`draw_noise`,
  the same calls in the same order as `FrameLoop`), so a seed gives the same tokens eagerly,
  captured, alone or batched; columns past a row's top-k hold +inf, so the race needs no masks;
- no host synchronisation: outputs accumulate on the device and are read once at the end.

On a CPU the step runs eagerly (the tests compare it with `FrameLoop`), over the rows up to the last
busy one and the KV slots rows have written (`_first_rows`, `_written_slots`), since there an idle
row or an empty slot costs as much as a used one; on CUDA `capture=True`
warms it up on a side stream and records two graphs, the full step and a temporal-only step for
frames where every row is in its prompt (all tokens forced, so nothing is sampled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from personaplex.engine.convert import rope_inverse_frequencies
from personaplex.engine.frames import (
    AUDIO_STREAMS,
    SILENCE_TOKENS,
    SINE_TOKENS,
    TEXT_PAD,
    UNGENERATED,
    Sampling,
)
from personaplex.engine.loaders import LoadedModels
from personaplex.engine.sampling import draw_noise

if TYPE_CHECKING:
    from personaplex.engine.prompt import PromptState

GEN = 1 + AUDIO_STREAMS
"""Streams generated per frame: text and the 8 agent codebooks."""
SLOT_ALIGN = 16
"""KV slots are allocated in multiples of this (attention kernels like aligned masks)."""


# ---- what one job feeds the loop ------------------------------------------------------------------
@dataclass
class JobPlan:
    """One row's frames in order. Prompt frames force text and agent tokens; the rest sample them.

    `text[t]` is the forced text id, or -1 on generate frames (whose outputs are the job's result).
    `user` is forced on every frame. When `embeddings` is given, the first N frames feed those
    inputs instead of the embedded tokens, and `voice_cache` replaces the token ring after them.
    With a `prompt` (its prefilled state, personaplex.engine.prompt), a row starts at its first
    generate frame from that state: its prompt frames stand in the schedule but are never stepped.
    """

    text: torch.Tensor  # [T] long
    agent: torch.Tensor  # [T, 8] long
    user: torch.Tensor  # [T, 8] long
    embeddings: torch.Tensor | None = None  # [N, D]
    voice_cache: torch.Tensor | None = None  # [17, ring slots] long
    sampling: Sampling = Sampling()
    generator: torch.Generator | None = None
    prompt: PromptState | None = None

    def __post_init__(self) -> None:
        prompt = (self.text >= 0).tolist()
        self.prompt_frames = sum(prompt)
        # Prompt frames first, then generate frames: that makes "text forced" equal FrameLoop's
        # "every token provided" test, which decides whether a frame samples (and draws noise).
        assert prompt == [True] * self.prompt_frames + [False] * (len(prompt) - self.prompt_frames), prompt
        self.replay_frames = 0 if self.embeddings is None else int(self.embeddings.shape[0])
        assert self.replay_frames == 0 or self.voice_cache is not None
        assert self.replay_frames <= self.prompt_frames
        assert self.prompt is None or (self.prompt.frames == self.prompt_frames and not self.replay_frames)

    def __len__(self) -> int:
        return int(self.text.shape[0])

    @property
    def generate_frames(self) -> int:
        return len(self) - self.prompt_frames

    @property
    def frames_to_run(self) -> int:
        """Frames a row steps for this job in a loop (its prompt's too unless prefilled)."""
        return len(self) - self.first_frame

    @property
    def first_frame(self) -> int:
        """The frame a row starts at: the first generate frame when its prompt is prefilled."""
        return 0 if self.prompt is None else self.prompt_frames

    def samples_at(self, t: int) -> bool:
        """Whether frame t draws race noise: a sampling job on a generate frame that runs the model."""
        if self.generator is None or self.sampling.greedy or t >= len(self) or t < self.prompt_frames:
            return False
        return not (t == 0 and self.replay_frames == 0)  # the very first frame runs no model


def plan_job(
    models: LoadedModels,
    user_codes: torch.Tensor,
    text_tokens: Sequence[int],
    silence_frames: int,
    *,
    voice_embeddings: torch.Tensor | None = None,
    voice_cache: torch.Tensor | None = None,
    voice_codes: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    prompt: PromptState | None = None,
) -> JobPlan:
    """The frames `Engine` runs for one job: voice, silence, text prompt, silence, then user audio.

    user_codes [8, F]; voice_embeddings [N, 1, 1, D] or [N, D] with voice_cache [1, 17, S]; or
    voice_codes [8, Fv] (a .wav voice). Mirrors `FrameLoop`'s prompt-phase methods. With a
    prefilled `prompt` instead of a voice and text, its frames are forced silence in the schedule.
    """
    device = models.device
    audio_initial = models.moshi.config.audio_vocab_size
    silence = torch.tensor(SILENCE_TOKENS, device=device)
    sine = torch.tensor(SINE_TOKENS, device=device)
    texts: list[torch.Tensor] = []
    agents: list[torch.Tensor] = []
    users: list[torch.Tensor] = []

    def add(count: int, text: torch.Tensor | int, agent: torch.Tensor, user: torch.Tensor) -> None:
        if count == 0:
            return
        if isinstance(text, int):
            text = torch.full((count,), text, dtype=torch.long, device=device)
        texts.append(text.to(device=device, dtype=torch.long))
        agents.append(agent.to(device=device, dtype=torch.long).expand(count, AUDIO_STREAMS))
        users.append(user.to(device=device, dtype=torch.long).expand(count, AUDIO_STREAMS))

    embeddings = cache = None
    if prompt is not None:
        add(prompt.frames, TEXT_PAD, silence, sine)
        text_tokens, silence_frames = (), 0
    elif voice_embeddings is not None:
        embeddings = voice_embeddings.reshape(voice_embeddings.shape[0], -1).to(device)
        cache = voice_cache.reshape(voice_cache.shape[-2], voice_cache.shape[-1]).to(device)
        dummy = torch.full((AUDIO_STREAMS,), audio_initial, device=device)
        add(embeddings.shape[0], TEXT_PAD, dummy, dummy)
    elif voice_codes is not None:
        add(voice_codes.shape[-1], TEXT_PAD, voice_codes.T, sine)
    add(silence_frames, TEXT_PAD, silence, sine)
    add(len(text_tokens), torch.tensor(list(text_tokens), dtype=torch.long), silence, sine)
    add(silence_frames, TEXT_PAD, silence, sine)
    add(user_codes.shape[-1], -1, silence, user_codes.T)
    return JobPlan(
        text=torch.cat(texts),
        agent=torch.cat(agents),
        user=torch.cat(users),
        embeddings=embeddings,
        voice_cache=cache,
        sampling=sampling or Sampling(),
        generator=generator,
        prompt=prompt,
    )


# ---- the compact model ----------------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MoshiRMSNorm: computed in fp32, cast back. `weight` is already fp32.

    The last multiply writes straight into a tensor of x's dtype: computed in fp32 and rounded on
    the store, the same values as `(y * weight).type_as(x)` with one kernel fewer.
    """
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if x.dtype == torch.float32:
        return y * weight
    return torch.mul(y, weight, out=torch.empty_like(x))


def _aligned(slots: int) -> int:
    """`slots` rounded up to a multiple of SLOT_ALIGN."""
    return -(-slots // SLOT_ALIGN) * SLOT_ALIGN


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [x2, x1] over the last dim, one kernel; with a sine whose first half is negated,
    `_swap_halves(x) * sin` is exactly transformers' `rotate_half(x) * sin` (negation is exact)."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)


@dataclass
class _Layer:
    norm1: torch.Tensor  # fp32
    norm2: torch.Tensor  # fp32
    qkv: torch.Tensor  # [3 * H * hd, D]: q, k and v projections in one matmul
    o: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor


QKV_ATTRIBUTE = "_personaplex_qkv"


def _shared_qkv(attn: torch.nn.Module) -> torch.Tensor:
    """The temporal layer's q, k, v weights as one [3 * out, in] tensor, with no extra memory.

    The first call concatenates them once and rebinds the three parameters to row slices of the
    result (contiguous views: transformers' modules, which FrameLoop drives, see the same values
    in the same layout); later calls find the fused tensor on the module.
    """
    params = [attn.q_proj.linear.weight, attn.k_proj.linear.weight, attn.v_proj.linear.weight]
    fused = getattr(attn, QKV_ATTRIBUTE, None)
    if fused is not None and _are_rows_of(params, fused):
        return fused
    # Made in the parameters' own mode: an engine that loaded its model under inference_mode holds
    # inference tensors, and a parameter cannot switch kinds.
    with torch.inference_mode(params[0].is_inference()), torch.no_grad():
        fused = torch.cat([p.detach() for p in params])
        start = 0
        for param in params:
            rows = param.shape[0]
            param.data = fused[start : start + rows]
            start += rows
    setattr(attn, QKV_ATTRIBUTE, fused)
    return fused


def _are_rows_of(params: list[torch.Tensor], fused: torch.Tensor) -> bool:
    start = 0
    for param in params:
        if param.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr():
            return False
        if param.data_ptr() != fused[start].data_ptr() or not param.is_contiguous():
            return False
        start += param.shape[0]
    return start == fused.shape[0]


def _stacked_qkv(attn: torch.nn.Module) -> torch.Tensor:
    """The depth layer's per-step q, k, v weights [steps, 3 * out, in]: a copy (~300 MB at the real
    size), made once per module; the stacked parameters stay as transformers uses them."""
    params = [attn.q_proj.linear.weight, attn.k_proj.linear.weight, attn.v_proj.linear.weight]
    key = tuple(p.data_ptr() for p in params)
    cached = getattr(attn, QKV_ATTRIBUTE, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(params[0].is_inference()), torch.no_grad():
        fused = torch.cat([p.detach() for p in params], dim=1)
    setattr(attn, QKV_ATTRIBUTE, (key, fused))
    return fused


_ROW_BUFFERS = (
    "rows",
    "paused",
    "tokens",
    "provided",
    "offset",
    "position",
    "t",
    "slot_position",
    "out",
    "s_text",
    "s_agent",
    "s_user",
    "s_embeddings",
    "s_cache",
    "length",
    "replay_length",
    "cache_at",
    "temp_text",
    "temp_audio",
    "greedy_text",
    "greedy_audio",
    "noise_text",
    "noise_audio",
    "audio_noise_index",
)
"""FastLoop's per-row state and settings, whose first dimension is the row."""
_ROW_BUFFER_LISTS = ("k_cache", "v_cache", "dkv_cache")
_DEPTH_ROW_BUFFERS = ("noise_audio", "audio_noise_index", "temp_audio", "greedy_audio")
"""The per-row settings the depth steps read."""
"""FastLoop's per-layer lists of per-row caches."""


def _row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear for x [B, L, D], one matrix product per row b: its result does not depend on B."""
    return torch.bmm(x, weight.T.expand(x.shape[0], -1, -1))


def _layer(module: torch.nn.Module, step: int | None = None) -> _Layer:
    """A decoder layer's weights (the step's slice of the depth decoder's stacked weights)."""
    attn = module.self_attn
    pick = (lambda w: w) if step is None else (lambda w: w[step])
    return _Layer(
        norm1=module.input_layernorm.weight.float(),
        norm2=module.post_attention_layernorm.weight.float(),
        qkv=_shared_qkv(attn) if step is None else _stacked_qkv(attn)[step],
        o=pick(attn.o_proj.linear.weight),
        fc1=pick(module.mlp.fc1.weight),
        fc2=pick(module.mlp.fc2.weight),
    )


def _linear_for(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """CPU GEMM kernels block rows together, so a row's sums depend on how many rows there are;
    one product per row keeps every row bit for bit what its job gives alone (and what the
    reference's one-row loop gives). On CUDA one GEMM for the batch is what makes it fast."""
    return _row_linear if device.type == "cpu" else F.linear


def _gated_mlp(linear: Callable, y: torch.Tensor, layer: _Layer, act: Callable) -> torch.Tensor:
    g = linear(y, layer.fc1)
    B, L, _ = g.shape
    g = g.view(B, L, 2, -1)
    return linear(act(g[..., 0, :]) * g[..., 1, :], layer.fc2)


@dataclass
class _Temporal:
    """The temporal transformer in the compact form: its layers' weights and rotary constants."""

    layers: list[_Layer]
    out_norm: torch.Tensor  # fp32
    eps: float
    text_head: torch.Tensor
    heads: int
    head_dim: int
    act: Callable
    inv_freq: torch.Tensor
    sin_sign: torch.Tensor  # first half negated: see _swap_halves

    @classmethod
    def of(cls, models: LoadedModels) -> _Temporal:
        moshi, device = models.moshi, models.device
        decoder = moshi.decoder.model
        attn = decoder.layers[0].self_attn
        head_dim = attn.head_dim
        half = head_dim // 2
        return cls(
            layers=[_layer(layer) for layer in decoder.layers],
            out_norm=decoder.norm.weight.float(),
            eps=decoder.norm.eps,
            text_head=moshi.decoder.lm_head.weight,
            heads=attn.num_heads,
            head_dim=head_dim,
            act=decoder.layers[0].mlp.activation_fn,
            inv_freq=rope_inverse_frequencies(head_dim, moshi.config.rope_parameters["rope_theta"]).to(
                device
            ),
            sin_sign=torch.tensor([-1.0] * half + [1.0] * half, device=device),
        )

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [*positions.shape, head_dim] at those positions (transformers' values)."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), (angles.sin() * self.sin_sign).to(dtype)


@torch.inference_mode()
def temporal_prefill(models: LoadedModels, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [layers, H, P, head_dim] the temporal transformer writes for P consecutive
    input embeddings [P, D] at positions 0 .. P-1, in one causal pass: each position attends to the
    last `sliding_window` positions up to its own, as `FastLoop._temporal` admits them step by step.

    Only the caches are kept (the prompt phase discards its outputs), so the last layer stops at its
    keys and values.
    """
    model = _Temporal.of(models)
    linear = _linear_for(models.device)
    P, H, hd = inputs.shape[0], model.heads, model.head_dim
    positions = torch.arange(P, device=inputs.device)
    cos, sin = model.rotary(positions, inputs.dtype)  # [P, hd]
    window = int(models.moshi.config.sliding_window)
    query, key = positions[:, None], positions[None, :]
    visible = (key <= query) & (key > query - window)
    mask = torch.zeros(P, P, dtype=inputs.dtype, device=inputs.device).masked_fill(~visible, float("-inf"))
    keys, values = [], []
    h = inputs[None]  # [1, P, D]
    for index, layer in enumerate(model.layers):
        y = _rms(h, layer.norm1, model.eps)
        qkv = linear(y, layer.qkv).view(1, P, 3, H, hd).permute(0, 2, 3, 1, 4)  # [1, 3, H, P, hd]
        qk = qkv[:, :2]
        qk = qk * cos + _swap_halves(qk) * sin
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]  # [1, H, P, hd]
        keys.append(k[0])
        values.append(v[0])
        if index == len(model.layers) - 1:
            break
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + linear(a.transpose(1, 2).reshape(1, P, H * hd), layer.o)
        h = h + _gated_mlp(linear, _rms(h, layer.norm2, model.eps), layer, model.act)
    return torch.stack(keys), torch.stack(values)


# ---- the loop -------------------------------------------------------------------------------------
class FastLoop:
    """B jobs stepped together, one frame per call; static buffers, optional CUDA graph capture.

    `batch`, `frames`, `replay_frames` and `topk` (text, audio) are capacities (default: what `plans`
    need); a loop can be `load`ed again with other plans that fit them, reusing its graphs, and a
    job can join a free row while the others run (`load_row`, `free_row`). A row without a job idles
    through every step (length 0).
    """

    def __init__(
        self,
        models: LoadedModels,
        plans: Sequence[JobPlan],
        delays: Sequence[int],
        capture: bool = False,
        frames: int | None = None,
        replay_frames: int | None = None,
        sampling: bool | None = None,
        batch: int | None = None,
        topk: tuple[int, int] | None = None,
    ) -> None:
        self.models = models
        self._linear = _linear_for(models.device)
        moshi = models.moshi
        config = moshi.config
        device, dtype = models.device, models.dtype
        self.device, self.dtype = device, dtype
        B = self.batch = max(batch or 0, len(plans))
        self.frames = T = max(frames or 0, *(len(p) for p in plans))
        self.replay = N = max(replay_frames or 0, *(p.replay_frames for p in plans))
        self.delays_list = list(delays)
        K = self.streams = len(delays)
        self.max_delay = max(delays)
        S = self.ring_slots = self.max_delay + 3
        self.sliding_window = int(config.sliding_window)
        self.window = min(self.sliding_window, T)
        self.slots = _aligned(self.window + 1)  # +1: a scratch slot
        text_vocab, audio_vocab = config.vocab_size, config.audio_vocab_size
        self.text_vocab, self.audio_vocab = text_vocab, audio_vocab
        least_text, least_audio = topk or (0, 0)  # capacities for jobs that join later
        self.topk_text = min(max(least_text, *(p.sampling.topk_text for p in plans)), text_vocab)
        self.topk_audio = min(max(least_audio, *(p.sampling.topk_audio for p in plans)), audio_vocab)
        self.sampling = any(p.generator is not None and not p.sampling.greedy for p in plans)
        if sampling is not None:
            self.sampling = self.sampling or sampling

        # weights: views of the transformers modules' parameters
        decoder = moshi.decoder.model
        self.audio_tables = [table.weight for table in moshi.embed_tokens]
        self.text_table = decoder.embed_tokens.weight
        self.temporal_model = _Temporal.of(models)
        depth = moshi.depth_decoder
        self.depth_text_table = depth.text_embed_tokens.weight
        self.depth_tables = [table.weight for table in depth.embed_tokens]
        self.depth_in = depth.input_projections.weight  # [8, depth D, D]
        self.depth_in_all = self.depth_in.reshape(-1, self.depth_in.shape[-1])  # 8 steps, one matmul
        self.depth_heads = depth.lm_heads.weight
        self.depth_layers = [[_layer(layer, s) for layer in depth.layers] for s in range(AUDIO_STREAMS)]
        self.depth_eps = depth.layers[0].input_layernorm.eps
        dattn = depth.layers[0].self_attn
        self.depth_heads_n, self.depth_head_dim = dattn.num_heads, dattn.head_dim
        self.depth_act = depth.layers[0].mlp.activation_fn

        long = dict(dtype=torch.long, device=device)
        # constants
        self.rows = torch.arange(B, **long)
        self.delays = torch.tensor(self.delays_list, **long)
        self.initial = torch.tensor([text_vocab] + [audio_vocab] * (K - 1), **long)
        self.mask_open = torch.zeros((), dtype=dtype, device=device)
        self.mask_shut = torch.full((), float("-inf"), dtype=dtype, device=device)
        # state
        self.tokens = torch.empty(B, K, S, **long)
        self.provided = torch.empty(B, K, S, dtype=torch.bool, device=device)
        self.offset = torch.empty(B, **long)
        self.position = torch.empty(B, **long)
        self.t = torch.empty(B, **long)
        self.paused = torch.zeros(B, dtype=torch.bool, device=device)
        """Rows that do not step this frame (a live conversation whose next input has not arrived)."""
        self.slot_position = torch.empty(B, self.slots, **long)
        H, hd, layers = self.temporal_model.heads, self.temporal_model.head_dim, self.temporal_model.layers
        self.k_cache = [torch.zeros(B, H, self.slots, hd, dtype=dtype, device=device) for _ in layers]
        self.v_cache = [torch.zeros(B, H, self.slots, hd, dtype=dtype, device=device) for _ in layers]
        dh, dhd = self.depth_heads_n, self.depth_head_dim
        # depth keys and values together, [B, 2, H, steps, hd]: one copy writes both per step
        self.dkv_cache = [
            torch.zeros(B, 2, dh, AUDIO_STREAMS, dhd, dtype=dtype, device=device) for _ in depth.layers
        ]
        self.out = torch.zeros(B, T + 1, GEN, **long)
        # schedules (index T / N: a padding entry for rows past their end)
        self.s_text = torch.empty(B, T + 1, **long)
        self.s_agent = torch.empty(B, T + 1, AUDIO_STREAMS, **long)
        self.s_user = torch.empty(B, T + 1, AUDIO_STREAMS, **long)
        self.s_embeddings = torch.zeros(B, N + 1, config.hidden_size, dtype=dtype, device=device)
        self.s_cache = torch.empty(B, K, S, **long)
        self.length = torch.empty(B, **long)
        self.replay_length = torch.empty(B, **long)
        self.cache_at = torch.empty(B, **long)
        # per-row sampling settings and race noise (filled outside the step)
        self.temp_text = torch.empty(B, 1, dtype=torch.float32, device=device)
        self.temp_audio = torch.empty(B, 1, dtype=torch.float32, device=device)
        self.greedy_text = torch.empty(B, dtype=torch.bool, device=device)
        self.greedy_audio = torch.empty(B, dtype=torch.bool, device=device)
        # Race noise: each row draws its top-k columns; the rest hold +inf, so p / noise is 0 there
        # and the race never picks a candidate outside the row's own top-k (no masks in the step).
        # noise_audio's last column is such an +inf, where audio_noise_index sends the columns
        # past a row's k_audio; it gathers every depth step's noise [B, 8 * topk_audio] at once.
        self.noise_text = torch.ones(B, self.topk_text, dtype=torch.float32, device=device)
        self.noise_audio = torch.ones(
            B, AUDIO_STREAMS * self.topk_audio + 1, dtype=torch.float32, device=device
        )
        self.audio_noise_index = torch.empty(B, AUDIO_STREAMS * self.topk_audio, **long)

        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.plans: list[JobPlan | None] = [None] * B
        """Each row's job (None: the row idles); rows join and leave as `load_row` and `free_row` say."""
        self.t_host: list[int] = [0] * B
        """Each row's frame count on the host: its own, from the frame its job joined."""
        self.paused_rows: set[int] = set()
        """`paused` on the host."""
        self.load(plans)
        if capture:
            self._capture()

    # ---- jobs ----------------------------------------------------------------------------------
    def fits(self, plans: Sequence[JobPlan]) -> bool:
        """Whether `plans` can be loaded into this loop (and its graphs) as it is."""
        return (
            0 < len(plans) <= self.batch
            and all(len(p) <= self.frames and p.replay_frames <= self.replay for p in plans)
            and all(min(p.sampling.topk_text, self.text_vocab) <= self.topk_text for p in plans)
            and all(min(p.sampling.topk_audio, self.audio_vocab) <= self.topk_audio for p in plans)
            and (self.sampling or not any(p.generator is not None and not p.sampling.greedy for p in plans))
        )

    @torch.inference_mode()
    def load(self, plans: Sequence[JobPlan]) -> None:
        """Reset every row's state and copy in the jobs' schedules and settings (rows 0, 1, ...)."""
        assert self.fits(plans), "plans exceed this loop's capacities"
        self.plans = [None] * self.batch
        self.t_host = [0] * self.batch
        self._reset()
        self.s_text.fill_(-1)
        self.s_agent.zero_()
        self.s_user.zero_()
        self.s_embeddings.zero_()
        self.s_cache.copy_(self.initial[None, :, None].expand_as(self.s_cache))
        self.cache_at.fill_(-1)
        self._idle_settings()
        self.length.zero_()
        self.replay_length.zero_()
        for b, plan in enumerate(plans):
            self._write_row(b, plan)

    @torch.inference_mode()
    def load_row(self, b: int, plan: JobPlan) -> None:
        """Start `plan` in row `b` while the other rows run on: the row's state is reset to a fresh
        loop's, in place (captured graphs read the same buffers), so the job gets exactly the tokens
        it gets alone. Its frame count starts at 0 whatever frame the loop is at."""
        assert self.plans[b] is None, f"row {b} is busy"
        assert self.fits([plan]), "the plan exceeds this loop's capacities"
        self.tokens[b] = UNGENERATED
        self.provided[b] = False
        self.offset[b] = 0
        self.position[b] = 0
        self.t[b] = 0
        self.pause(b, False)
        self.slot_position[b] = -1
        for cache in (*self.k_cache, *self.v_cache, *self.dkv_cache):
            cache[b] = 0
        self.out[b] = 0
        self.noise_text[b] = 1.0
        self.noise_audio[b] = 1.0
        self.s_text[b] = -1
        self.s_agent[b] = 0
        self.s_user[b] = 0
        self.s_embeddings[b] = 0
        self.s_cache[b] = self.initial[:, None]
        self.cache_at[b] = -1
        self.t_host[b] = 0
        self._write_row(b, plan)

    def free_row(self, b: int) -> None:
        """Take row `b`'s job out: the row idles (length 0) until a job is loaded into it."""
        self.plans[b] = None
        self.pause(b, False)
        self.length[b] = 0
        self.replay_length[b] = 0
        self.temp_text[b] = 1.0
        self.temp_audio[b] = 1.0
        self.greedy_text[b] = True
        self.greedy_audio[b] = True
        self.audio_noise_index[b] = AUDIO_STREAMS * self.topk_audio

    def pause(self, b: int, paused: bool = True) -> None:
        """Hold row `b` where it is (`paused`), or let it step again: the others go on either way."""
        if paused == (b in self.paused_rows):
            return
        self.paused[b] = paused
        if paused:
            self.paused_rows.add(b)
        else:
            self.paused_rows.discard(b)

    def feed(self, b: int, t: int, user: torch.Tensor) -> None:
        """The user codes [8] row `b` is fed at its frame `t` (a live row's input, as it arrives)."""
        self.s_user[b, t] = user.to(self.device)

    @torch.inference_mode()
    def frame_at(self, b: int, t: int) -> torch.Tensor:
        """Row `b`'s output at its frame `t` [9] (text, then 8 agent codes), on the CPU (a copy)."""
        return self.out[b, t].to("cpu", copy=True)

    def horizon(self) -> int:
        """Frames until every busy row has ended (0 with none)."""
        return max(
            (len(p) - t for p, t in zip(self.plans, self.t_host, strict=True) if p is not None), default=0
        )

    def free_rows(self) -> list[int]:
        """The rows without a job, lowest first."""
        return [b for b, plan in enumerate(self.plans) if plan is None]

    def _write_row(self, b: int, plan: JobPlan) -> None:
        """Copy a job's schedules and sampling settings into row `b` (its state is already fresh)."""
        n = len(plan)
        self.s_text[b, :n] = plan.text
        self.s_agent[b, :n] = plan.agent
        self.s_user[b, :n] = plan.user
        if plan.replay_frames:
            self.s_embeddings[b, : plan.replay_frames] = plan.embeddings.to(self.dtype)
            self.s_cache[b] = plan.voice_cache
            self.cache_at[b] = plan.replay_frames - 1
        s = plan.sampling
        self.temp_text[b] = s.temp_text if s.temp_text > 0 else 1.0
        self.temp_audio[b] = s.temp_audio if s.temp_audio > 0 else 1.0
        self.greedy_text[b] = s.greedy or s.temp_text <= 0 or plan.generator is None
        self.greedy_audio[b] = s.greedy or s.temp_audio <= 0 or plan.generator is None
        kt, ka = self._row_topk(plan)
        inf = float("inf")
        self.noise_text[b, kt:] = inf
        self.noise_audio[b, AUDIO_STREAMS * self.topk_audio :] = inf
        cols = torch.arange(self.topk_audio, device=self.device)
        index = torch.arange(AUDIO_STREAMS, device=self.device)[:, None] * ka + cols[None]
        index = torch.where(cols[None] < ka, index, AUDIO_STREAMS * self.topk_audio)
        self.audio_noise_index[b] = index.flatten()
        self.length[b] = n
        self.replay_length[b] = plan.replay_frames
        if plan.prompt is not None:
            self._start_from(b, plan.prompt)
        self.plans[b] = plan

    def _start_from(self, b: int, state: PromptState) -> None:
        """Row `b` takes up a prefilled prompt phase: the token ring, position and temporal caches it
        left (each kept position in its slot, as the steps would have written it), at the first
        generate frame."""
        self.tokens[b] = state.tokens
        self.provided[b] = state.provided
        self.offset[b] = state.offset
        self.position[b] = state.positions
        self.t[b] = state.frames
        self.t_host[b] = state.frames
        kept = state.kept_positions
        positions = torch.arange(kept.start, kept.stop, device=self.device)
        slots = positions % self.window
        self.slot_position[b, slots] = positions
        for k_cache, v_cache, keys, values in zip(
            self.k_cache, self.v_cache, state.keys, state.values, strict=True
        ):
            k_cache[b, :, slots] = keys.to(self.dtype)
            v_cache[b, :, slots] = values.to(self.dtype)

    def _idle_settings(self) -> None:
        """Sampling settings for rows without a job: greedy, and noise that is never drawn."""
        self.temp_text.fill_(1.0)
        self.temp_audio.fill_(1.0)
        self.greedy_text.fill_(True)
        self.greedy_audio.fill_(True)
        self.audio_noise_index.fill_(AUDIO_STREAMS * self.topk_audio)  # the +inf column

    def _row_topk(self, plan: JobPlan) -> tuple[int, int]:
        s = plan.sampling
        return min(s.topk_text, self.topk_text), min(s.topk_audio, self.topk_audio)

    def _reset(self) -> None:
        self.paused.zero_()
        self.paused_rows.clear()
        self.tokens.fill_(UNGENERATED)
        self.provided.zero_()
        self.offset.zero_()
        self.position.zero_()
        self.t.zero_()
        self.slot_position.fill_(-1)
        for cache in (*self.k_cache, *self.v_cache, *self.dkv_cache):
            cache.zero_()
        self.out.zero_()
        self.noise_text.fill_(1.0)
        self.noise_audio.fill_(1.0)

    # ---- running -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, frames: int, before_frame: Callable[[int], bool] | None = None) -> int:
        """Step every row up to `frames` times (rows past their end idle); returns the frames stepped.

        `before_frame(i)` runs before the i-th step; True stops the run there (rows left, so the
        caller re-plans), and an exception it raises (a cancel) propagates.
        """
        for index in range(frames):
            if before_frame is not None and before_frame(index):
                return index
            depth = False
            for b, plan in enumerate(self.plans):
                t = self.t_host[b]
                if plan is None or b in self.paused_rows:
                    continue
                if plan.samples_at(t):
                    kt, ka = self._row_topk(plan)
                    draw_noise(
                        plan.generator, self.noise_text[b, :kt], self.noise_audio[b, : AUDIO_STREAMS * ka]
                    )
                depth = depth or plan.prompt_frames <= t < len(plan)
            if self.graphs:
                self.graphs[depth].replay()
            elif self._linear is _row_linear:
                with self._first_rows(self._busy_span()):
                    self._step(depth, self._written_slots())
            else:
                self._step(depth)
            self.t_host = [t + (b not in self.paused_rows) for b, t in enumerate(self.t_host)]
        return frames

    def _busy_span(self) -> int:
        """Rows 0 .. the last with a job: the rows an eager step computes (at least one)."""
        busy = [b for b, plan in enumerate(self.plans) if plan is not None]
        return busy[-1] + 1 if busy else 1

    def _written_slots(self) -> int:
        """KV slots [0, n) that hold every slot a row can attend to this frame, SLOT_ALIGN-rounded:
        what an eager CPU step attends over, so a short job beside nothing long attends over its own
        few slots, not the loop's whole window.

        A row has stepped at most `t_host` positions before this frame, and a ring writes position p
        at slot `p % window`, so no row holds a slot past the largest `t_host` (all of them once a
        row has wrapped around). The slots past n are empty in every row and masked out, and on the
        CPU masked slots past a SLOT_ALIGN boundary do not change attention's sums (tests/test_fast.py
        checks it).
        """
        longest = max(
            (t for plan, t in zip(self.plans, self.t_host, strict=True) if plan is not None), default=0
        )
        return min(self.slots, _aligned(longest + 1))

    @contextmanager
    def _first_rows(self, span: int) -> Iterator[None]:
        """Step only rows [0, span): every per-row buffer is seen through a view of its first rows
        (writes land in the buffers). Without CUDA graphs an idle row costs as much as a busy one,
        so a loop with free rows for jobs to join would otherwise run at the speed of a full one;
        rows are computed independently (`_row_linear`), so a row's results do not change."""
        if span >= self.batch:
            yield
            return
        saved = {name: getattr(self, name) for name in (*_ROW_BUFFERS, *_ROW_BUFFER_LISTS, "batch")}
        for name in _ROW_BUFFERS:
            setattr(self, name, saved[name][:span])
        for name in _ROW_BUFFER_LISTS:
            setattr(self, name, [buffer[:span] for buffer in saved[name]])
        self.batch = span
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    @torch.inference_mode()
    def results(self) -> list[torch.Tensor]:
        """Each loaded job's generate-phase frames [F, 9] (text, then 8 agent codes), on the CPU."""
        return [self.row_result(b) for b, plan in enumerate(self.plans) if plan is not None]

    @torch.inference_mode()
    def row_result(self, b: int) -> torch.Tensor:
        """Row `b`'s generate-phase frames [F, 9], on the CPU: a copy, which the next job loaded into
        the row (it zeroes the row's outputs) leaves alone."""
        plan = self.plans[b]
        assert plan is not None, f"row {b} has no job"
        return self.out[b, plan.prompt_frames : len(plan)].to("cpu", copy=True)

    def _capture(self) -> None:
        """Warm up on a side stream, record the two step variants, then reset the state."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        with torch.inference_mode():
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(True)
                    self._step(False)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            for depth in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step(depth)
                self.graphs[depth] = graph
            torch.cuda.synchronize(self.device)
            self.load([plan for plan in self.plans if plan is not None])

    # ---- one frame (all on the device, no host sync) ---------------------------------------------
    def _step(self, depth: bool, slots: int | None = None) -> None:
        """One frame for every row; attention over KV slots [0, slots) (default: all of them)."""
        B, T, N = self.batch, self.frames, self.replay
        t = self.t
        active = (t < self.length) & ~self.paused
        ti = t.clamp(max=T)
        text = self.s_text[self.rows, ti]
        prompt = text >= 0
        on = torch.cat(
            [
                prompt[:, None],
                prompt[:, None].expand(B, AUDIO_STREAMS),
                active[:, None].expand(B, AUDIO_STREAMS),
            ],
            dim=1,
        )
        values = torch.cat(
            [text.clamp(min=0)[:, None], self.s_agent[self.rows, ti], self.s_user[self.rows, ti]], 1
        )
        replay = active & (t < self.replay_length)

        # FrameLoop.step: force, seed; the very first frame only fills the ring (unless replaying)
        self._force(values, on & active[:, None])
        self._seed(active)
        first = active & (self.offset == 0)
        self.tokens[:, :, 0] = torch.where(first[:, None], self.initial[None], self.tokens[:, :, 0])
        self.offset += first.long()
        again = first & replay
        self._force(values, on & again[:, None])
        self._seed(again)
        run = active & (~first | replay)

        input_slot = (self.offset - 1) % self.ring_slots
        model_input = self._at_slot(self.tokens, input_slot)  # [B, K]
        x = self._embed(model_input)
        replayed = self.s_embeddings[self.rows, t.clamp(max=N)]
        x = torch.where(replay[:, None], replayed, x)
        hidden, text_logits = self._temporal(x, run, slots or self.slots)

        target = self.offset % self.ring_slots
        forced = self._at_slot(self.tokens, target)[:, :GEN]
        provided = self._at_slot(self.provided, target)[:, :GEN]
        if depth:
            text_token = self._sample(text_logits, self.temp_text, self.greedy_text, self.noise_text)
            next_text = torch.where(provided[:, 0], forced[:, 0], text_token)
            generating = active & ~prompt
            audio = self._depth_of(generating, next_text, hidden, forced, provided)
            sampled = torch.cat([text_token[:, None], audio], dim=1)
        else:
            sampled = forced  # prompt frames: every token is forced, nothing is sampled

        # FrameLoop.finish_step
        in_index = input_slot[:, None, None].expand(B, self.streams, 1)
        cleared = self.provided.gather(2, in_index)[..., 0] & ~run[:, None]
        self.provided.scatter_(2, in_index, cleared[..., None])
        stored = torch.where(provided | ~run[:, None], forced, sampled)
        gen_index = target[:, None, None].expand(B, GEN, 1)
        self.tokens[:, :GEN].scatter_(2, gen_index, stored[..., None])
        frame_slots = (self.offset[:, None] - self.max_delay + self.delays[None, :GEN]) % self.ring_slots
        frame = self.tokens[:, :GEN].gather(2, frame_slots[..., None])[..., 0]
        self.out[self.rows, ti] = frame
        self.offset += run.long()
        # replay_voice_embeddings: the voice's token ring replaces ours after its last frame
        load = active & (t == self.cache_at)
        self.tokens.copy_(torch.where(load[:, None, None], self.s_cache, self.tokens))
        self.t += active.long()

    @staticmethod
    def _at_slot(ring: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return ring.gather(2, slot[:, None, None].expand(ring.shape[0], ring.shape[1], 1))[..., 0]

    def _force(self, values: torch.Tensor, on: torch.Tensor) -> None:
        """TokenRing.force for every stream at once: values [B, K] where on [B, K]."""
        slots = (self.offset[:, None] + self.delays[None]) % self.ring_slots
        index = slots[..., None]
        current = self.tokens.gather(2, index)[..., 0]
        self.tokens.scatter_(2, index, torch.where(on, values, current)[..., None])
        flags = self.provided.gather(2, index)[..., 0] | on
        self.provided.scatter_(2, index, flags[..., None])

    def _seed(self, mask: torch.Tensor) -> None:
        """TokenRing.begin_step's seeding of initial tokens, for the rows in mask."""
        on = mask[:, None] & (self.offset[:, None] <= self.delays[None])
        index = (self.offset % self.ring_slots)[:, None, None].expand(self.batch, self.streams, 1)
        current = self.tokens.gather(2, index)[..., 0]
        self.tokens.scatter_(2, index, torch.where(on, self.initial[None], current)[..., None])
        flags = self.provided.gather(2, index)[..., 0] | on
        self.provided.scatter_(2, index, flags[..., None])

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the 16 audio embeddings then the text one (FrameLoop.embed's order): [B, D]."""
        tokens = tokens.clamp(min=0)  # rows that run no model may hold ungenerated slots
        total = F.embedding(tokens[:, 1], self.audio_tables[0])
        for i, table in enumerate(self.audio_tables[1:], start=2):
            total = total + F.embedding(tokens[:, i], table)
        return total + F.embedding(tokens[:, 0], self.text_table)

    def _temporal(self, x: torch.Tensor, run: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One temporal step per row at its own position: normed hidden [B, 1, D], text logits [B, V]."""
        model = self.temporal_model
        B, H, hd = self.batch, model.heads, model.head_dim
        position = self.position
        cos, sin = (r[:, None, None, None, :] for r in model.rotary(position, self.dtype))  # [B, 1, 1, 1, hd]
        slot = torch.where(run, position % self.window, self.window)  # rows that do not run: scratch
        self.slot_position.scatter_(1, slot[:, None], torch.where(run, position, -1)[:, None])
        held = self.slot_position[:, :slots]
        valid = (held >= 0) & (held > position[:, None] - self.sliding_window)
        # The additive mask SDPA would build from a boolean one in every layer, built once per frame.
        mask = torch.where(valid | ~run[:, None], self.mask_open, self.mask_shut)[:, None, None, :]
        write = slot[:, None, None, None].expand(B, H, 1, hd)
        h = x[:, None, :]
        for layer, k_cache, v_cache in zip(model.layers, self.k_cache, self.v_cache, strict=True):
            y = _rms(h, layer.norm1, model.eps)
            qkv = self._linear(y, layer.qkv).view(B, 3, H, 1, hd)
            qk = qkv[:, :2]  # q and k rotated together: transformers' apply_rotary_pos_emb, same ops
            qk = qk * cos + _swap_halves(qk) * sin
            q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]  # [B, H, 1, hd]
            k_cache.scatter_(2, write, k)
            v_cache.scatter_(2, write, v)
            a = F.scaled_dot_product_attention(
                q, k_cache[:, :, :slots], v_cache[:, :, :slots], attn_mask=mask
            )
            h = h + self._linear(a.transpose(1, 2).reshape(B, 1, H * hd), layer.o)
            h = h + _gated_mlp(self._linear, _rms(h, layer.norm2, model.eps), layer, model.act)
        h = _rms(h, model.out_norm, model.eps)
        self.position += run.long()
        return h, self._linear(h, model.text_head)[:, 0].float()

    def _depth_of(
        self,
        generating: torch.Tensor,
        text: torch.Tensor,
        hidden: torch.Tensor,
        forced: torch.Tensor,
        provided: torch.Tensor,
    ) -> torch.Tensor:
        """The depth steps' tokens [B, 8]. Rows in their prompt discard them (every token is forced),
        so a CPU loop runs the depth decoder on the generating rows alone: beside a generating row, a
        joining job's prompt frames then cost a temporal step, as they do alone. The rows' results
        do not change (`_row_linear`); on CUDA the graph runs every row."""
        if self._linear is not _row_linear or bool(generating.all()):
            return self._depth(text, hidden, forced, provided)
        index = generating.nonzero()[:, 0]
        tokens = forced[:, 1:].clone()
        if len(index) == 0:
            return tokens
        saved = {name: getattr(self, name) for name in (*_DEPTH_ROW_BUFFERS, "dkv_cache", "batch")}
        for name in _DEPTH_ROW_BUFFERS:
            setattr(self, name, saved[name][index])
        self.dkv_cache = [cache[: len(index)] for cache in saved["dkv_cache"]]  # scratch within a frame
        self.batch = len(index)
        try:
            tokens[index] = self._depth(text[index], hidden[index], forced[index], provided[index])
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        return tokens

    def _depth(
        self, text: torch.Tensor, hidden: torch.Tensor, forced: torch.Tensor, provided: torch.Tensor
    ) -> torch.Tensor:
        """The 8 depth steps, each fed the previous token (forced where provided): sampled [B, 8]."""
        B, H, hd = self.batch, self.depth_heads_n, self.depth_head_dim
        previous, sampled = text, []
        # Per frame, not per step: the 8 input projections of the temporal hidden state, every
        # step's race noise.
        projected = self._linear(hidden, self.depth_in_all).view(B, AUDIO_STREAMS, -1)
        noise = self.noise_audio.gather(1, self.audio_noise_index).view(B, AUDIO_STREAMS, -1)
        for step in range(AUDIO_STREAMS):
            table = self.depth_text_table if step == 0 else self.depth_tables[step - 1]
            h = F.embedding(previous.clamp(min=0), table)[:, None] + projected[:, step : step + 1]
            for layer, kv_cache in zip(self.depth_layers[step], self.dkv_cache, strict=True):
                y = _rms(h, layer.norm1, self.depth_eps)
                qkv = self._linear(y, layer.qkv).view(B, 3, H, hd)
                kv_cache[:, :, :, step] = qkv[:, 1:]
                q = qkv[:, 0, :, None]  # [B, H, 1, hd]
                a = F.scaled_dot_product_attention(
                    q, kv_cache[:, 0, :, : step + 1], kv_cache[:, 1, :, : step + 1]
                )
                h = h + self._linear(a.transpose(1, 2).reshape(B, 1, H * hd), layer.o)
                h = h + _gated_mlp(self._linear, _rms(h, layer.norm2, self.depth_eps), layer, self.depth_act)
            logits = self._linear(h, self.depth_heads[step])[:, 0].float()
            token = self._sample(logits, self.temp_audio, self.greedy_audio, noise[:, step])
            sampled.append(token)
            previous = torch.where(provided[:, 1 + step], forced[:, 1 + step], token)
        return torch.stack(sampled, dim=1)

    def _sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        greedy: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """personaplex.engine.sampling.sample per row: argmax if greedy, else the race over the row's top-k.

        noise [B, capacity]: the row's draws in its first k columns, +inf past them (race 0 there).
        """
        best = logits.argmax(dim=-1)
        if not self.sampling:
            return best
        probs = torch.softmax(logits / temperature, dim=-1)
        top_p, top_i = probs.topk(noise.shape[-1], dim=-1)
        token = top_i.gather(-1, (top_p / noise).argmax(dim=-1, keepdim=True))[:, 0]
        return torch.where(greedy, best, token)

"""The Kyutai → transformers converter: strict key coverage, q/k/v shapes, skipped user depth steps,
and the RoPE permutation proven against an independent plain-torch attention with interleaved pairs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401 (the engine extra must be installed)
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import MimiModel, MoshiForConditionalGeneration
from transformers.models.moshi.modeling_moshi import MoshiAttention

from personaplex.engine.checkpoint import LMConfig, MimiSpec, read_checkpoint
from personaplex.engine.convert import (
    AGENT_CODEBOOKS,
    convert_lm,
    convert_mimi,
    interleaved_to_half,
    mimi_config,
    moshi_config,
    rope_inverse_frequencies,
)
from personaplex.engine.frames import FrameLoop, Sampling
from personaplex.engine.loaders import load_models
from personaplex.engine.tiny import write_tiny_checkpoint
from personaplex.errors import CheckpointError

# ---- helpers ---------------------------------------------------------------------------------------


def _moshi_expected(lm: LMConfig, spec: MimiSpec) -> set[str]:
    with init_empty_weights():
        moshi = MoshiForConditionalGeneration(moshi_config(lm, spec))
    moshi.audio_encoder = None
    return set(moshi.state_dict())


def _mimi_expected(spec: MimiSpec) -> set[str]:
    with init_empty_weights():
        mimi = MimiModel(mimi_config(spec))
    return set(mimi.state_dict())


@pytest.fixture(scope="module")
def lm_source(tiny_checkpoint: Path, torch_single_thread: None):
    info = read_checkpoint(tiny_checkpoint)
    return info, load_file(str(info.lm_weights)), _moshi_expected(info.lm, info.mimi)


@pytest.fixture(scope="module")
def mimi_source(tiny_checkpoint: Path):
    info = read_checkpoint(tiny_checkpoint)
    return info, load_file(str(info.mimi_weights)), _mimi_expected(info.mimi)


# ---- key coverage ----------------------------------------------------------------------------------


def test_lm_conversion_covers_every_key(lm_source) -> None:
    info, source, expected = lm_source
    out = convert_lm(dict(source), info.lm, expected)
    assert set(out) == expected
    # Some tensors of the original are needed by name for each part of the model.
    assert torch.equal(out["decoder.model.embed_tokens.weight"], source["text_emb.weight"])
    assert torch.equal(out["decoder.lm_head.weight"], source["text_linear.weight"])
    assert torch.equal(out["decoder.model.norm.weight"], source["out_norm.alpha"].flatten())
    for i in range(info.lm.n_q):
        assert torch.equal(out[f"embed_tokens.{i}.weight"], source[f"emb.{i}.weight"])
    layer = "transformer.layers.1"
    assert torch.equal(
        out["decoder.model.layers.1.mlp.fc1.weight"], source[f"{layer}.gating.linear_in.weight"]
    )
    assert torch.equal(
        out["decoder.model.layers.1.post_attention_layernorm.weight"],
        source[f"{layer}.norm2.alpha"].flatten(),
    )


@pytest.mark.parametrize(
    "extra", ["transformer.layers.0.self_attn.extra_bias", "linears.16.weight", "something_else.weight"]
)
def test_lm_extra_key_raises(lm_source, extra: str) -> None:
    info, source, expected = lm_source
    bad = {**source, extra: torch.zeros(3)}
    with pytest.raises(CheckpointError, match=extra.replace(".", r"\.")):
        convert_lm(bad, info.lm, expected)


@pytest.mark.parametrize(
    "missing",
    [
        "transformer.layers.1.norm1.alpha",
        "transformer.layers.0.self_attn.in_proj_weight",
        "depformer.layers.1.gating.7.linear_out.weight",
        "linears.0.weight",
        "emb.15.weight",
    ],
)
def test_lm_missing_key_raises(lm_source, missing: str) -> None:
    info, source, expected = lm_source
    bad = {k: v for k, v in source.items() if k != missing}
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        convert_lm(bad, info.lm, expected)


def test_lm_target_mismatch_raises(lm_source) -> None:
    """A model with a target the checkpoint cannot fill (e.g. a config with one layer too many)."""
    info, source, expected = lm_source
    with pytest.raises(CheckpointError, match="missing"):
        convert_lm(dict(source), info.lm, expected | {"decoder.model.layers.9.mlp.fc1.weight"})


def test_mimi_conversion_covers_every_key(mimi_source) -> None:
    info, source, expected = mimi_source
    out = convert_mimi(dict(source), info.mimi, expected)
    assert set(out) == expected
    assert torch.equal(
        out["quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum"],
        source["quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"],
    )
    assert torch.equal(
        out["encoder.encoder_transformer.layers.0.self_attn_layer_scale.scale"],
        source["encoder_transformer.transformer.layers.0.layer_scale_1.scale"],
    )
    assert torch.equal(out["encoder.downsample.conv.weight"], source["downsample.conv.conv.conv.weight"])


def test_mimi_extra_or_missing_key_raises(mimi_source) -> None:
    info, source, expected = mimi_source
    with pytest.raises(CheckpointError, match="unknown_thing"):
        convert_mimi({**source, "encoder.model.0.unknown_thing": torch.zeros(1)}, info.mimi, expected)
    gone = "decoder_transformer.transformer.layers.0.norm2.bias"
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        convert_mimi({k: v for k, v in source.items() if k != gone}, info.mimi, expected)
    gone = "quantizer.rvq_rest.vq.layers.3._codebook.cluster_usage"
    with pytest.raises(CheckpointError):
        convert_mimi({k: v for k, v in source.items() if k != gone}, info.mimi, expected)


# ---- shapes and the depth decoder ------------------------------------------------------------------


def test_qkv_shapes_and_values(lm_source) -> None:
    info, source, expected = lm_source
    lm = info.lm
    out = convert_lm(dict(source), lm, expected)
    d, dd = lm.dim, lm.depformer_dim
    for layer in range(lm.num_layers):
        dst = f"decoder.model.layers.{layer}.self_attn"
        in_proj = source[f"transformer.layers.{layer}.self_attn.in_proj_weight"]
        for name in ("q", "k", "v", "o"):
            assert out[f"{dst}.{name}_proj.linear.weight"].shape == (d, d)
        q, k, v = in_proj.split(d)
        assert torch.equal(out[f"{dst}.q_proj.linear.weight"], interleaved_to_half(q, lm.num_heads))
        assert torch.equal(out[f"{dst}.k_proj.linear.weight"], interleaved_to_half(k, lm.num_heads))
        assert torch.equal(out[f"{dst}.v_proj.linear.weight"], v)  # values are never rotated
        assert not torch.equal(out[f"{dst}.q_proj.linear.weight"], q)
    for layer in range(lm.depformer_num_layers):
        dst = f"depth_decoder.layers.{layer}.self_attn"
        per_step = source[f"depformer.layers.{layer}.self_attn.in_proj_weight"].view(lm.dep_q, 3 * dd, dd)
        for index, name in enumerate("qkv"):
            weight = out[f"{dst}.{name}_proj.linear.weight"]
            assert weight.shape == (AGENT_CODEBOOKS, dd, dd)
            # No RoPE in the depth transformer: rows are taken as they are.
            assert torch.equal(weight, per_step[:AGENT_CODEBOOKS, index * dd : (index + 1) * dd])
        assert out[f"{dst}.o_proj.linear.weight"].shape == (AGENT_CODEBOOKS, dd, dd)


def test_depth_keeps_steps_0_to_7_and_skips_user_steps(lm_source) -> None:
    info, source, expected = lm_source
    lm = info.lm
    assert lm.dep_q == 16
    out = convert_lm(dict(source), lm, expected)
    stacked = lambda fmt: torch.stack([source[fmt.format(i)] for i in range(AGENT_CODEBOOKS)])  # noqa: E731
    assert torch.equal(out["depth_decoder.lm_heads.weight"], stacked("linears.{}.weight"))
    assert torch.equal(out["depth_decoder.input_projections.weight"], stacked("depformer_in.{}.weight"))
    assert torch.equal(
        out["depth_decoder.layers.0.mlp.fc1.weight"], stacked("depformer.layers.0.gating.{}.linear_in.weight")
    )
    for i in range(AGENT_CODEBOOKS - 1):
        assert torch.equal(out[f"depth_decoder.embed_tokens.{i}.weight"], source[f"depformer_emb.{i}.weight"])

    # Changing what steps 8-15 hold (user stream, always forced) changes nothing in the result...
    user_steps = {
        key: torch.randn_like(value)
        for key, value in source.items()
        if any(key.startswith(f"{p}.{i}.") for p in ("linears", "depformer_in") for i in range(8, 16))
        or any(key.startswith(f"depformer_emb.{i}.") for i in range(7, 15))
        or any(f".gating.{i}." in key for i in range(8, 16))
    }
    assert len(user_steps) == 8 + 8 + 8 + 2 * 8 * lm.depformer_num_layers
    changed = convert_lm({**source, **user_steps}, lm, expected)
    assert all(torch.equal(out[key], changed[key]) for key in out)
    # ...while step 7 does change it.
    step7 = convert_lm(
        {**source, "linears.7.weight": torch.randn_like(source["linears.7.weight"])}, lm, expected
    )
    assert not torch.equal(step7["depth_decoder.lm_heads.weight"], out["depth_decoder.lm_heads.weight"])


# ---- RoPE: an independent attention with interleaved-pair rotary -----------------------------------


def reference_attention(
    x: torch.Tensor,
    in_proj: torch.Tensor,
    out_proj: torch.Tensor,
    heads: int,
    max_period: float,
    window: int,
) -> torch.Tensor:
    """The reference's attention in plain torch (float64): one projection split (p h d), rotary on
    pairs (2i, 2i+1) with freqs exp(-2i/D ln P) and angle pos * freq, causal over the last `window`
    positions, the current one included (the reference's `context - 1`)."""
    x, in_proj, out_proj = x.double(), in_proj.double(), out_proj.double()
    batch, steps, dim = x.shape
    d = dim // heads
    q, k, v = (x @ in_proj.T).view(batch, steps, 3, heads, d).permute(2, 0, 3, 1, 4)
    freqs = torch.exp(torch.arange(d // 2, dtype=torch.float64) * (-2.0 * math.log(max_period) / d))
    angle = torch.arange(steps, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        pairs = t.reshape(batch, heads, steps, d // 2, 2)
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).reshape(t.shape)

    q, k = rotate(q), rotate(k)
    delta = torch.arange(steps)[:, None] - torch.arange(steps)[None]
    allowed = (delta >= 0) & (delta < window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(batch, steps, dim) @ out_proj.T


def _transformers_attention(in_proj: torch.Tensor, out_proj: torch.Tensor, heads: int, permute: bool):
    dim = in_proj.shape[1]
    config = moshi_config(LMConfig(dim=dim, num_heads=heads, num_layers=1), MimiSpec())
    config._attn_implementation = "eager"
    attention = MoshiAttention(config, layer_idx=0, use_flexible_linear=False, use_rope=True).eval()
    q, k, v = in_proj.split(dim)
    if permute:
        q, k = interleaved_to_half(q, heads), interleaved_to_half(k, heads)
    with torch.no_grad():
        attention.q_proj.linear.weight.copy_(q)
        attention.k_proj.linear.weight.copy_(k)
        attention.v_proj.linear.weight.copy_(v)
        attention.o_proj.linear.weight.copy_(out_proj)
    return attention


def _run_transformers(attention, x: torch.Tensor) -> torch.Tensor:
    steps = x.shape[1]
    positions = torch.arange(steps)[None]
    mask = torch.full((steps, steps), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out, _ = attention(x, attention_mask=mask, position_ids=positions)
    return out


@pytest.mark.parametrize("dim,heads", [(64, 4), (48, 2)])
def test_rope_permutation_matches_interleaved_reference(dim: int, heads: int) -> None:
    gen = torch.Generator().manual_seed(dim + heads)
    in_proj = torch.randn(3 * dim, dim, generator=gen) / math.sqrt(dim)
    out_proj = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    x = torch.randn(2, 50, dim, generator=gen)

    expected = reference_attention(x, in_proj, out_proj, heads, 10000.0, window=10**6).float()
    got = _run_transformers(_transformers_attention(in_proj, out_proj, heads, permute=True), x)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), float((got - expected).abs().max())

    # Without the permutation the positions are rotated in the wrong pairs: clearly different.
    wrong = _run_transformers(_transformers_attention(in_proj, out_proj, heads, permute=False), x)
    assert float((wrong - expected).abs().max()) > 1e-2


def test_rope_frequencies_are_the_references() -> None:
    d, period = 16, 10000.0
    ours = rope_inverse_frequencies(d, period)
    expected = torch.exp(torch.arange(d // 2, dtype=torch.float32) * (-2 * math.log(period) / d))
    assert torch.equal(ours, expected)


# ---- the whole temporal transformer, sliding window included ---------------------------------------


def reference_temporal(source: dict[str, torch.Tensor], lm: LMConfig, x: torch.Tensor) -> torch.Tensor:
    """The reference's temporal transformer on the original weights (float64): text logits [T, V]."""

    def rms(t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return t * alpha.double().flatten() * torch.rsqrt(1e-8 + (t * t).mean(dim=-1, keepdim=True))

    h = x.double()[None]
    for layer in range(lm.num_layers):
        p = f"transformer.layers.{layer}"
        attn = reference_attention(
            rms(h, source[f"{p}.norm1.alpha"]),
            source[f"{p}.self_attn.in_proj_weight"],
            source[f"{p}.self_attn.out_proj.weight"],
            lm.num_heads,
            lm.max_period,
            lm.attention_window,
        )
        h = h + attn
        g = rms(h, source[f"{p}.norm2.alpha"]) @ source[f"{p}.gating.linear_in.weight"].double().T
        g = g.view(*g.shape[:-1], 2, -1)
        h = (
            h
            + (torch.nn.functional.silu(g[..., 0, :]) * g[..., 1, :])
            @ source[f"{p}.gating.linear_out.weight"].double().T
        )
    h = rms(h, source["out_norm.alpha"])
    return (h @ source["text_linear.weight"].double().T)[0]


def test_temporal_transformer_matches_reference_across_sliding_window(
    tmp_path: Path, torch_single_thread: None
) -> None:
    """16-position context, 40 steps: the window is crossed; step-by-step with the engine's cache."""
    info = read_checkpoint(write_tiny_checkpoint(tmp_path / "ctx16", seed=3, context=16))
    assert info.lm.context == 16
    models = load_models(info, torch.device("cpu"))
    source = load_file(str(info.lm_weights))
    steps = 40
    x = torch.randn(steps, info.lm.dim, generator=torch.Generator().manual_seed(5)) * 3
    expected = reference_temporal(source, info.lm, x).float()

    loop = FrameLoop(models, info.lm.delays, Sampling(greedy=True), None)
    with torch.inference_mode():
        got = torch.cat([loop.temporal(x[t].view(1, 1, -1))[1] for t in range(steps)])
    error = (got - expected).abs().max(dim=-1).values
    assert float(error.max()) < 1e-4, error
    # A full-context reference differs after the window: the test can tell the two apart.
    unbounded = reference_temporal(source, LMConfig(**{**info.lm.__dict__, "context": 10**6}), x).float()
    assert float((unbounded[20:] - expected[20:]).abs().max()) > 1e-3

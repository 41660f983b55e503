"""Original (Kyutai/NVIDIA) checkpoint keys → transformers' Moshi and Mimi modules.

The published transformers converter does not fit PersonaPlex (16 depth steps in the file, of
which we keep 8; a hub config that is not a transformers one), so the mapping lives here. Every
source key must be consumed and every target key produced: a mis-mapped tensor fails loudly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from transformers import MimiConfig, MoshiConfig

from personaplex.engine.checkpoint import LMConfig, MimiSpec
from personaplex.errors import CheckpointError

AGENT_CODEBOOKS = 8
"""Depth steps we run: steps 8-15 of the checkpoint only predict the always-forced user stream."""

StateDict = dict[str, torch.Tensor]


def mimi_config(spec: MimiSpec) -> MimiConfig:
    seanet, quant, tr = spec.seanet, spec.quantizer, spec.transformer
    dimension = seanet["dimension"]
    return MimiConfig(
        sampling_rate=spec.sample_rate,
        frame_rate=spec.frame_rate,
        hidden_size=dimension,
        num_filters=seanet["n_filters"],
        num_residual_layers=seanet["n_residual_layers"],
        upsampling_ratios=list(seanet["ratios"]),
        kernel_size=seanet["kernel_size"],
        last_kernel_size=seanet["last_kernel_size"],
        residual_kernel_size=seanet["residual_kernel_size"],
        dilation_growth_rate=seanet["dilation_base"],
        compress=seanet["compress"],
        use_causal_conv=True,
        codebook_size=quant["bins"],
        codebook_dim=quant["dimension"],
        vector_quantization_hidden_dimension=quant["dimension"],
        num_quantizers=quant["n_q"],
        num_semantic_quantizers=1,
        upsample_groups=dimension,
        num_hidden_layers=tr["num_layers"],
        num_attention_heads=tr["num_heads"],
        num_key_value_heads=tr["num_heads"],
        intermediate_size=tr["dim_feedforward"],
        sliding_window=tr["context"],
        layer_scale_initial_scale=tr["layer_scale"],
        rope_parameters={"rope_type": "default", "rope_theta": float(tr.get("max_period", 10000))},
    )


def moshi_config(lm: LMConfig, spec: MimiSpec) -> MoshiConfig:
    """The Moshi config for our 8-step depth decoder.

    The reference's temporal transformer attends to the last `context - 1` positions, the current
    one included (2999 for the real model); transformers' `sliding_window` counts the current
    position too, so it is `context - 1`. Every loop reads the window from here.
    """
    depth = {
        "hidden_size": lm.depformer_dim,
        "num_hidden_layers": lm.depformer_num_layers,
        "num_attention_heads": lm.depformer_num_heads,
        "num_key_value_heads": lm.depformer_num_heads,
        "ffn_dim": lm.depformer_ffn_dim,
        "sliding_window": AGENT_CODEBOOKS,
        "max_position_embeddings": AGENT_CODEBOOKS,
        "rms_norm_eps": 1e-8,
    }
    return MoshiConfig(
        vocab_size=lm.text_card,
        hidden_size=lm.dim,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_heads,
        ffn_dim=lm.ffn_dim,
        sliding_window=lm.attention_window,
        max_position_embeddings=lm.context,
        rms_norm_eps=1e-8,
        num_codebooks=AGENT_CODEBOOKS,
        rope_parameters={"rope_type": "default", "rope_theta": float(lm.max_period)},
        audio_encoder_config=mimi_config(spec).to_dict(),
        depth_decoder_config=depth,
    )


def rope_inverse_frequencies(head_dim: int, max_period: float) -> torch.Tensor:
    """The reference's RoPE frequencies, exp(-2i/D log P): bit-for-bit what it rotates by.

    transformers computes 1 / P^(2i/D), which differs in the last bit; at position 3000 that
    is a visible angle error, so we overwrite its buffer with these.
    """
    steps = torch.arange(head_dim // 2, dtype=torch.float32)
    return torch.exp(steps * (-math.log(max_period) * 2 / head_dim))


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE to rotate-half RoPE, per head."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return weight.view(num_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


class _Mapper:
    """Consumes source tensors by name and records what it produced, so coverage can be checked."""

    def __init__(self, source: StateDict, what: str) -> None:
        self.source = source
        self.what = what
        self.used: set[str] = set()
        self.out: StateDict = {}

    def take(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise CheckpointError(f"{self.what}: the checkpoint lacks {key!r}.")
        self.used.add(key)
        return self.source[key]

    def put(self, key: str, value: torch.Tensor) -> None:
        self.out[key] = value.contiguous()

    def rename(self, rules: list[tuple[str, str]], allow_skip: Callable[[str], bool] | None = None) -> None:
        """Map every still unused key through the first matching regex rule."""
        for key in list(self.source):
            if key in self.used:
                continue
            for pattern, replacement in rules:
                if re.fullmatch(pattern, key):
                    self.put(re.sub(pattern, replacement, key), self.take(key))
                    break
            else:
                if allow_skip is not None and allow_skip(key):
                    self.used.add(key)

    def finish(self, expected: set[str]) -> StateDict:
        unused = sorted(set(self.source) - self.used)
        missing = sorted(expected - set(self.out))
        extra = sorted(set(self.out) - expected)
        if unused or missing or extra:
            raise CheckpointError(
                f"{self.what}: checkpoint does not match the model. Unused: {unused[:8]}; "
                f"missing: {missing[:8]}; unexpected: {extra[:8]}."
            )
        return self.out


def _split_attention(m: _Mapper, src: str, dst: str, dim: int, num_heads: int, rope: bool) -> None:
    q, k, v = m.take(f"{src}.self_attn.in_proj_weight").split(dim, dim=0)
    if rope:
        q, k = interleaved_to_half(q, num_heads), interleaved_to_half(k, num_heads)
    m.put(f"{dst}.self_attn.q_proj.linear.weight", q)
    m.put(f"{dst}.self_attn.k_proj.linear.weight", k)
    m.put(f"{dst}.self_attn.v_proj.linear.weight", v)
    m.put(f"{dst}.self_attn.o_proj.linear.weight", m.take(f"{src}.self_attn.out_proj.weight"))


def convert_lm(source: StateDict, lm: LMConfig, expected: set[str]) -> StateDict:
    """The LM part: temporal transformer, embeddings, text head and the first 8 depth steps."""
    m = _Mapper(source, "LM")
    m.put("decoder.model.embed_tokens.weight", m.take("text_emb.weight"))
    m.put("decoder.lm_head.weight", m.take("text_linear.weight"))
    m.put("decoder.model.norm.weight", m.take("out_norm.alpha").flatten())
    for i in range(lm.n_q):
        m.put(f"embed_tokens.{i}.weight", m.take(f"emb.{i}.weight"))
    for layer in range(lm.num_layers):
        src, dst = f"transformer.layers.{layer}", f"decoder.model.layers.{layer}"
        _split_attention(m, src, dst, lm.dim, lm.num_heads, rope=True)
        m.put(f"{dst}.mlp.fc1.weight", m.take(f"{src}.gating.linear_in.weight"))
        m.put(f"{dst}.mlp.fc2.weight", m.take(f"{src}.gating.linear_out.weight"))
        m.put(f"{dst}.input_layernorm.weight", m.take(f"{src}.norm1.alpha").flatten())
        m.put(f"{dst}.post_attention_layernorm.weight", m.take(f"{src}.norm2.alpha").flatten())
    _convert_depformer(m, lm)
    # Steps 8-15 of the depth transformer predict the user stream, which is always forced.
    m.rename([], allow_skip=lambda key: _is_user_depth_step(key, lm))
    return m.finish(expected)


def _convert_depformer(m: _Mapper, lm: LMConfig) -> None:
    steps, d = AGENT_CODEBOOKS, lm.depformer_dim
    m.put("depth_decoder.text_embed_tokens.weight", m.take("depformer_text_emb.weight"))
    for i in range(steps - 1):
        m.put(f"depth_decoder.embed_tokens.{i}.weight", m.take(f"depformer_emb.{i}.weight"))
    stack = lambda fmt: torch.stack([m.take(fmt.format(i)) for i in range(steps)])  # noqa: E731
    m.put("depth_decoder.input_projections.weight", stack("depformer_in.{}.weight"))
    m.put("depth_decoder.lm_heads.weight", stack("linears.{}.weight"))
    for layer in range(lm.depformer_num_layers):
        src, dst = f"depformer.layers.{layer}", f"depth_decoder.layers.{layer}"
        qkv = m.take(f"{src}.self_attn.in_proj_weight").view(lm.dep_q, 3 * d, d)[:steps]
        q, k, v = qkv.split(d, dim=1)
        m.put(f"{dst}.self_attn.q_proj.linear.weight", q)
        m.put(f"{dst}.self_attn.k_proj.linear.weight", k)
        m.put(f"{dst}.self_attn.v_proj.linear.weight", v)
        out = m.take(f"{src}.self_attn.out_proj.weight").view(lm.dep_q, d, d)[:steps]
        m.put(f"{dst}.self_attn.o_proj.linear.weight", out)
        m.put(f"{dst}.mlp.fc1.weight", stack(f"{src}.gating.{{}}.linear_in.weight"))
        m.put(f"{dst}.mlp.fc2.weight", stack(f"{src}.gating.{{}}.linear_out.weight"))
        m.put(f"{dst}.input_layernorm.weight", m.take(f"{src}.norm1.alpha").flatten())
        m.put(f"{dst}.post_attention_layernorm.weight", m.take(f"{src}.norm2.alpha").flatten())


def _is_user_depth_step(key: str, lm: LMConfig) -> bool:
    match = re.fullmatch(r"(?:depformer_in|linears|depformer_emb)\.(\d+)\.weight", key) or re.fullmatch(
        r"depformer\.layers\.\d+\.gating\.(\d+)\.linear_(?:in|out)\.weight", key
    )
    if match is None:
        return False
    step = int(match.group(1))
    # depformer_emb.i feeds step i+1, so the embedding of step 7's output (index 7) is unused too.
    first_unused = AGENT_CODEBOOKS - 1 if key.startswith("depformer_emb") else AGENT_CODEBOOKS
    return first_unused <= step < lm.dep_q


_MIMI_RULES = [
    (r"(encoder|decoder)\.model\.(\d+)\.(conv|convtr)\.\3\.(weight|bias)", r"\1.\1_seanet.layers.\2.conv.\4"),
    (
        r"(encoder|decoder)\.model\.(\d+)\.block\.(\d+)\.conv\.conv\.(weight|bias)",
        r"\1.\1_seanet.layers.\2.block.\3.conv.\4",
    ),
    (r"downsample\.conv\.conv\.conv\.weight", "encoder.downsample.conv.weight"),
    (r"upsample\.convtr\.convtr\.convtr\.weight", "decoder.upsample.conv.weight"),
    (
        r"quantizer\.rvq_first\.(input|output)_proj\.weight",
        r"quantizer.semantic_residual_vector_quantizer.\1_proj.weight",
    ),
    (
        r"quantizer\.rvq_rest\.(input|output)_proj\.weight",
        r"quantizer.acoustic_residual_vector_quantizer.\1_proj.weight",
    ),
    (
        r"quantizer\.rvq_first\.vq\.layers\.(\d+)\._codebook\.(cluster_usage)",
        r"quantizer.semantic_residual_vector_quantizer.layers.\1.codebook.\2",
    ),
    (
        r"quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\.(cluster_usage)",
        r"quantizer.acoustic_residual_vector_quantizer.layers.\1.codebook.\2",
    ),
    (
        r"quantizer\.rvq_first\.vq\.layers\.(\d+)\._codebook\.embedding_sum",
        r"quantizer.semantic_residual_vector_quantizer.layers.\1.codebook.embed_sum",
    ),
    (
        r"quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\.embedding_sum",
        r"quantizer.acoustic_residual_vector_quantizer.layers.\1.codebook.embed_sum",
    ),
    (
        r"quantizer\.rvq_first\.vq\.layers\.(\d+)\._codebook\._initialized",
        r"quantizer.semantic_residual_vector_quantizer.layers.\1.codebook.initialized",
    ),
    (
        r"quantizer\.rvq_rest\.vq\.layers\.(\d+)\._codebook\._initialized",
        r"quantizer.acoustic_residual_vector_quantizer.layers.\1.codebook.initialized",
    ),
]


def convert_mimi(source: StateDict, spec: MimiSpec, expected: set[str], prefix: str = "") -> StateDict:
    """Mimi: SEANet convs, the two transformers (RoPE permuted like the LM's), quantizers."""
    m = _Mapper(source, "Mimi")
    tr = spec.transformer
    for side in ("encoder", "decoder"):
        for layer in range(tr["num_layers"]):
            src = f"{side}_transformer.transformer.layers.{layer}"
            dst = f"{side}.{side}_transformer.layers.{layer}"
            _split_attention(m, src, dst, tr["d_model"], tr["num_heads"], rope=True)
            for name, target in (("linear1", "mlp.fc1"), ("linear2", "mlp.fc2")):
                m.put(f"{dst}.{target}.weight", m.take(f"{src}.{name}.weight"))
            for name, target in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                m.put(f"{dst}.{target}.weight", m.take(f"{src}.{name}.weight"))
                m.put(f"{dst}.{target}.bias", m.take(f"{src}.{name}.bias"))
            m.put(f"{dst}.self_attn_layer_scale.scale", m.take(f"{src}.layer_scale_1.scale"))
            m.put(f"{dst}.mlp_layer_scale.scale", m.take(f"{src}.layer_scale_2.scale"))
    m.rename(_MIMI_RULES)
    # Mimi's attention in transformers has plain Linear layers, not MoshiLinear wrappers.
    m.out = {key.replace("_proj.linear.weight", "_proj.weight"): value for key, value in m.out.items()}
    m.out = {f"{prefix}{key}": value for key, value in m.out.items()}
    return m.finish(expected)

"""Build transformers' Moshi and Mimi modules from a checkpoint directory.

Parameters are built on the meta device (small buffers stay real) and the converted weights assigned, so no random 7B
initialisation ever runs. The LM goes to bf16 on a GPU (fp32 on CPU); Mimi stays fp32.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import MimiModel, MoshiForConditionalGeneration

from personaplex.engine.checkpoint import CheckpointInfo
from personaplex.engine.convert import (
    convert_lm,
    convert_mimi,
    moshi_config,
    rope_inverse_frequencies,
)
from personaplex.errors import CheckpointError

log = logging.getLogger(__name__)

_BUILD_LOCK = threading.Lock()
"""init_empty_weights patches module construction process-wide: one build at a time."""


@dataclass
class LoadedModels:
    """The three pieces the frame loop drives, plus the SentencePiece tokenizer."""

    moshi: MoshiForConditionalGeneration  # decoder, depth_decoder, embed_tokens (audio_encoder unused)
    mimi: MimiModel
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    device: torch.device
    dtype: torch.dtype


def lm_dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_models(info: CheckpointInfo, device: torch.device, cpu_offload: bool = False) -> LoadedModels:
    import sentencepiece

    dtype = lm_dtype_for(device)
    config = moshi_config(info.lm, info.mimi)
    config._attn_implementation = "sdpa"
    weights_device = "cpu" if cpu_offload or device.type != "cuda" else str(device)
    with _BUILD_LOCK:
        moshi = _build_moshi(info, config, weights_device, dtype)
        mimi = _build_mimi(info, config.audio_encoder_config, weights_device)
    _place(moshi, device, cpu_offload)
    mimi.to(device)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(info.tokenizer))
    return LoadedModels(moshi=moshi, mimi=mimi, tokenizer=tokenizer, device=device, dtype=dtype)


def _build_moshi(info: CheckpointInfo, config, weights_device: str, dtype: torch.dtype):
    with init_empty_weights():
        moshi = MoshiForConditionalGeneration(config)
    # The Mimi copy inside MoshiForConditionalGeneration is never run: we keep one Mimi, in fp32.
    moshi.audio_encoder = None
    expected = set(moshi.state_dict())
    state = convert_lm(load_file(str(info.lm_weights), device=weights_device), info.lm, expected)
    state = {k: v.to(dtype) for k, v in state.items()}
    moshi.load_state_dict(state, strict=True, assign=True)
    _reset_rope(moshi, info.lm.max_period, weights_device)
    moshi.eval().requires_grad_(False)
    _check_materialized(moshi, "LM")
    return moshi


def _build_mimi(info: CheckpointInfo, mimi_config, weights_device: str) -> MimiModel:
    with init_empty_weights():
        mimi = MimiModel(mimi_config)
    expected = set(mimi.state_dict())
    source = load_file(str(info.mimi_weights), device=weights_device)
    state = convert_mimi(source, info.mimi, expected)
    mimi.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    _reset_rope(mimi, float(info.mimi.transformer.get("max_period", 10000)), weights_device)
    mimi.eval().requires_grad_(False)
    _check_materialized(mimi, "Mimi")
    return mimi


def _reset_rope(model: torch.nn.Module, max_period: float, device: str) -> None:
    """Recompute RoPE frequencies the reference's way (transformers' differ in the last bit)."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
            head_dim = module.inv_freq.shape[0] * 2
            inv_freq = rope_inverse_frequencies(head_dim, max_period).to(device)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq.clone()


def _check_materialized(model: torch.nn.Module, what: str) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors left unloaded after conversion: {left[:8]}")


def _place(moshi: MoshiForConditionalGeneration, device: torch.device, cpu_offload: bool) -> None:
    if not cpu_offload or device.type != "cuda":
        moshi.to(device)
        return
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(
        moshi,
        no_split_module_classes=["MoshiDecoderLayer", "MoshiDepthDecoder"],
        dtype=lm_dtype_for(device),
    )
    log.info("cpu offload: %s", sorted(set(device_map.values()), key=str))
    dispatch_model(moshi, device_map=device_map, main_device=str(device))

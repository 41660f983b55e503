"""Mimi one frame at a time, for live conversations: what one-shot encode and decode give.

Offline, `codec.encode` and `codec.decode` see the whole recording. A live session sees 1920
samples (80 ms) at a time and must answer each frame at once, so both directions stream:

- `StreamingEncoder` keeps transformers' own streaming state (the causal convolutions' padding
  cache and the encoder transformer's KV cache): frame by frame it gives the same codes.
- `StreamingDecoder` keeps the state transformers' decoder does not (it has no streaming mode, and
  decoding frame by frame without state is wrong at every frame boundary): each causal
  convolution keeps its last inputs as the next frame's left context, each transposed convolution
  keeps the overlap of its output with the next frame's (added there, as one pass sums it), and
  the decoder transformer keeps its KV cache. Only the summation order of those overlaps and of
  the matrix products differs from one pass, so samples agree to float rounding (~1e-7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConv1dPaddingCache,
    MimiConvTranspose1d,
    MimiResnetBlock,
)

from personaplex.params import FRAME_SIZE


class StreamingEncoder:
    """Samples → codes, one or more whole frames per call, with the state of the frames before."""

    def __init__(self, mimi: MimiModel, batch: int = 1) -> None:
        self.mimi = mimi
        self.batch = batch
        self.encoder_cache: DynamicCache | None = None
        self.padding_cache: MimiConv1dPaddingCache | None = None

    @torch.inference_mode()
    def encode(self, samples: torch.Tensor) -> torch.Tensor:
        """samples [B, n * 1920] (float) → codes [B, Q, n]."""
        assert samples.shape[-1] % FRAME_SIZE == 0, "whole frames only"
        audio = samples.to(self.mimi.device, torch.float32).view(self.batch, 1, -1)
        out = self.mimi.encode(
            audio,
            encoder_cache=self.encoder_cache,
            padding_cache=self.padding_cache,
            use_streaming=True,
        )
        self.encoder_cache, self.padding_cache = out.encoder_cache, out.padding_cache
        return out.audio_codes


class StreamingDecoder:
    """Codes → samples, one or more frames per call, with the state of the frames before."""

    def __init__(self, mimi: MimiModel, batch: int = 1) -> None:
        decoder = mimi.decoder
        self.mimi = mimi
        self.batch = batch
        self.cache = DynamicCache(config=decoder.decoder_transformer.config)
        self._carry: dict[int, torch.Tensor] = {}
        """Per convolution (by id): a causal conv's last inputs, or a transposed conv's overlap."""
        for module in decoder.modules():
            if isinstance(module, MimiConvTranspose1d) and module.padding_left:
                raise ValueError("streaming decode needs causal transposed convolutions (trim_right_ratio 1)")
            if isinstance(module, MimiConv1d) and (not module.causal or module.conv.stride[0] != 1):
                raise ValueError("streaming decode needs causal convolutions of stride 1")

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, n] → float32 samples [B, n * 1920]."""
        decoder = self.mimi.decoder
        latents = self.mimi.quantizer.decode(codes.to(self.mimi.device))  # [B, C, n]
        h = latents if decoder.upsample is None else self._transposed(decoder.upsample, latents)
        h = decoder.decoder_transformer(h.transpose(1, 2), cache=self.cache, use_cache=True).last_hidden_state
        h = h.transpose(1, 2)
        for layer in decoder.decoder_seanet.layers:
            h = self._layer(layer, h)
        return h[:, 0].float()

    def _layer(self, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, MimiConv1d):
            return self._causal(layer, h)
        if isinstance(layer, MimiConvTranspose1d):
            return self._transposed(layer, h)
        if isinstance(layer, MimiResnetBlock):
            residual = h
            for inner in layer.block:
                h = self._layer(inner, h)
            shortcut = layer.shortcut
            return (self._causal(shortcut, residual) if isinstance(shortcut, MimiConv1d) else residual) + h
        return layer(h)  # activations

    def _causal(self, layer: MimiConv1d, h: torch.Tensor) -> torch.Tensor:
        """A causal convolution over this call's inputs, with the last inputs before them as its left
        padding (zeros, or the first sample repeated, before the first call: the one-pass padding)."""
        pad = int(layer.padding_total)
        if pad == 0:
            return layer.conv(h)
        before = self._carry.get(id(layer))
        if before is None:
            if layer.pad_mode == "replicate":
                before = h[..., :1].expand(-1, -1, pad)
            else:
                before = h.new_zeros(h.shape[0], h.shape[1], pad)
        x = torch.cat([before, h], dim=-1)
        self._carry[id(layer)] = x[..., -pad:]
        return layer.conv(x)

    def _transposed(self, layer: MimiConvTranspose1d, h: torch.Tensor) -> torch.Tensor:
        """A causal transposed convolution: the outputs this call's inputs complete, the overlap with
        the next call's kept (its bias is added once, when the samples are given out)."""
        conv = layer.conv
        stride = conv.stride[0]
        y = F.conv_transpose1d(h, conv.weight, None, stride, groups=conv.groups)  # [B, C, (n - 1) s + k]
        overlap = self._carry.get(id(layer))
        if overlap is not None:
            y = torch.cat([y[..., : overlap.shape[-1]] + overlap, y[..., overlap.shape[-1] :]], dim=-1)
        done = h.shape[-1] * stride
        self._carry[id(layer)] = y[..., done:]
        out = y[..., :done]
        return out if conv.bias is None else out + conv.bias[:, None]

"""The inference engine: every torch and transformers import in the project lives in this package.

    checkpoint  the hub layout, download, voices.tgz (no torch: the web tier may read its constants)
    convert     Kyutai key names and configs to transformers' Moshi modules
    loaders     build the LM and Mimi on a device, dtype and offload policy
    codec       Mimi encode/decode of whole clips
    sampling    top-k sampling and the RNG streams
    frames      FrameLoop: the eager frame-by-frame driver (the reference's order of operations)
    fast        FastLoop: static ring KV caches, per-row positions, CUDA graphs; the batched rows
    voices      which file a voice name means, loudness normalisation, its prompt tensors
    batching    BatchRequest, which jobs share a batch, and the driver that steps their rows
    core        Engine: the façade the worker holds (load, process, process_batch, offload, status)
    tiny        tiny random checkpoints in the real layout, for tests and the demo

`Engine` and `BatchRequest` are imported on first use, so `import personaplex.engine.checkpoint`
does not pull torch into a process that only needs the hub's file names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchRequest", "Engine"]

_HOMES = {"BatchRequest": "personaplex.engine.batching", "Engine": "personaplex.engine.core"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

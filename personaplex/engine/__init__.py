"""The inference engine: every torch and transformers import in the project lives in this package.

    checkpoint  the hub layout, download, voices.tgz (no torch: the web tier may read its constants)
    convert     Kyutai key names and configs to transformers' Moshi modules
    loaders     build the LM and Mimi on a device, dtype and offload policy
    codec       Mimi encode/decode of whole clips
    sampling    top-k sampling and the RNG streams
    frames      FrameLoop: the eager frame-by-frame driver (the reference's order of operations)
    fast        FastLoop: static ring KV caches, per-row positions, CUDA graphs; the batched rows
    core        Engine: the façade the worker holds (load, process, process_batch, offload, status)
    tiny        tiny random checkpoints in the real layout, for tests and the demo

`Engine` and `BatchRequest` are imported on first use, so `import personaplex.engine.checkpoint`
does not pull torch into a process that only needs the hub's file names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchRequest", "Engine"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from personaplex.engine import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Ops per frame of the fast loop's step, counted on the CPU: a proxy for CUDA kernels per graph replay.

    python bench/op_counts.py            # real layer counts (32 temporal, 6 depth), tiny widths, bf16

Counts every aten op that computes (views, empty allocations and metadata ops are left out) in one
generate frame (`_step(True)`) and one prompt frame (`_step(False)`), by part: the temporal
transformer, the depth transformer, sampling, and the rest of the step. Widths do not change the
counts, so a tiny-width model with the real layer counts stands in for the 7B one. On CUDA a few
ops differ (SDPA picks another backend, casts fuse differently), so treat the figures as relative.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "detach",
    "alias",
}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.part = "step"
        self.counts: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if func.is_view or name in ("to", "reshape", "contiguous", "flatten", "type_as"):
            # aliasing ops compute only when they copy (a cast, a reshape of a strided tensor)
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if not isinstance(out, torch.Tensor) or first is None or _same_storage(out, first):
                return out
        elif name in FREE or name.startswith("_unsafe_view"):
            return out
        self.counts[self.part] += 1
        self.ops[name] += 1
        return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def build_loop(dtype: torch.dtype, batch: int):
    import bench.engine as bench_engine
    from personaplex.engine.checkpoint import LMConfig
    from personaplex.engine.fast import FastLoop
    from personaplex.params import GenerationParams

    lm = LMConfig(
        dim=64,
        num_heads=4,
        num_layers=32,
        depformer_dim=32,
        depformer_num_heads=4,
        depformer_dim_feedforward=96,
        depformer_num_layers=6,
    )
    tmp = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, True)
    engine = bench_engine.build_random_engine(torch.device("cpu"), tmp, lm, dtype)
    bench = bench_engine.CapturedBench(engine, torch.device("cpu"), graphs=False)
    samples = bench_engine._input(1.0)
    plans, _ = bench.plans([samples] * batch, [GenerationParams(seed=1 + b) for b in range(batch)])
    return FastLoop(engine._models, plans, engine._info.lm.delays, sampling=True)


def count(loop, depth: bool) -> tuple[Counter, Counter]:
    counter = OpCounter()
    wrapped = {}

    def tag(name: str, part: str) -> None:
        original = getattr(loop, name)
        wrapped[name] = original

        def run(*args, **kwargs):
            before, counter.part = counter.part, part
            try:
                return original(*args, **kwargs)
            finally:
                counter.part = before

        setattr(loop, name, run)

    tag("_temporal", "temporal")
    tag("_depth", "depth")
    tag("_sample", "sampling")
    try:
        with torch.inference_mode(), counter:
            loop._step(depth)
    finally:
        for name in wrapped:
            delattr(loop, name)
    return counter.counts, counter.ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="also list the ops by name")
    args = parser.parse_args(argv)
    loop = build_loop(getattr(torch, args.dtype), args.batch)
    with torch.inference_mode():  # past the first frame, into a normal generate frame
        for _ in range(3):
            loop._step(True)
    for depth in (True, False):
        counts, ops = count(loop, depth)
        label = "generate frame" if depth else "prompt frame"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{label}: {sum(counts.values())} ops ({parts})")
        if args.ops:
            print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())

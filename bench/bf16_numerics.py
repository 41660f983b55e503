"""How far bf16 alone moves the logits: the yardstick for the fast loop's GPU check.

    python bench/bf16_numerics.py [--layers 32] [--dim 512] [--seconds 2]

`bench/engine.py --check` reads the first generated frame's logits of the fast loop and of FrameLoop
(transformers' modules) on the GPU in bf16. Their difference is rounding only if it is no larger
than what bf16 itself does to the same logits. This builds random weights at the real depth (32
temporal layers, 6 depth layers; `--dim` narrower than the real 4096 so a CPU runs it), runs the
eager FrameLoop once in fp32 and once with the same weights rounded to bf16, and reports the
difference of the first generated frame's logits (every token before it is forced, so both runs
see the same inputs), then the fast loop against FrameLoop, both in bf16 on this device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from engine import CapturedBench, _input, build_random_engine, logit_difference, recorded_logits

from personaplex.audio import encode_wav
from personaplex.engine import frames
from personaplex.engine.checkpoint import LMConfig
from personaplex.engine.fast import FastLoop
from personaplex.params import GenerationParams


def first_frame_logits(
    dtype: torch.dtype, lm: LMConfig, samples: np.ndarray, fast: bool
) -> list[torch.Tensor]:
    """Text logits, then the first depth step's, of the first generated frame (greedy)."""
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # the random voice prompt comes from the global generator
        engine = build_random_engine(device, Path(tmp), lm, dtype)
        engine.load()
        greedy = GenerationParams(greedy=True)
        if fast:
            with recorded_logits(FastLoop, "_sample", 1) as seen:
                CapturedBench(engine, device, graphs=False).tokens([(samples, greedy)])
        else:
            engine.captured = False
            with recorded_logits(frames, "sample", 0) as seen:
                engine.process(encode_wav(samples), greedy)
        return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32, help="temporal layers (the real model has 32)")
    parser.add_argument("--dim", type=int, default=512, help="temporal width (the real model has 4096)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    lm = LMConfig(dim=args.dim, num_heads=args.dim // 64, num_layers=args.layers)
    samples = _input(args.seconds)
    fp32 = first_frame_logits(torch.float32, lm, samples, fast=False)
    bf16 = first_frame_logits(torch.bfloat16, lm, samples, fast=False)
    bf16_fast = first_frame_logits(torch.bfloat16, lm, samples, fast=True)
    report = {
        "lm": {"dim": lm.dim, "num_heads": lm.num_heads, "num_layers": lm.num_layers},
        "torch": torch.__version__,
        "eager_bf16_vs_fp32": {"text": logit_difference(bf16[0], fp32[0])},
        "fast_vs_eager_bf16": {"text": logit_difference(bf16_fast[0], bf16[0])},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

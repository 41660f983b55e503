"""Engine benchmark: ms per frame per phase and real-time factor.

    python bench/engine.py --size tiny                 # CPU, the tiny random checkpoint
    python bench/engine.py --size real --device cuda   # random weights at the real 7B size

`tiny` runs the whole path (checkpoint files, conversion, Engine.process). `real` builds the
modules at PersonaPlex's sizes with random weights on the device (no download, no files) and runs
the same Engine code over them. Each configuration runs --repeat times after one warm-up run;
the table gives medians. RTF = processing time / audio duration (lower is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from personaplex.checkpoint import CheckpointInfo, LMConfig, MimiSpec
from personaplex.engine import Engine
from personaplex.params import FRAME_RATE, SAMPLE_RATE, GenerationParams

PHASES = ("encode", "prompt", "generate", "decode")


SMALL_LM = LMConfig(
    dim=512,
    num_heads=8,
    num_layers=4,
    depformer_dim=256,
    depformer_num_heads=4,
    depformer_dim_feedforward=1056,
    depformer_num_layers=2,
)
"""The real structure at a size a CPU can run: a smoke test of the `real` path."""


def build_random_engine(device: torch.device, workdir: Path, lm: LMConfig | None = None) -> Engine:
    """Real-size modules, random weights, a random catalog voice and the tiny tokenizer."""
    from accelerate import init_empty_weights
    from transformers import MimiModel, MoshiForConditionalGeneration

    from personaplex.convert import moshi_config
    from personaplex.loaders import LoadedModels, _reset_rope, lm_dtype_for
    from personaplex.tiny import write_tiny_checkpoint

    lm, mimi_spec = lm or LMConfig(), MimiSpec()
    config = moshi_config(lm, mimi_spec)
    config._attn_implementation = "sdpa"
    dtype = lm_dtype_for(device)
    with init_empty_weights():
        moshi = MoshiForConditionalGeneration(config)
    moshi.audio_encoder = None
    moshi.to_empty(device=device)
    _randomize(moshi, dtype)
    _reset_rope(moshi, lm.max_period, str(device))
    with device:  # built for real: its convolutions keep their geometry in small buffers
        mimi = MimiModel(config.audio_encoder_config)
    _randomize(mimi, torch.float32)
    _reset_rope(mimi, 10000.0, str(device))
    tiny = write_tiny_checkpoint(workdir / "tiny")
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tiny / "tokenizer_spm_32k_3.model"))
    models = LoadedModels(moshi.eval(), mimi.eval(), tokenizer, device, dtype)
    voices = workdir / "voices"
    voices.mkdir()
    torch.save(
        {
            "embeddings": torch.randn(50, 1, 1, lm.dim),
            "cache": torch.randint(0, 2048, (1, 17, 4)),
        },
        voices / "NATF2.pt",
    )
    return Engine.from_loaded(models, CheckpointInfo(root=workdir, lm=lm, mimi=mimi_spec), voices)


@torch.no_grad()
def _randomize(module: torch.nn.Module, dtype: torch.dtype) -> None:
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(0)
    for name, param in module.named_parameters():
        if name.endswith(("layernorm.weight", "norm.weight")):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    for name, buf in module.named_buffers():
        if name.endswith("cluster_usage"):
            buf.fill_(1.0)
        elif name.endswith("embed_sum"):
            buf.normal_(0.0, 1.0, generator=generator)
        elif name.endswith("initialized"):
            buf.fill_(1.0)
    module.to(dtype if dtype != torch.float32 else torch.float32)


def build_tiny_engine(device: torch.device, workdir: Path) -> Engine:
    from personaplex.tiny import write_tiny_checkpoint

    return Engine(write_tiny_checkpoint(workdir / "tiny"), device=device)


def run_once(engine: Engine, seconds: float, device: torch.device) -> dict[str, float]:
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    from personaplex.audio import encode_wav

    wav = encode_wav(samples)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = engine.process(wav, GenerationParams(seed=1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = result.timings
    return {
        "frames": result.frames,
        "encode": t.encode_s,
        "prompt": t.prompt_s,
        "generate": t.generate_s,
        "decode": t.decode_s,
        "total": t.total_s - t.load_s,
        "rtf": t.rtf,
    }


def summarize(runs: list[dict[str, float]], prompt_frames: int) -> dict[str, float]:
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    frames = med["frames"]
    return {
        "frames": frames,
        "ms_per_frame_generate": 1000 * med["generate"] / frames,
        "ms_per_frame_prompt": 1000 * med["prompt"] / prompt_frames,
        "ms_per_frame_encode": 1000 * med["encode"] / frames,
        "ms_per_frame_decode": 1000 * med["decode"] / frames,
        "rtf_generate": med["generate"] / (frames / FRAME_RATE),
        "rtf_total": med["rtf"],
        "total_s": med["total"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "small", "real"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="input audio length")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if args.size == "tiny":
            engine = build_tiny_engine(device, Path(tmp))
        else:
            engine = build_random_engine(device, Path(tmp), SMALL_LM if args.size == "small" else None)
        engine.load()
        build_s = time.perf_counter() - started
        prompt_frames = _prompt_frames(engine)
        run_once(engine, min(args.seconds, 2.0), device)  # warm-up
        runs = [run_once(engine, args.seconds, device) for _ in range(args.repeat)]
    summary = summarize(runs, prompt_frames)
    report = {
        "size": args.size,
        "device": _device_name(device),
        "torch": torch.__version__,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "batch": 1,
        "build_s": build_s,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        **summary,
    }
    print(json.dumps(report, indent=2))
    print(_table(report), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _prompt_frames(engine: Engine) -> int:
    """Frames in the default prompt phases (voice + silences + wrapped assistant prompt)."""
    from personaplex.engine import SILENCE_FRAMES

    models = engine._models
    voice = engine._voice_prompt(models, "NATF2.pt")
    voice_frames = voice.embeddings.shape[0] if voice.embeddings is not None else voice.codes.shape[-1]
    text = engine._text_prompt_tokens(models, GenerationParams().text_prompt)
    return voice_frames + 2 * SILENCE_FRAMES + len(text)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _table(r: dict) -> str:
    return (
        f"{r['size']} on {r['device']}, batch 1, {r['seconds']:.0f} s input, median of {r['repeat']}:\n"
        f"  generate {r['ms_per_frame_generate']:.2f} ms/frame (RTF {r['rtf_generate']:.3f})\n"
        f"  prompt   {r['ms_per_frame_prompt']:.2f} ms/frame\n"
        f"  encode   {r['ms_per_frame_encode']:.2f} ms/frame, decode {r['ms_per_frame_decode']:.2f} ms/frame\n"
        f"  total RTF {r['rtf_total']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())

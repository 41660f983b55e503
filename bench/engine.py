"""Engine benchmark: ms per frame per phase and real-time factor, eager or captured, batch 1 or B.

    python bench/engine.py --size tiny                 # CPU, the tiny random checkpoint
    python bench/engine.py --size real --device cuda   # random weights at the real 7B size
    python bench/engine.py --size real --path captured --batch 8 --check   # the fast loop, 8 jobs

`--path eager` runs Engine.process with the reference loop (FrameLoop, batch 1). `--path captured`
runs the fast loop (personaplex.engine.fast; CUDA graphs on a GPU, eagerly on a CPU) over `--batch` copies
of the job (seeds 1..B) in one batch: the per-frame figures are per batched step, the RTF per
stream, the throughput B × audio seconds / wall seconds. `--baseline eager.json` adds the
speed-up over an eager run. `--check` compares tokens (greedy): captured vs eager on the same
input, the first generated frame's logits of the two loops (their numerical difference), and
batched rows (of different lengths and prompts) vs the same jobs alone.

`tiny` runs the whole path (checkpoint files, conversion, Engine.process). `real` builds the
modules at PersonaPlex's sizes with random weights on the device (no download, no files) and runs
the same Engine code over them. Each configuration runs --repeat times after one warm-up run;
the table gives medians. RTF = processing time / audio duration (lower is faster).

`--prompt` chooses how each job's prompt phase (voice, silences, text prompt) runs: `stepped`, one
frame per step in the loop; `prefill`, one pass per job (personaplex.engine.prompt; every job
computes its own, as with a new persona each); `cached`, from the prompt cache (one persona, all
hits). `prompt_ms_per_job` is the prompt time of a batch over its jobs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from personaplex.audio import encode_wav
from personaplex.engine.checkpoint import CheckpointInfo, LMConfig, MimiSpec
from personaplex.engine.core import Engine
from personaplex.params import FRAME_RATE, SAMPLE_RATE, GenerationParams, Timings

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


def build_random_engine(
    device: torch.device, workdir: Path, lm: LMConfig | None = None, dtype: torch.dtype | None = None
) -> Engine:
    """Real-size modules, random weights, a random catalog voice and the tiny tokenizer.

    `dtype`: the LM's (default: what the service uses on `device`, bf16 on CUDA, fp32 on a CPU)."""
    from accelerate import init_empty_weights
    from transformers import MimiModel, MoshiForConditionalGeneration

    from personaplex.engine.convert import moshi_config
    from personaplex.engine.loaders import LoadedModels, _reset_rope, lm_dtype_for
    from personaplex.engine.tiny import write_tiny_checkpoint

    lm, mimi_spec = lm or LMConfig(), MimiSpec()
    config = moshi_config(lm, mimi_spec)
    config._attn_implementation = "sdpa"
    dtype = dtype or lm_dtype_for(device)
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
    from personaplex.engine.tiny import write_tiny_checkpoint

    return Engine(write_tiny_checkpoint(workdir / "tiny"), device=device)


PROMPT_MODES = ("stepped", "prefill", "cached")


def run_once(
    engine: Engine, seconds: float, device: torch.device, prompt: str = "prefill"
) -> dict[str, float]:
    wav = encode_wav(_input(seconds))
    engine.prefill = prompt != "stepped"
    if prompt == "prefill":
        engine.prompt_cache.clear()
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


def _input(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


class CapturedBench:
    """The fast loop over B copies of a job: one loop (and its graphs) reused across runs."""

    def __init__(
        self, engine: Engine, device: torch.device, graphs: bool = True, prompt: str = "stepped"
    ) -> None:
        self.engine, self.device, self.graphs, self.prompt = engine, device, graphs, prompt
        self.models = engine._models
        self.voice = engine._voice_prompt(self.models, "NATF2.pt")
        self.loops: dict[tuple, object] = {}
        self.capture_s: float | None = None
        self.prefill_s = 0.0  # the last plans' prompt preparation (prefill or cache), seconds

    def plans(
        self, samples: list[np.ndarray], params: list[GenerationParams], codes=None
    ) -> tuple[list, float]:
        from personaplex.engine import codec

        clock = time.perf_counter()
        codes = codes or [codec.encode(self.models.mimi, s) for s in samples]
        self._sync()
        encode_s = time.perf_counter() - clock
        clock = time.perf_counter()
        prompts = [self._prompt(p) for p in params]
        self._sync()
        self.prefill_s = time.perf_counter() - clock
        plans = [
            self.engine._plan(self.models, c, v, p) for c, v, p in zip(codes, prompts, params, strict=True)
        ]
        return plans, encode_s

    def _prompt(self, params: GenerationParams):
        """The job's prompt as `self.prompt` says: the voice to step it with, or its prefilled state."""
        if self.prompt == "stepped":
            return self.voice
        if self.prompt == "prefill":
            self.engine.prompt_cache.clear()
        return self.engine._prompt_for(self.models, params, Timings())

    def loop(self, plans: list):
        from personaplex.engine.fast import FastLoop

        key = (len(plans), max(len(p) for p in plans), any(not p.sampling.greedy for p in plans))
        if key not in self.loops:
            self._sync()
            clock = time.perf_counter()
            self.loops[key] = FastLoop(
                self.models,
                plans,
                self.engine._info.lm.delays,
                capture=self.graphs and self.device.type == "cuda",
                sampling=True,
            )
            self._sync()
            self.capture_s = time.perf_counter() - clock
        loop = self.loops[key]
        loop.load(plans)
        return loop

    def run(self, plans: list) -> tuple[list[torch.Tensor], dict[str, float]]:
        loop = self.loop(plans)
        self._sync()
        clock = time.perf_counter()
        prompt = max(p.prompt_frames - p.first_frame for p in plans)  # frames to step (0: prefilled)
        loop.run(prompt)
        self._sync()
        prompt_s = time.perf_counter() - clock + self.prefill_s
        clock = time.perf_counter()
        loop.run(max(len(p) - p.first_frame for p in plans) - prompt)
        results = loop.results()
        generate_s = time.perf_counter() - clock
        prompt_frames = max(p.prompt_frames for p in plans)
        return results, {"prompt": prompt_s, "generate": generate_s, "prompt_frames": prompt_frames}

    def timed(self, seconds: float, batch: int) -> dict[str, float]:
        from personaplex.engine import codec

        samples = _input(seconds)
        params = [GenerationParams(seed=1 + b) for b in range(batch)]
        plans, encode_s = self.plans([samples] * batch, params)
        results, t = self.run(plans)
        clock = time.perf_counter()
        for frames in results:
            codec.decode(self.models.mimi, frames[:, 1:].T[None].to(self.device))
        self._sync()
        decode_s = time.perf_counter() - clock
        frames = results[0].shape[0]
        return {
            "frames": frames,
            "prompt_frames": t["prompt_frames"],
            "encode": encode_s,
            "prompt": t["prompt"],
            "generate": t["generate"],
            "decode": decode_s,
            "total": encode_s + t["prompt"] + t["generate"] + decode_s,
            "rtf": (encode_s + t["prompt"] + t["generate"] + decode_s) / (frames / FRAME_RATE),
        }

    def tokens(self, jobs: list[tuple[np.ndarray, GenerationParams]]) -> list[list[list[int]]]:
        plans, _ = self.plans([s for s, _ in jobs], [p for _, p in jobs])
        results, _ = self.run(plans)
        return [r.tolist() for r in results]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float | int | None]:
    """Share of equal tokens, and the first frame that differs (None: identical)."""
    pairs = list(zip(a, b, strict=False))
    equal = sum(x == y for fa, fb in pairs for x, y in zip(fa, fb, strict=True))
    total = sum(len(f) for f in a)
    first = next((i for i, (fa, fb) in enumerate(pairs) if fa != fb), None)
    return {
        "frames": len(a),
        "same_length": len(a) == len(b),
        "token_agreement": equal / total if total else 1.0,
        "first_diff_frame": first,
    }


@contextmanager
def recorded_logits(owner: object, name: str, position: int, calls: int = 2) -> Iterator[list[torch.Tensor]]:
    """Record the logits (positional argument `position`) of the first `calls` calls of owner.name."""
    original = getattr(owner, name)
    seen: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        if len(seen) < calls:
            seen.append(args[position].detach().float().cpu())
        return original(*args, **kwargs)

    setattr(owner, name, recording)
    try:
        yield seen
    finally:
        setattr(owner, name, original)


def logit_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | bool]:
    """How far logits `a` are from `b` (per row, worst row): relative L2 error, max |a - b|, argmax."""
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-30)).max().item()
    top5 = [
        len(set(x.tolist()) & set(y.tolist())) / 5
        for x, y in zip(a.topk(5).indices, b.topk(5).indices, strict=True)
    ]
    return {
        "relative_l2": rel,
        "max_abs": (a - b).abs().max().item(),
        "scale_max_abs": b.abs().max().item(),
        "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all()),
        "top5_overlap": min(top5),
    }


def logit_check(engine: Engine, samples: np.ndarray) -> dict:
    """Logits of the first generated frame, fast loop vs FrameLoop (greedy, one job).

    Every token before that frame is forced, so both paths compute it from the same inputs: the
    difference is numerics alone, which token agreement on random weights cannot show (their
    near-flat logits flip an argmax at the first rounding difference). The fast loop runs without
    graphs here so its logits can be read; a graph replays the same kernels. Recorded: the text
    logits, then the first depth step's (its input is the text token, so it compares only if both
    paths chose the same one).
    """
    from personaplex.engine import frames
    from personaplex.engine.fast import FastLoop

    greedy = GenerationParams(greedy=True)
    captured = engine.captured
    engine.captured = False
    with recorded_logits(frames, "sample", 0) as eager:
        engine.process(encode_wav(samples), greedy)
    engine.captured = captured
    with recorded_logits(FastLoop, "_sample", 1) as fast:
        CapturedBench(engine, engine.device, graphs=False).tokens([(samples, greedy)])
    report = {"text": logit_difference(fast[0], eager[0])}
    if report["text"]["argmax_equal"]:
        report["audio_codebook0"] = logit_difference(fast[1], eager[1])
    return report


def run_check(engine: Engine, bench: CapturedBench, seconds: float, batch: int) -> dict:
    """Greedy tokens: captured vs eager (batch 1), and batched rows vs alone; sampled: row 0 vs alone."""
    samples = _input(seconds)
    greedy = GenerationParams(greedy=True)
    report: dict = {}
    alone = bench.tokens([(samples, greedy)])[0]
    engine.captured = False
    eager = engine.process(encode_wav(samples), greedy).tokens
    engine.captured = True
    report["greedy_captured_vs_eager"] = agreement(alone, eager)
    report["logits_fast_vs_eager_first_frame"] = logit_check(engine, samples)
    report["greedy_captured_repeat_identical"] = bench.tokens([(samples, greedy)])[0] == alone
    if batch > 1:
        # Rows of different lengths and prompts; the first four are compared with their jobs alone.
        prompts = [GenerationParams().text_prompt, "", "You are a helpful assistant.", "Hi."]
        jobs = [
            (
                samples[: int(len(samples) * (1 - 0.15 * (b % 4)))],
                GenerationParams(text_prompt=prompts[b % 4], greedy=True),
            )
            for b in range(batch)
        ]
        batched = bench.tokens(jobs)
        report["greedy_batch_vs_alone"] = [
            agreement(batched[b], bench.tokens([jobs[b]])[0]) for b in range(min(4, batch))
        ]
        sampled = bench.tokens([(samples, GenerationParams(seed=1 + b)) for b in range(batch)])
        report["sampled_row0_batch_vs_alone"] = agreement(
            sampled[0], bench.tokens([(samples, GenerationParams(seed=1))])[0]
        )
    return report


def summarize(runs: list[dict[str, float]], prompt_frames: int, batch: int = 1) -> dict[str, float]:
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    frames = med["frames"]
    audio_s = frames / FRAME_RATE
    return {
        "throughput_generate": batch * audio_s / med["generate"],
        "throughput_lm": batch * audio_s / (med["prompt"] + med["generate"]),
        "throughput_total": batch * audio_s / med["total"],
        "frames": frames,
        "ms_per_frame_generate": 1000 * med["generate"] / frames,
        "ms_per_frame_prompt": 1000 * med["prompt"] / prompt_frames,
        "prompt_ms_per_job": 1000 * med["prompt"] / batch,
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
    parser.add_argument("--path", choices=("eager", "captured"), default="eager")
    parser.add_argument("--batch", type=int, default=1, help="jobs per batch (captured path)")
    parser.add_argument("--check", action="store_true", help="token agreement: eager/captured, batch/alone")
    parser.add_argument("--no-graph", action="store_true", help="captured path without CUDA graphs")
    parser.add_argument("--prompt", choices=PROMPT_MODES, default="prefill", help="how prompt phases run")
    parser.add_argument("--baseline", help="an eager run's JSON: report the speed-up over it")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.path == "eager" and args.batch != 1:
        parser.error("the eager path runs batch 1 only")
    device = torch.device(args.device)
    report: dict = {
        "size": args.size,
        "path": args.path,
        "device": _device_name(device),
        "torch": torch.__version__,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "batch": args.batch,
        "prompt": args.prompt,
    }
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if args.size == "tiny":
            engine = build_tiny_engine(device, Path(tmp))
        else:
            engine = build_random_engine(device, Path(tmp), SMALL_LM if args.size == "small" else None)
        engine.captured = args.path == "captured"
        engine.load()
        report["build_s"] = time.perf_counter() - started
        if args.path == "eager":
            prompt_frames = _prompt_frames(engine)
            run_once(engine, min(args.seconds, 2.0), device, args.prompt)  # warm-up
            runs = [run_once(engine, args.seconds, device, args.prompt) for _ in range(args.repeat)]
        else:
            bench = CapturedBench(engine, device, graphs=not args.no_graph, prompt=args.prompt)
            report["graphs"] = not args.no_graph and device.type == "cuda"
            bench.timed(args.seconds, args.batch)  # warm-up, and the capture
            report["capture_s"] = bench.capture_s
            runs = [bench.timed(args.seconds, args.batch) for _ in range(args.repeat)]
            prompt_frames = runs[0].pop("prompt_frames")
            for run in runs[1:]:
                run.pop("prompt_frames")
        report.update(summarize(runs, prompt_frames, args.batch))
        report["peak_memory_mb"] = (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        )
        if args.baseline and Path(args.baseline).is_file():
            base = json.loads(Path(args.baseline).read_text())
            report["baseline"] = {
                k: base.get(k) for k in ("path", "batch", "device", "ms_per_frame_generate")
            }
            report["speedup_ms_per_frame_generate"] = (
                base["ms_per_frame_generate"] / report["ms_per_frame_generate"]
            )
            report["speedup_ms_per_frame_prompt"] = (
                base["ms_per_frame_prompt"] / report["ms_per_frame_prompt"]
            )
            report["speedup_throughput_generate"] = (
                report["throughput_generate"] / base["throughput_generate"]
            )
        if args.json:  # what is known so far, in case the check fails
            Path(args.json).write_text(json.dumps(report, indent=2))
        print(_table(report), file=sys.stderr)
        if args.check:
            if args.path != "captured":
                parser.error("--check needs --path captured")
            report["check"] = run_check(engine, bench, args.seconds, args.batch)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _prompt_frames(engine: Engine) -> int:
    """Frames in the default prompt phases (voice + silences + wrapped assistant prompt)."""
    from personaplex.engine.core import SILENCE_FRAMES

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
    speedup = r.get("speedup_ms_per_frame_generate")
    return (
        f"{r['size']} {r['path']} on {r['device']}, batch {r['batch']}, {r['seconds']:.0f} s input, "
        f"median of {r['repeat']}:\n"
        f"  generate {r['ms_per_frame_generate']:.2f} ms/frame (RTF per stream {r['rtf_generate']:.3f}"
        + (f", {speedup:.2f}x eager" if speedup else "")
        + ")\n"
        f"  throughput {r['throughput_generate']:.1f}x real time (generate), "
        f"{r['throughput_lm']:.1f}x (prompt + generate), {r['throughput_total']:.1f}x (with codec)\n"
        f"  prompt   {r['prompt_ms_per_job']:.2f} ms per job ({r['prompt']}), {r['ms_per_frame_prompt']:.2f} ms/frame\n"
        f"  encode   {r['ms_per_frame_encode']:.2f} ms/frame, decode {r['ms_per_frame_decode']:.2f} ms/frame\n"
        f"  total RTF {r['rtf_total']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())

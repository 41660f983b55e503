"""Command line drop-in for the reference's `python -m moshi.offline`.

    python -m personaplex.offline --input-wav in.wav --output-wav out.wav \\
        --output-text out.json --voice-prompt NATF2.pt --seed 42424242

The output text file is the reference's: a JSON list with one string per frame.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from personaplex.errors import PersonaPlexError
from personaplex.params import GenerationParams
from personaplex.settings import Settings

SAMPLING = GenerationParams()
"""Where the sampling options' defaults come from (the reference CLI's, like every job's)."""


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """The options; DEVICE, CPU_OFFLOAD and PERSONAPLEX_MODEL give their defaults, parsed by Settings."""
    settings = settings or Settings()
    parser = argparse.ArgumentParser(
        prog="python -m personaplex.offline",
        description="Offline PersonaPlex: a user recording in, the agent's reply audio and text out.",
    )
    parser.add_argument("--input-wav", required=True, help="user audio (WAV, FLAC, OGG; any rate)")
    parser.add_argument("--output-wav", required=True, help="agent audio to write (24 kHz mono)")
    parser.add_argument("--output-text", required=True, help="JSON list of per-frame text to write")
    parser.add_argument("--voice-prompt", required=True, help="catalog voice (NATF2.pt) or a .pt/.wav file")
    parser.add_argument("--voice-prompt-dir", help="folder holding voice prompt files (default: voices.tgz)")
    parser.add_argument("--text-prompt", default=SAMPLING.text_prompt, help="persona prompt ('' for none)")
    parser.add_argument("--seed", type=int, default=-1, help="seed; -1 draws a random one")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--temp-audio", type=float, default=SAMPLING.temp_audio)
    parser.add_argument("--temp-text", type=float, default=SAMPLING.temp_text)
    parser.add_argument("--topk-audio", type=int, default=SAMPLING.topk_audio)
    parser.add_argument("--topk-text", type=int, default=SAMPLING.topk_text)
    parser.add_argument("--device", default=settings.device, help="cuda, cuda:1, cpu (auto)")
    parser.add_argument(
        "--cpu-offload",
        action="store_true",
        default=settings.cpu_offload,
        help="put what does not fit on the GPU on the CPU (accelerate); also CPU_OFFLOAD=true",
    )
    parser.add_argument(
        "--model",
        "--hf-repo",
        dest="model",
        default=settings.model,
        help="hub repo id or local checkpoint directory (PERSONAPLEX_MODEL)",
    )
    parser.add_argument("--max-audio-seconds", type=float, default=None, help="refuse longer input")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # e.g. CPU_OFFLOAD=maybe: the same start-up error as the service's
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        run(args)
    except (PersonaPlexError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from personaplex.audio import write_bytes_atomic, write_wav_atomic
    from personaplex.engine.core import Engine

    params = GenerationParams.from_dict(vars(args))
    engine = Engine(
        args.model,
        device=args.device,
        cpu_offload=args.cpu_offload,
        max_audio_seconds=args.max_audio_seconds,
        voice_prompt_dir=args.voice_prompt_dir,
    )
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=total, desc=phase, unit="frame", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    result = engine.process(Path(args.input_wav), params, progress=progress)
    write_wav_atomic(args.output_wav, result.audio, result.sample_rate)
    write_bytes_atomic(args.output_text, json.dumps(result.text_frames, ensure_ascii=False).encode())
    t = result.timings
    print(
        f"wrote {args.output_wav} ({result.input_duration_s:.2f} s) and {args.output_text}; "
        f"load {t.load_s:.2f} s, prompt {t.prompt_s:.2f} s, generate {t.generate_s:.2f} s, "
        f"decode {t.decode_s:.2f} s, real-time factor {t.rtf:.2f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())

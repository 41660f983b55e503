"""Write a tiny random PersonaPlex checkpoint in the real hub layout and original (Kyutai) key names.

The directory matches ``nvidia/personaplex-7b-v1`` file for file (docs/architecture.md §5 "The checkpoint
directory"): ``model.safetensors`` (the LM, ``n_q`` = ``dep_q`` = 16 like the real one),
``tokenizer-e351c8d8-checkpoint125.safetensors`` (Mimi), ``tokenizer_spm_32k_3.model`` (a real
SentencePiece model), ``voices.tgz`` (``voices/<id>``, e.g. ``voices/NATF2.pt``, for every catalog
voice), ``config.json`` and ``mimi_config.json``. Every parameter is random, norms included, so a
mis-mapped tensor cannot hide.
The defaults are the golden checkpoint's sizes; keyword overrides change the LM's.

Output is a pure function of the seed and the overrides: the same arguments give byte-identical files.

Tokenizer special ids: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 and ``<pad>`` = 3. The pad piece is
SentencePiece's own pad (``pad_id=3``, a control piece), so ``pad_id()`` is 3 like the real model's
``existing_text_padding_id`` and ``encode`` never emits it. ``<system>`` is ordinary text, split into
pieces. The tokenizer depends only on ``text_card`` (its vocabulary size), not on the seed.

Usage: ``python -m personaplex.tiny OUTDIR [--seed N] [--dim D] [--num-layers L] [--context C] ...``
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import math
import tarfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from personaplex.catalog import PROMPTS, VOICES
from personaplex.engine.checkpoint import (
    CONFIG_FILE,
    MIMI_CONFIG_FILE,
    MIMI_FILE,
    TOKENIZER_FILE,
    VOICES_FILE,
)
from personaplex.engine.checkpoint import LM_FILE as MODEL_FILE
from personaplex.engine.frames import SINE_TOKENS  # a voice cache's user rows: the sine prompt's codes
from personaplex.params import FRAME_RATE, SAMPLE_RATE

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

Tensors = dict[str, torch.Tensor]

DEFAULT_LM_CONFIG: dict[str, object] = {
    "dim": 64,
    "text_card": 96,
    "existing_text_padding_id": PAD_ID,
    "n_q": 16,
    "dep_q": 16,
    "card": 2048,
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_dim_feedforward": 132,
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_causal": True,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
}

DEFAULT_MIMI_CONFIG: dict[str, object] = {
    "sample_rate": SAMPLE_RATE,
    "channels": 1,
    "frame_rate": FRAME_RATE,
    "seanet": {
        "channels": 1,
        "dimension": 32,
        "causal": True,
        "n_filters": 4,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {"dimension": 16, "n_q": 8, "bins": 2048, "input_dimension": 32, "output_dimension": 32},
    "transformer": {
        "d_model": 32,
        "num_heads": 2,
        "num_layers": 1,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 64,
        "input_dimension": 32,
        "output_dimensions": [32],
    },
}

#: LM keys that may be overridden (keyword arguments, or ``--key-name`` on the command line).
OVERRIDABLE: dict[str, type] = {
    "dim": int,
    "text_card": int,
    "n_q": int,
    "dep_q": int,
    "card": int,
    "num_heads": int,
    "num_layers": int,
    "hidden_scale": float,
    "context": int,
    "depformer_dim": int,
    "depformer_dim_feedforward": int,
    "depformer_num_heads": int,
    "depformer_num_layers": int,
    "depformer_context": int,
}

_CORPUS = (
    "Hello, how are you today? I am fine, thank you. What can I do for you?",
    "Good morning. Please tell me about your weekend plans and your favourite foods.",
    "The weather is nice and warm, so we could walk to the park after lunch.",
    "Could you repeat that, please? I did not hear the last part of the question.",
    "Our customer service team will call you back within one business day.",
    "The replacement part is out of stock, but an alternative part will arrive soon.",
    "Thank you for waiting. Your order number is seven three one two.",
    "We need to check the reactor, the engines and the oxygen supply before landing.",
    "Stay calm and breathe slowly. Tell me exactly what you see on the screen.",
    "Let us read a book together, then write a short story about the ocean.",
    "My friend likes music, movies, cooking, running and playing chess on Sunday.",
    "Yes, of course. No, not yet. Maybe later this evening, if that works for you.",
    "The teacher asked the students to explain the answer in simple words.",
    "Dinner is ready: rice, beans, fresh bread, green salad and apple pie.",
    "Sorry, the line is very noisy. Can you hear me now? Great, let us continue.",
    "Every question is a good question when you want to learn something new.",
)


def lm_config(**overrides: int | float) -> dict[str, object]:
    """The LM's config.json content: the golden defaults with ``overrides`` applied, delays derived."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown LM override(s): {', '.join(unknown)}")
    cfg = {**DEFAULT_LM_CONFIG, **overrides}
    _check_sizes(cfg)
    half = int(cfg["n_q"]) // 2
    cfg["delays"] = [0] + ([0] + [1] * (half - 1)) * 2
    cfg["model_type"] = "moshi"
    cfg["mimi_config_name"] = MIMI_CONFIG_FILE
    return cfg


def _check_sizes(cfg: dict[str, object]) -> None:
    for dim_key, heads_key in (("dim", "num_heads"), ("depformer_dim", "depformer_num_heads")):
        dim, heads = int(cfg[dim_key]), int(cfg[heads_key])
        if heads < 1 or dim % heads or (dim // heads) % 2:
            raise ValueError(f"{dim_key}={dim} must split into {heads_key}={heads} heads of even size")
    n_q, dep_q = int(cfg["n_q"]), int(cfg["dep_q"])
    if n_q < 2 or n_q % 2 or not 1 <= dep_q <= n_q:
        raise ValueError(f"need an even n_q >= 2 and 1 <= dep_q <= n_q, got n_q={n_q}, dep_q={dep_q}")
    if int(cfg["card"]) < 1:
        raise ValueError(f"card must be at least 1, got {cfg['card']}")


class _Init:
    """Seeded random tensors; each call draws from one ``torch.Generator`` in a fixed order."""

    def __init__(self, seed: int, stream: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.gen = torch.Generator().manual_seed(seed * 16 + stream)

    def normal(self, shape: Sequence[int], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.gen) * std + mean

    def uniform(self, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.gen) * (high - low) + low

    def weight(self, *shape: int) -> torch.Tensor:
        """Linear/conv weight; variance of PyTorch's default init (fan-in from dims 1 onwards)."""
        return self.normal(shape, _std(math.prod(shape[1:])))

    def bias(self, size: int, fan_in: int) -> torch.Tensor:
        return self.normal((size,), _std(fan_in))

    def embedding(self, rows: int, dim: int) -> torch.Tensor:
        return self.normal((rows, dim), 1.0)

    def alpha(self, dim: int) -> torch.Tensor:
        return self.normal((1, 1, dim), 0.2, 1.0)


def _std(fan_in: int) -> float:
    return 1.0 / math.sqrt(3.0 * fan_in)


# ----------------------------------------------------------------------------------------------- LM


def lm_state_dict(cfg: dict[str, object], init: _Init) -> Tensors:
    """The LM's tensors under Kyutai's key names, shapes derived from ``cfg``."""
    dim, card, text_card = int(cfg["dim"]), int(cfg["card"]), int(cfg["text_card"])
    sd: Tensors = {"text_emb.weight": init.embedding(text_card + 1, dim)}
    for i in range(int(cfg["n_q"])):
        sd[f"emb.{i}.weight"] = init.embedding(card + 1, dim)
    hidden = 2 * int(float(cfg["hidden_scale"]) * dim) // 3
    for n in range(int(cfg["num_layers"])):
        sd.update(_lm_layer(f"transformer.layers.{n}", dim, hidden, init))
    sd["out_norm.alpha"] = init.alpha(dim)
    sd["text_linear.weight"] = init.weight(text_card, dim)
    sd.update(_depformer(cfg, init))
    return sd


def _lm_layer(prefix: str, dim: int, hidden: int, init: _Init) -> Tensors:
    return {
        f"{prefix}.self_attn.in_proj_weight": init.weight(3 * dim, dim),
        f"{prefix}.self_attn.out_proj.weight": init.weight(dim, dim),
        f"{prefix}.gating.linear_in.weight": init.weight(2 * hidden, dim),
        f"{prefix}.gating.linear_out.weight": init.weight(dim, hidden),
        f"{prefix}.norm1.alpha": init.alpha(dim),
        f"{prefix}.norm2.alpha": init.alpha(dim),
    }


def _depformer(cfg: dict[str, object], init: _Init) -> Tensors:
    dim, ddim, dep_q = int(cfg["dim"]), int(cfg["depformer_dim"]), int(cfg["dep_q"])
    card, text_card = int(cfg["card"]), int(cfg["text_card"])
    sd: Tensors = {}
    for i in range(dep_q):
        sd[f"depformer_in.{i}.weight"] = init.weight(ddim, dim)
    for i in range(dep_q - 1):
        sd[f"depformer_emb.{i}.weight"] = init.embedding(card + 1, ddim)
    sd["depformer_text_emb.weight"] = init.embedding(text_card + 1, ddim)
    hidden = 2 * int(cfg["depformer_dim_feedforward"]) // 3
    for n in range(int(cfg["depformer_num_layers"])):
        sd.update(_depformer_layer(f"depformer.layers.{n}", ddim, hidden, dep_q, init))
    for i in range(dep_q):
        sd[f"linears.{i}.weight"] = init.weight(card, ddim)
    return sd


def _depformer_layer(prefix: str, ddim: int, hidden: int, steps: int, init: _Init) -> Tensors:
    sd = {
        f"{prefix}.self_attn.in_proj_weight": init.weight(steps * 3 * ddim, ddim),
        f"{prefix}.self_attn.out_proj.weight": init.weight(steps * ddim, ddim),
    }
    for k in range(steps):
        sd[f"{prefix}.gating.{k}.linear_in.weight"] = init.weight(2 * hidden, ddim)
        sd[f"{prefix}.gating.{k}.linear_out.weight"] = init.weight(ddim, hidden)
    sd[f"{prefix}.norm1.alpha"] = init.alpha(ddim)
    sd[f"{prefix}.norm2.alpha"] = init.alpha(ddim)
    return sd


# --------------------------------------------------------------------------------------------- Mimi


def mimi_state_dict(mcfg: dict, init: _Init) -> Tensors:
    """Mimi's tensors under Kyutai's key names (SEANet, transformers, resampling, split RVQ)."""
    seanet, quant, tcfg = mcfg["seanet"], mcfg["quantizer"], mcfg["transformer"]
    dimension = int(seanet["dimension"])
    stride = _downsample_stride(mcfg)
    sd: Tensors = {}
    sd.update(_seanet_encoder(seanet, init))
    sd.update(_transformer("encoder_transformer.transformer", tcfg, init))
    sd["downsample.conv.conv.conv.weight"] = init.weight(dimension, dimension, 2 * stride)
    sd.update(_rvq("quantizer.rvq_first", quant, 1, init))
    sd.update(_rvq("quantizer.rvq_rest", quant, int(quant["n_q"]) - 1, init))
    sd["upsample.convtr.convtr.convtr.weight"] = init.weight(dimension, 1, 2 * stride)
    sd.update(_transformer("decoder_transformer.transformer", tcfg, init))
    sd.update(_seanet_decoder(seanet, init))
    return sd


def _downsample_stride(mcfg: dict) -> int:
    hop = math.prod(int(r) for r in mcfg["seanet"]["ratios"])
    encoder_rate = float(mcfg["sample_rate"]) / hop
    stride = round(encoder_rate / float(mcfg["frame_rate"]))
    if stride < 1 or not math.isclose(stride * float(mcfg["frame_rate"]), encoder_rate):
        raise ValueError(f"frame_rate {mcfg['frame_rate']} does not divide the encoder rate {encoder_rate}")
    return stride


def _conv(key: str, out_ch: int, in_ch: int, kernel: int, init: _Init) -> Tensors:
    weight = init.weight(out_ch, in_ch, kernel)
    return {f"{key}.conv.conv.weight": weight, f"{key}.conv.conv.bias": init.bias(out_ch, in_ch * kernel)}


def _convtr(key: str, in_ch: int, out_ch: int, kernel: int, init: _Init) -> Tensors:
    weight = init.weight(in_ch, out_ch, kernel)
    return {
        f"{key}.convtr.convtr.weight": weight,
        f"{key}.convtr.convtr.bias": init.bias(out_ch, out_ch * kernel),
    }


def _resblock(key: str, dim: int, seanet: dict, init: _Init) -> Tensors:
    hidden = dim // int(seanet["compress"])
    sd = _conv(f"{key}.block.1", hidden, dim, int(seanet["residual_kernel_size"]), init)
    sd.update(_conv(f"{key}.block.3", dim, hidden, 1, init))
    return sd


def _seanet_encoder(seanet: dict, init: _Init) -> Tensors:
    """Layer list: conv, then per ratio (reversed) residual blocks, ELU, strided conv; ELU, conv."""
    nf, n_res = int(seanet["n_filters"]), int(seanet["n_residual_layers"])
    sd = _conv("encoder.model.0", nf, int(seanet["channels"]), int(seanet["kernel_size"]), init)
    idx, mult = 1, 1
    for ratio in reversed([int(r) for r in seanet["ratios"]]):
        for _ in range(n_res):
            sd.update(_resblock(f"encoder.model.{idx}", mult * nf, seanet, init))
            idx += 1
        idx += 1  # ELU
        sd.update(_conv(f"encoder.model.{idx}", 2 * mult * nf, mult * nf, 2 * ratio, init))
        idx, mult = idx + 1, mult * 2
    idx += 1  # ELU
    sd.update(
        _conv(
            f"encoder.model.{idx}", int(seanet["dimension"]), mult * nf, int(seanet["last_kernel_size"]), init
        )
    )
    return sd


def _seanet_decoder(seanet: dict, init: _Init) -> Tensors:
    """Layer list: conv, then per ratio ELU, transposed conv, residual blocks; ELU, conv."""
    nf, n_res, ratios = int(seanet["n_filters"]), int(seanet["n_residual_layers"]), seanet["ratios"]
    mult = 2 ** len(ratios)
    sd = _conv("decoder.model.0", mult * nf, int(seanet["dimension"]), int(seanet["kernel_size"]), init)
    idx = 1
    for ratio in (int(r) for r in ratios):
        idx += 1  # ELU
        sd.update(_convtr(f"decoder.model.{idx}", mult * nf, mult * nf // 2, 2 * ratio, init))
        idx += 1
        for _ in range(n_res):
            sd.update(_resblock(f"decoder.model.{idx}", mult * nf // 2, seanet, init))
            idx += 1
        mult //= 2
    idx += 1  # ELU
    sd.update(
        _conv(f"decoder.model.{idx}", int(seanet["channels"]), nf, int(seanet["last_kernel_size"]), init)
    )
    return sd


def _transformer(prefix: str, tcfg: dict, init: _Init) -> Tensors:
    d, ff = int(tcfg["d_model"]), int(tcfg["dim_feedforward"])
    sd: Tensors = {}
    for n in range(int(tcfg["num_layers"])):
        key = f"{prefix}.layers.{n}"
        if tcfg.get("layer_scale") is not None:
            sd[f"{key}.layer_scale_1.scale"] = init.normal((d,), 0.02, float(tcfg["layer_scale"]))
            sd[f"{key}.layer_scale_2.scale"] = init.normal((d,), 0.02, float(tcfg["layer_scale"]))
        sd[f"{key}.linear1.weight"] = init.weight(ff, d)
        sd[f"{key}.linear2.weight"] = init.weight(d, ff)
        for norm in ("norm1", "norm2"):
            sd[f"{key}.{norm}.bias"] = init.normal((d,), 0.02)
            sd[f"{key}.{norm}.weight"] = init.normal((d,), 0.2, 1.0)
        sd[f"{key}.self_attn.in_proj_weight"] = init.weight(3 * d, d)
        sd[f"{key}.self_attn.out_proj.weight"] = init.weight(d, d)
    return sd


def _rvq(prefix: str, quant: dict, n_layers: int, init: _Init) -> Tensors:
    dim, bins = int(quant["dimension"]), int(quant["bins"])
    in_dim, out_dim = int(quant["input_dimension"]), int(quant["output_dimension"])
    sd: Tensors = {}
    if in_dim != dim:
        sd[f"{prefix}.input_proj.weight"] = init.weight(dim, in_dim, 1)
    if out_dim != dim:
        sd[f"{prefix}.output_proj.weight"] = init.weight(out_dim, dim, 1)
    for n in range(n_layers):
        key = f"{prefix}.vq.layers.{n}._codebook"
        sd[f"{key}._initialized"] = torch.ones(1)
        sd[f"{key}.cluster_usage"] = init.uniform((bins,), 0.5, 1.5)
        sd[f"{key}.embedding_sum"] = init.normal((bins, dim), 1.0)
    return sd


# ---------------------------------------------------------------------------------------- Tokenizer


def training_text(vocab_size: int | None = None) -> list[str]:
    """The built-in English sentences the tokenizer is trained on, catalog prompts included.

    A BPE model needs a piece for every character seen plus the four specials. When ``vocab_size`` is
    too small for the full text's character set, the text is lowercased and cut to ``a-z``, ``<``,
    ``>`` and spaces (at most 33 pieces needed).
    """
    prompts = [prompt.text for prompt in PROMPTS]
    wrapped = [f"<system> {text} <system>" for text in prompts]
    lines = [*prompts, *wrapped, *_CORPUS, "<system> hello <system>"]
    if vocab_size is None or vocab_size >= _required_pieces(lines):
        return lines
    return [_simplify(line) for line in lines]


def _required_pieces(lines: Sequence[str]) -> int:
    chars = set("".join(lines)) - {" "}
    return len(chars) + 1 + 4  # every character, the word-boundary piece "▁", the specials


def _simplify(line: str) -> str:
    kept = "".join(ch if ch.isascii() and (ch.isalpha() or ch in "<>") else " " for ch in line.lower())
    return " ".join(kept.split())


def train_tokenizer(vocab_size: int) -> bytes:
    """A serialized BPE SentencePiece model with ``vocab_size`` pieces; deterministic (one thread).

    Trained in memory (no temporary files, so no paths end up in the model). Raises ValueError when
    the built-in text cannot support ``vocab_size`` pieces (below about 32 or above about 1200).
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_text(vocab_size)),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            pad_piece="<pad>",
            character_coverage=1.0,
            normalization_rule_name="identity",
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on the built-in text: {exc}") from exc
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- Voices


def voice_prompt(cfg: dict[str, object], init: _Init) -> dict[str, torch.Tensor]:
    """One voice file's content: ``embeddings`` [N, 1, 1, dim] and ``cache`` [1, n_q + 1, 4]."""
    dim, n_q, card = int(cfg["dim"]), int(cfg["n_q"]), int(cfg["card"])
    frames = int(torch.randint(4, 11, (1,), generator=init.gen))
    # The reference's prompt embeddings are sums of n_q + 1 unit-variance embeddings.
    embeddings = init.normal((frames, 1, 1, dim), math.sqrt(n_q + 1))
    agent = torch.randint(0, card, (n_q // 2,), generator=init.gen)
    user = torch.tensor([SINE_TOKENS[i % len(SINE_TOKENS)] % card for i in range(n_q - n_q // 2)])
    column = torch.cat([torch.tensor([PAD_ID]), agent, user]).to(torch.long)
    cache = column.view(1, n_q + 1, 1).repeat(1, 1, 4).contiguous()
    return {"embeddings": embeddings, "cache": cache}


def voices_archive(cfg: dict[str, object], init: _Init) -> bytes:
    """``voices.tgz`` bytes: ``voices/<ID>.pt`` regular files, fixed metadata (no timestamps)."""
    raw = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for voice in VOICES:
            _add_file(tar, f"voices/{voice.filename}", _torch_bytes(voice_prompt(cfg, init)))
    return raw.getvalue()


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


# -------------------------------------------------------------------------------------------- Write


def write_tiny_checkpoint(outdir: str | Path, seed: int = 0, **overrides: int | float) -> Path:
    """Write the tiny random checkpoint into ``outdir`` (created if needed) and return its path.

    ``overrides`` replace LM sizes (see ``OVERRIDABLE``); ``text_card`` also sets the tokenizer's size.
    """
    cfg = lm_config(**overrides)
    mimi_cfg = copy.deepcopy(DEFAULT_MIMI_CONFIG)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lm_state_dict(cfg, _Init(seed, 0)), str(out / MODEL_FILE))
    save_file(mimi_state_dict(mimi_cfg, _Init(seed, 1)), str(out / MIMI_FILE))
    (out / TOKENIZER_FILE).write_bytes(train_tokenizer(int(cfg["text_card"])))
    (out / VOICES_FILE).write_bytes(voices_archive(cfg, _Init(seed, 2)))
    _write_json(out / CONFIG_FILE, cfg)
    _write_json(out / MIMI_CONFIG_FILE, mimi_cfg)
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m personaplex.engine.tiny", description="Write a tiny random PersonaPlex checkpoint."
    )
    parser.add_argument("outdir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    for key, kind in OVERRIDABLE.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(
            flag, dest=key, type=kind, default=None, help=f"LM {key} (default {DEFAULT_LM_CONFIG[key]})"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m personaplex.tiny OUTDIR [--seed N] [--dim D] ...``."""
    args = _parser().parse_args(argv)
    overrides = {key: getattr(args, key) for key in OVERRIDABLE if getattr(args, key) is not None}
    try:
        path = write_tiny_checkpoint(args.outdir, seed=args.seed, **overrides)
    except ValueError as exc:
        _parser().error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

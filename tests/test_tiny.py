"""Tests for personaplex.engine.tiny: the tiny random checkpoint in the real hub layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path, PurePosixPath

import pytest
import sentencepiece as spm
import torch
from fixtures import GOLDEN_DIR
from safetensors import safe_open

from personaplex.catalog import VOICES
from personaplex.engine import tiny

GOLDEN = GOLDEN_DIR / "checkpoint"
SAFETENSORS_FILES = (tiny.MODEL_FILE, tiny.MIMI_FILE)
ALL_FILES = {
    *SAFETENSORS_FILES,
    tiny.TOKENIZER_FILE,
    tiny.VOICES_FILE,
    tiny.CONFIG_FILE,
    tiny.MIMI_CONFIG_FILE,
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _voice_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tar:
        return tar.getmembers()


def test_writes_all_files(ckpt: Path) -> None:
    assert {p.name for p in ckpt.iterdir()} == ALL_FILES


@pytest.mark.parametrize("name", SAFETENSORS_FILES)
def test_keys_and_shapes_match_golden(ckpt: Path, name: str) -> None:
    ours, golden = _shapes(ckpt / name), _shapes(GOLDEN / name)
    assert set(ours) == set(golden)
    assert {k: v for k, v in ours.items() if golden[k] != v} == {}


@pytest.mark.parametrize("name", [tiny.CONFIG_FILE, tiny.MIMI_CONFIG_FILE])
def test_configs_match_golden(ckpt: Path, name: str) -> None:
    assert json.loads((ckpt / name).read_text()) == json.loads((GOLDEN / name).read_text())


def test_same_seed_gives_identical_bytes(ckpt: Path, tmp_path: Path) -> None:
    again = tiny.write_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in sorted(ALL_FILES):
        assert (again / name).read_bytes() == (ckpt / name).read_bytes(), name


def test_different_seed_gives_different_tensors(ckpt: Path, tmp_path: Path) -> None:
    other = tiny.write_tiny_checkpoint(tmp_path / "other", seed=1)
    for name in SAFETENSORS_FILES:
        a, b = _tensors(ckpt / name), _tensors(other / name)
        assert a.keys() == b.keys()
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not [k for k in a if k not in differing and not k.endswith("_initialized")], name
    assert (other / tiny.VOICES_FILE).read_bytes() != (ckpt / tiny.VOICES_FILE).read_bytes()


def test_parameters_are_random_and_sane(ckpt: Path) -> None:
    lm = _tensors(ckpt / tiny.MODEL_FILE)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lm.values())
    alpha = lm["out_norm.alpha"]
    assert not torch.equal(alpha, torch.ones_like(alpha))
    assert 0.5 < float(alpha.mean()) < 1.5
    mimi = _tensors(ckpt / tiny.MIMI_FILE)
    usages = [t for k, t in mimi.items() if k.endswith("cluster_usage")]
    assert len(usages) == 8 and all(bool((t > 0).all()) for t in usages)
    assert all(float(t) == 1.0 for k, t in mimi.items() if k.endswith("_initialized"))


def test_voices_archive_holds_exactly_the_catalog(ckpt: Path) -> None:
    members = _voice_members(ckpt / tiny.VOICES_FILE)
    assert sorted(m.name for m in members) == sorted(f"voices/{v.filename}" for v in VOICES)
    for member in members:
        path = PurePosixPath(member.name)
        assert member.isreg() and not path.is_absolute() and ".." not in path.parts


def test_voice_prompt_contents(ckpt: Path) -> None:
    with tarfile.open(ckpt / tiny.VOICES_FILE, "r:gz") as tar:
        data = tar.extractfile("voices/NATF2.pt").read()
    prompt = torch.load(io.BytesIO(data), weights_only=True)
    emb, cache = prompt["embeddings"], prompt["cache"]
    assert emb.dtype == torch.float32 and emb.shape[1:] == (1, 1, 64) and 4 <= emb.shape[0] <= 10
    assert cache.dtype == torch.long and cache.shape == (1, 17, 4)
    column = cache[0, :, 0]
    assert bool((cache == column.view(1, 17, 1)).all())
    assert int(column[0]) == tiny.PAD_ID
    assert bool(((column[1:9] >= 0) & (column[1:9] < 2048)).all())
    assert column[9:].tolist() == list(tiny.SINE_TOKENS)


def test_tokenizer_special_ids_and_encoding(ckpt: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / tiny.TOKENIZER_FILE))
    assert sp.get_piece_size() == 96
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(3) == "<pad>" and sp.is_control(3)
    ids = sp.encode("<system> hello <system>")
    assert ids and all(0 < i < 96 and i != 3 for i in ids)
    assert tiny.UNK_ID not in ids
    assert sp.decode(ids) == "<system> hello <system>"


def test_overrides_change_lm_sizes(tmp_path: Path) -> None:
    out = tiny.write_tiny_checkpoint(
        tmp_path / "big", seed=3, dim=48, num_layers=3, context=16, text_card=128
    )
    cfg = json.loads((out / tiny.CONFIG_FILE).read_text())
    assert (cfg["dim"], cfg["num_layers"], cfg["context"], cfg["text_card"]) == (48, 3, 16, 128)
    shapes = _shapes(out / tiny.MODEL_FILE)
    hidden = 2 * int(4.125 * 48) // 3
    assert shapes["text_emb.weight"] == (129, 48)
    assert shapes["text_linear.weight"] == (128, 48)
    assert shapes["transformer.layers.2.gating.linear_in.weight"] == (2 * hidden, 48)
    assert shapes["transformer.layers.2.gating.linear_out.weight"] == (48, hidden)
    assert shapes["depformer_in.15.weight"] == (32, 48)
    assert "transformer.layers.3.norm1.alpha" not in shapes
    sp = spm.SentencePieceProcessor(model_file=str(out / tiny.TOKENIZER_FILE))
    assert sp.get_piece_size() == 128 and sp.pad_id() == 3


def test_small_text_card_still_trains() -> None:
    sp = spm.SentencePieceProcessor(model_proto=tiny.train_tokenizer(40))
    assert sp.get_piece_size() == 40 and sp.pad_id() == 3
    assert sp.encode("<system> hello <system>")


def test_rejects_bad_overrides(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        tiny.write_tiny_checkpoint(tmp_path / "x", bogus=1)
    with pytest.raises(ValueError, match="heads"):
        tiny.write_tiny_checkpoint(tmp_path / "y", dim=66)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert tiny.main([str(out), "--seed", "2", "--num-layers", "1", "--context", "16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = json.loads((out / tiny.CONFIG_FILE).read_text())
    assert (cfg["num_layers"], cfg["context"]) == (1, 16)
    assert "transformer.layers.1.norm1.alpha" not in _shapes(out / tiny.MODEL_FILE)

"""Checkpoint directories: reading the config, clear errors for missing models, safe voices.tgz extraction."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from personaplex.engine.checkpoint import (
    CHECKPOINT_FILES,
    CONFIG_FILE,
    DELAYS,
    LM_FILE,
    VOICES_FILE,
    extract_voices,
    read_checkpoint,
    resolve_model,
)
from personaplex.errors import CheckpointError, ModelNotAvailableError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fake_checkpoint(root: Path, config: dict | None = None, skip: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if name != skip:
            (root / name).write_bytes(b"x")
    if skip != CONFIG_FILE:
        (root / CONFIG_FILE).write_text(json.dumps(config or {}))
    return root


# ---- reading ---------------------------------------------------------------------------------------


def test_read_tiny_checkpoint(tiny_checkpoint: Path) -> None:
    info = read_checkpoint(tiny_checkpoint)
    assert info.root == tiny_checkpoint
    assert (info.lm.dim, info.lm.text_card, info.lm.num_heads, info.lm.num_layers) == (64, 96, 4, 2)
    assert (info.lm.n_q, info.lm.dep_q, info.lm.context) == (16, 16, 3000)
    assert (info.lm.depformer_dim, info.lm.depformer_num_layers) == (32, 2)
    assert info.lm.delays == DELAYS and info.lm.max_delay == 1
    assert info.lm.ffn_dim == 2 * (2 * int(4.125 * 64) // 3) == 352
    assert info.lm.depformer_ffn_dim == 2 * (2 * 132 // 3) == 176
    # The Mimi config comes from the file config.json names.
    assert info.mimi.transformer["d_model"] == 32 and info.mimi.seanet["n_filters"] == 4
    assert info.mimi.quantizer == {**info.mimi.quantizer, "n_q": 8, "bins": 2048, "dimension": 16}
    for path in (info.lm_weights, info.mimi_weights, info.tokenizer, info.voices_archive):
        assert path.is_file() and path.parent == tiny_checkpoint


def test_absent_keys_take_the_real_models_values(tmp_path: Path) -> None:
    info = read_checkpoint(_fake_checkpoint(tmp_path / "hub", {"model_type": "moshi", "dim": 4096}))
    assert info.lm.num_layers == 32 and info.lm.text_card == 32000 and info.lm.context == 3000
    assert info.lm.ffn_dim == 22528 and info.lm.depformer_ffn_dim == 5632
    assert info.mimi.transformer["num_layers"] == 8 and info.mimi.quantizer["bins"] == 2048


@pytest.mark.parametrize("missing", [LM_FILE, VOICES_FILE, CONFIG_FILE])
def test_missing_file_names_it(tmp_path: Path, missing: str) -> None:
    root = _fake_checkpoint(tmp_path / "partial", skip=missing)
    with pytest.raises(ModelNotAvailableError) as info:
        read_checkpoint(root)
    message = str(info.value)
    assert missing in message and str(root) in message
    others = [name for name in CHECKPOINT_FILES if name != missing]
    assert all(f"lacks {name}" not in message for name in others)


def test_unreadable_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    root = _fake_checkpoint(tmp_path / "bad")
    (root / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint(root)


# ---- resolving a model name ------------------------------------------------------------------------


def test_resolve_local_directory(tiny_checkpoint: Path) -> None:
    assert resolve_model(tiny_checkpoint).lm.dim == 64
    assert resolve_model(str(tiny_checkpoint)).root == tiny_checkpoint


@pytest.mark.parametrize("name", ["/nonexistent/personaplex-model", "./no/such/dir/here", "not a model"])
def test_resolve_nonexistent_local_path(name: str) -> None:
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model(name)
    assert name in str(info.value)
    assert "local directory" in str(info.value) and "hub repo id" in str(info.value)


_RESOLVE_SCRIPT = """
import sys
from personaplex.engine.checkpoint import resolve_model
from personaplex.errors import ModelNotAvailableError
try:
    resolve_model(sys.argv[1])
except ModelNotAvailableError as exc:
    print(exc)
    sys.exit(3)
print("resolved?!")
"""


def test_hub_id_offline_with_empty_cache_says_what_to_do(tmp_path: Path) -> None:
    """A fresh interpreter, so huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", _RESOLVE_SCRIPT, "nvidia/personaplex-7b-v1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    message = done.stdout
    assert "nvidia/personaplex-7b-v1" in message
    assert "HF_TOKEN" in message and "PERSONAPLEX_MODEL" in message  # what to do
    assert not (tmp_path / "hf-home" / "hub" / "models--nvidia--personaplex-7b-v1" / "snapshots").exists()


# ---- voices.tgz ------------------------------------------------------------------------------------


def _tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"voice") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_extract_voices_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    voices = extract_voices(tiny_checkpoint / VOICES_FILE, cache_root=cache)
    assert sorted(p.name for p in voices.iterdir()) == sorted(
        f"{prefix}{i}.pt"
        for prefix, n in (("NATF", 4), ("NATM", 4), ("VARF", 5), ("VARM", 5))
        for i in range(n)
    )
    first = voices / "NATF2.pt"
    stat = first.stat()
    (voices / "VARM4.pt").unlink()  # a re-extraction would bring it back

    again = extract_voices(tiny_checkpoint / VOICES_FILE, cache_root=cache)
    assert again == voices
    assert not (voices / "VARM4.pt").exists()
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert len(list(cache.iterdir())) == 1  # no staging folders left behind


def test_extract_voices_keys_the_cache_by_content(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = extract_voices(_tgz(tmp_path / "a.tgz", [_file("voices/A.pt", b"a")]), cache_root=cache)
    b = extract_voices(_tgz(tmp_path / "b.tgz", [_file("voices/A.pt", b"b")]), cache_root=cache)
    assert a != b
    assert (a / "A.pt").read_bytes() == b"a" and (b / "A.pt").read_bytes() == b"b"


@pytest.mark.parametrize(
    "member,reason",
    [
        (_file("/tmp/evil-absolute.pt"), "absolute"),
        (_file("voices/../../evil.pt"), r"'\.\.'"),
        (_file("../evil.pt"), r"'\.\.'"),
        (_link("voices/link.pt", "/etc/passwd", tarfile.SYMTYPE), "link"),
        (_link("voices/rel.pt", "../../outside", tarfile.SYMTYPE), "link"),
        (_link("voices/hard.pt", "voices/NATF0.pt", tarfile.LNKTYPE), "link"),
        (_link("voices/fifo", "", tarfile.FIFOTYPE), "special"),
    ],
    ids=["absolute", "dotdot-inside", "dotdot", "symlink-abs", "symlink-rel", "hardlink", "fifo"],
)
def test_extract_voices_refuses_unsafe_members(tmp_path: Path, member, reason: str) -> None:
    archive = _tgz(tmp_path / "evil.tgz", [_file("voices/NATF0.pt"), member])
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=reason):
        extract_voices(archive, cache_root=cache)
    # Nothing was extracted, nothing is marked complete, nothing escaped.
    assert not list(cache.rglob("*.pt")) and not list(cache.rglob(".complete"))
    assert not (tmp_path / "evil.pt").exists()
    assert not Path("/tmp/evil-absolute.pt").exists()


def test_extract_voices_needs_a_voices_folder(tmp_path: Path) -> None:
    archive = _tgz(tmp_path / "flat.tgz", [_file("NATF0.pt")])
    with pytest.raises(CheckpointError, match="voices/"):
        extract_voices(archive, cache_root=tmp_path / "cache")

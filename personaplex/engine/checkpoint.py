"""Finding, downloading and describing a PersonaPlex checkpoint directory.

A checkpoint directory holds the hub's five files (docs/architecture.md §5, "The checkpoint directory"): the LM and Mimi weights in
their original Kyutai key names, the SentencePiece model, voices.tgz and a Kyutai-style
config.json. `PERSONAPLEX_MODEL` names either a hub repo id or such a local directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from personaplex.catalog import DEFAULT_REPO
from personaplex.errors import CheckpointError, ModelNotAvailableError
from personaplex.params import FRAME_RATE, SAMPLE_RATE

LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_FILE = "voices.tgz"
CONFIG_FILE = "config.json"
MIMI_CONFIG_FILE = "mimi_config.json"
"""Mimi's hyper-parameters, when config.json names them (`mimi_config_name`); else MimiSpec's."""
CHECKPOINT_FILES = (LM_FILE, MIMI_FILE, TOKENIZER_FILE, VOICES_FILE, CONFIG_FILE)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)


@dataclass(frozen=True)
class LMConfig:
    """The LM's hyper-parameters under their original names; defaults are the real 7B model's."""

    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    n_q: int = 16
    dep_q: int = 16
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10000.0
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = 4224
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_max_period: float = 10000.0
    delays: tuple[int, ...] = DELAYS

    @property
    def ffn_dim(self) -> int:
        """Width of the gated MLP's first projection (gate and value halves together)."""
        return 2 * (2 * int(self.hidden_scale * self.dim) // 3)

    @property
    def depformer_ffn_dim(self) -> int:
        return 2 * (2 * self.depformer_dim_feedforward // 3)

    @property
    def attention_window(self) -> int:
        """Positions the temporal transformer attends to, the current one included: the reference's
        streaming attention admits `context - 1` of them (2999 for the real model)."""
        return self.context - 1

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "delays" in values:
            values["delays"] = tuple(values["delays"])
        return cls(**values)


@dataclass(frozen=True)
class MimiSpec:
    """Mimi's hyper-parameters in Kyutai's sections (seanet, quantizer, transformer)."""

    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE
    seanet: dict[str, Any] = field(
        default_factory=lambda: {
            "dimension": 512,
            "n_filters": 64,
            "ratios": [8, 6, 5, 4],
            "n_residual_layers": 1,
            "kernel_size": 7,
            "residual_kernel_size": 3,
            "last_kernel_size": 3,
            "dilation_base": 2,
            "compress": 2,
        }
    )
    quantizer: dict[str, Any] = field(default_factory=lambda: {"dimension": 256, "n_q": 8, "bins": 2048})
    transformer: dict[str, Any] = field(
        default_factory=lambda: {
            "d_model": 512,
            "num_heads": 8,
            "num_layers": 8,
            "dim_feedforward": 2048,
            "context": 250,
            "layer_scale": 0.01,
            "max_period": 10000,
        }
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MimiSpec:
        base = cls()
        return cls(
            sample_rate=data.get("sample_rate", base.sample_rate),
            frame_rate=data.get("frame_rate", base.frame_rate),
            seanet={**base.seanet, **data.get("seanet", {})},
            quantizer={**base.quantizer, **data.get("quantizer", {})},
            transformer={**base.transformer, **data.get("transformer", {})},
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """Where each file of one checkpoint lies, plus its parsed configuration."""

    root: Path
    lm: LMConfig
    mimi: MimiSpec

    @property
    def lm_weights(self) -> Path:
        return self.root / LM_FILE

    @property
    def mimi_weights(self) -> Path:
        return self.root / MIMI_FILE

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_FILE

    @property
    def voices_archive(self) -> Path:
        return self.root / VOICES_FILE


def read_checkpoint(root: str | os.PathLike) -> CheckpointInfo:
    """Parse config.json (and the Mimi config it names) of a local checkpoint directory."""
    root = Path(root)
    missing = [name for name in CHECKPOINT_FILES if not (root / name).is_file()]
    if missing:
        raise ModelNotAvailableError(
            f"The model directory {root} lacks {', '.join(missing)}. It must hold the five files of "
            f"{DEFAULT_REPO}: {', '.join(CHECKPOINT_FILES)}."
        )
    config = _read_json(root / CONFIG_FILE)
    mimi_data: dict[str, Any] = {}
    if config.get("mimi_config_name"):
        mimi_data = _read_json(root / config["mimi_config_name"])
    return CheckpointInfo(root=root, lm=LMConfig.from_dict(config), mimi=MimiSpec.from_dict(mimi_data))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}") from exc


def resolve_model(model: str | os.PathLike, token: str | None = None) -> CheckpointInfo:
    """A local directory as is, or a hub repo id downloaded (or found in the HF cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return read_checkpoint(path)
    if not _HUB_ID.match(str(model)):
        raise ModelNotAvailableError(
            f"PERSONAPLEX_MODEL={model!r} is neither a local directory nor a hub repo id like {DEFAULT_REPO}."
        )
    return read_checkpoint(_download(str(model), token))


def _download(repo_id: str, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(CHECKPOINT_FILES), token=token))
    except GatedRepoError as exc:
        raise ModelNotAvailableError(
            f"{repo_id} is gated. Accept its licence at https://huggingface.co/{repo_id} with your "
            "account, then set HF_TOKEN to a token of that account."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotAvailableError(
            f"{repo_id} was not found on the hub, or your token cannot see it. Check PERSONAPLEX_MODEL "
            "and HF_TOKEN (the repo is gated: accept its licence first)."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotAvailableError(
            f"{repo_id} is not in the local Hugging Face cache (HF_HOME) and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE=1). Download it once with network access and HF_TOKEN set, "
            "or point PERSONAPLEX_MODEL at a local directory holding the five files."
        ) from exc
    except OSError as exc:
        raise ModelNotAvailableError(f"Downloading {repo_id} failed: {exc}") from exc


def voices_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "personaplex" / "voices"


def extract_voices(archive: str | os.PathLike, cache_root: Path | None = None) -> Path:
    """Extract voices.tgz once into a cache folder keyed by the archive's hash; return the voices dir.

    The archive comes from the network, so every member is checked first: absolute paths, `..`
    and links of any kind are refused rather than skipped.
    """
    archive = Path(archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    target = (cache_root or voices_cache_root()) / digest
    voices_dir = target / "voices"
    if (target / ".complete").exists():
        return voices_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            _check_members(tar, archive)
            tar.extractall(staging, filter="data")
        if not (staging / "voices").is_dir():
            raise CheckpointError(f"{archive} holds no voices/ folder.")
        (staging / ".complete").touch()
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".complete").exists():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return voices_dir


def _check_members(tar: tarfile.TarFile, archive: Path) -> None:
    for member in tar.getmembers():
        name = member.name
        if name.startswith(("/", "\\")) or Path(name).is_absolute():
            raise CheckpointError(f"{archive}: refusing absolute path {name!r}.")
        if ".." in Path(name).parts:
            raise CheckpointError(f"{archive}: refusing path with '..': {name!r}.")
        if not (member.isfile() or member.isdir()):
            raise CheckpointError(f"{archive}: refusing {name!r}, which is a link or special file.")

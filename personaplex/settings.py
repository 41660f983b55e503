"""Settings read from the environment when asked, never at import: `Settings` for web and worker,
`ClientSettings` for the clients (REST client, CLI, MCP server).

Every setting is declared once, as a field whose metadata holds its environment variable, parser
and meaning; `from_env` and the README table (`Settings.describe()`) both derive from those fields,
so there is one place to read what can be configured.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from personaplex.catalog import DEFAULT_REPO

DEFAULT_API_URL = "http://localhost:8998"
"""Where the clients look for the service when PERSONAPLEX_API_URL is unset."""

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def parse_bool(text: str) -> bool:
    """Read 1/true/yes/on as True and 0/false/no/off/empty as False; anything else is an error."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of 1/true/yes/on or 0/false/no/off, got {text!r}")


def _optional_str(text: str) -> str | None:
    return text.strip() or None


KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
"""A key's name: what job records store as their owner (never the secret itself)."""

NamedKeys = tuple[tuple[str, str], ...]
"""(name, key) pairs, in the order they were written."""


def parse_named_keys(text: str) -> NamedKeys | None:
    """Read `name:key,name2:key2` (spaces around items ignored; empty: None).

    A name is letters, digits and `_ . @ -`; a key is everything after the first colon up to the
    next comma, so keys may hold colons but not commas. Errors never quote a key, since a malformed
    entry may be a bare secret.
    """
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    pairs: list[tuple[str, str]] = []
    for number, entry in enumerate(entries, start=1):
        name, colon, key = (part.strip() for part in entry.partition(":"))
        if not colon or not key:
            raise ValueError(f"entry {number} is not name:key (write name:key,name2:key2)")
        if not KEY_NAME_RE.fullmatch(name):
            raise ValueError(f"entry {number}: a name is 1-64 letters, digits, '_', '.', '@' or '-'")
        if name in (taken for taken, _ in pairs):
            raise ValueError(f"the name {name!r} is given twice")
        pairs.append((name, key))
    return tuple(pairs) or None


def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = cast(text)
        if not ok(value):
            raise ValueError(f"must be {requirement}, got {text!r}")
        return value

    return parse


def _positive(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    return _checked(cast, lambda value: value > 0, "positive")


def _non_negative(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    return _checked(cast, lambda value: value >= 0, "0 or more")


def _blob_store(text: str) -> str:
    value = text.strip().lower()
    if value not in ("fs", "redis"):
        raise ValueError(f"must be 'fs' or 'redis', got {text!r}")
    return value


def option(env: str, default: Any, parse: Callable[[str], Any], meaning: str) -> Any:
    """Declare one setting: a dataclass field whose metadata says where it comes from and what it means."""
    return field(default=default, metadata={"env": env, "parse": parse, "meaning": meaning})


class EnvSettings:
    """A frozen dataclass of `option()` fields, read from the environment by `from_env()`."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Any:
        """Read every option from `environ` (default `os.environ`), then apply keyword overrides.

        A malformed value raises ValueError naming the variable, so a bad deployment fails at start.
        """
        env = os.environ if environ is None else environ
        unknown = set(overrides) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        options = fields(cls)  # type: ignore[arg-type]
        values = {f.name: _parse(f, env[f.metadata["env"]]) for f in options if f.metadata["env"] in env}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, meaning) rows, one per setting, for the README table."""
        return [(f.metadata["env"], _show(f.default), f.metadata["meaning"]) for f in fields(cls)]  # type: ignore[arg-type]


def _api_url(text: str) -> str:
    """A base URL without its trailing slash; empty means the default."""
    return text.strip().rstrip("/") or DEFAULT_API_URL


@dataclass(frozen=True)
class ClientSettings(EnvSettings):
    """Where the clients (the REST client, the CLI, the MCP server) find the service and its key."""

    api_url: str = option("PERSONAPLEX_API_URL", DEFAULT_API_URL, _api_url, "The service's base URL")
    api_key: str | None = option(
        "PERSONAPLEX_API_KEY", None, _optional_str, "Sent as a bearer token when set"
    )


@dataclass(frozen=True)
class Settings(EnvSettings):
    """The service configuration. Build it with `Settings.from_env()`, never at import time."""

    redis_url: str = option(
        "REDIS_URL", "redis://localhost:6379/0", str, "Redis: broker, job records, events"
    )
    model: str = option("PERSONAPLEX_MODEL", DEFAULT_REPO, str, "HF repo id or checkpoint dir")
    data_dir: Path = option(
        "PERSONAPLEX_DATA_DIR", Path("./data"), Path, "Shared directory of job blobs (fs)"
    )
    blob_store: str = option("PERSONAPLEX_BLOB_STORE", "fs", _blob_store, "Where audio lives: fs or redis")
    gpu_idle_timeout: float = option(
        "GPU_IDLE_TIMEOUT", 300.0, float, "Idle seconds before the model offloads (0: never)"
    )
    visibility_timeout: float = option(
        "PERSONAPLEX_VISIBILITY_TIMEOUT",
        21600.0,
        _positive(float),
        "Seconds before Celery redelivers an unacked message; a dead worker's jobs do not wait for it",
    )
    api_key: str | None = option(
        "PERSONAPLEX_API_KEY", None, _optional_str, "Bearer token for /api if set: an admin key named admin"
    )
    api_keys: NamedKeys | None = option(
        "PERSONAPLEX_API_KEYS",
        None,
        parse_named_keys,
        "Client keys, name:key,...: each sees only its own jobs",
    )
    admin_keys: NamedKeys | None = option(
        "PERSONAPLEX_ADMIN_KEYS",
        None,
        parse_named_keys,
        "Admin keys, name:key,...: see every job, may offload",
    )
    allow_open: bool = option(
        "PERSONAPLEX_ALLOW_OPEN", False, parse_bool, "Serve /api without any key on a non-loopback address"
    )
    max_upload_mb: float = option("PERSONAPLEX_MAX_UPLOAD_MB", 200.0, _positive(float), "Largest upload, MB")
    max_audio_seconds: float = option(
        "PERSONAPLEX_MAX_AUDIO_SECONDS", 600.0, _positive(float), "Longest input audio, seconds"
    )
    retention_hours: float = option(
        "PERSONAPLEX_RETENTION_HOURS", 24.0, _positive(float), "Hours a finished job and its blobs are kept"
    )
    device: str | None = option(
        "DEVICE", None, _optional_str, "Torch device (cuda, cuda:1, cpu); unset: auto"
    )
    cpu_offload: bool = option("CPU_OFFLOAD", False, parse_bool, "Keep weights in CPU memory, stream to GPU")
    hf_token: str | None = option("HF_TOKEN", None, _optional_str, "Hugging Face token for the gated weights")
    max_attempts: int = option(
        "PERSONAPLEX_MAX_ATTEMPTS", 3, _positive(int), "Deliveries of a job before it fails"
    )
    max_queue: int = option(
        "PERSONAPLEX_MAX_QUEUE", 1000, _positive(int), "Queued jobs before POST answers 429"
    )
    offline_timeout: float = option(
        "PERSONAPLEX_OFFLINE_TIMEOUT", 600.0, _positive(float), "Seconds POST /api/offline waits, then 504"
    )
    heartbeat_ttl: float = option(
        "PERSONAPLEX_HEARTBEAT_TTL",
        15.0,
        _positive(float),
        "Seconds a worker heartbeat and a job's run lease live; a dead worker's jobs are queued again after it",
    )
    dispatch_grace_s: float = option(
        "PERSONAPLEX_DISPATCH_GRACE_S",
        10.0,
        _positive(float),
        "Seconds a queued job may wait for its message before a worker sends it (web died mid-submit)",
    )
    max_batch: int = option(
        "PERSONAPLEX_MAX_BATCH", 8, _positive(int), "Waiting jobs a GPU worker runs together in one batch"
    )
    max_batch_frames: int = option(
        "PERSONAPLEX_MAX_BATCH_FRAMES",
        30000,
        _positive(int),
        "Memory bound per batch: rows x frame capacity (12.5/s, prompt included); a loop's capacity"
        " is at least this / PERSONAPLEX_MAX_BATCH",
    )
    prompt_cache_mb: float = option(
        "PERSONAPLEX_PROMPT_CACHE_MB",
        1024.0,
        _non_negative(float),
        "Device memory for prompt states (voice + text prompt), least recently used out; 0: off",
    )
    max_live: int = option(
        "PERSONAPLEX_MAX_LIVE",
        4,
        _non_negative(int),
        "Live conversations a GPU worker runs at once, rows of its batch beside the jobs; 0: none",
    )
    max_live_seconds: float = option(
        "PERSONAPLEX_MAX_LIVE_SECONDS",
        300.0,
        _positive(float),
        "Longest live conversation (s); its loop keeps room for it, so longer ones cost rows",
    )
    live_wait_s: float = option(
        "PERSONAPLEX_LIVE_WAIT_S",
        30.0,
        _positive(float),
        "Seconds a conversation waits for a free live slot before it is refused (close 1013)",
    )
    redis_pool_size: int = option(
        "PERSONAPLEX_REDIS_POOL_SIZE",
        50,
        _positive(int),
        "Redis connections one web process's API may hold (event sockets share one more)",
    )
    host: str = option(
        "HOST", "127.0.0.1", str, "Interface of the development web server; off loopback it needs a key"
    )
    port: int = option("PORT", 8998, _positive(int), "Port of the development web server")

    @property
    def retention_s(self) -> float:
        """Retention in seconds: the TTL of finished job records and Redis blobs."""
        return self.retention_hours * 3600.0

    @property
    def has_keys(self) -> bool:
        """Whether /api asks for a key: any of PERSONAPLEX_API_KEY, _API_KEYS, _ADMIN_KEYS is set."""
        return bool(self.api_key or self.api_keys or self.admin_keys)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _parse(setting: Field, text: str) -> Any:
    try:
        return setting.metadata["parse"](text)
    except ValueError as exc:
        raise ValueError(f"{setting.metadata['env']}: {exc}") from None


def _show(default: Any) -> str:
    if default is None:
        return "(unset)"
    if isinstance(default, Path) and not default.is_absolute():
        return f"./{default}"
    return str(default)

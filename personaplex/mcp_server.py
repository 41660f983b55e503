"""MCP server: PersonaPlex speech-to-speech for AI assistants, as a thin client of the HTTP API.

    python -m personaplex.mcp_server        # or the console script `personaplex-mcp`

It speaks MCP over stdio (JSON-RPC on stdin/stdout; logs go to stderr only) and forwards every tool
to the PersonaPlex Queue service through `personaplex.client`. Environment:

    PERSONAPLEX_API_URL       the service (default http://localhost:8998)
    PERSONAPLEX_API_KEY       sent as a bearer token when set
    PERSONAPLEX_MCP_MAX_WAIT  seconds process_audio waits before handing back the job id (default 600)
    PERSONAPLEX_MAX_UPLOAD_MB the service's upload limit (default 200, as the service's): larger inputs
                              are refused before they are read

Tools: health_check, get_gpu_status, offload_gpu, list_voices, get_prompt_examples, process_audio,
create_voice and delete_voice (custom voices, used by id as voice_prompt), and, for clients that cut
calls at about 60 s, submit_audio_job, get_job_status, get_job_result and cancel_job. Every tool
returns a dict (a TypedDict, so each publishes an output schema) and none raises: a failure is
`{"status": "error", "error": "<what went wrong and what to do>"}`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NotRequired, Required, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from personaplex.catalog import (
    ASSISTANT_PROMPT,
    DEFAULT_SEED,
    DEFAULT_VOICE,
    normalize_voice_name,
    voice_ids,
)
from personaplex.client import FINAL_STATUSES, ClientError, PersonaPlexClient
from personaplex.custom_voices import is_custom_voice
from personaplex.params import FRAME_RATE
from personaplex.settings import DEFAULT_API_URL, ClientSettings

log = logging.getLogger("personaplex.mcp")

SERVER_NAME = "personaplex"

DEFAULT_MAX_WAIT_S = 600.0
"""Seconds process_audio waits for its job before returning {"status": "pending", "job_id"}."""

POLL_INTERVAL_S = 0.5
"""Seconds between two reads of the job record while process_audio waits."""

PROGRESS_INTERVAL_S = 1.0
"""Seconds between two progress notifications (the promise to clients is at most 2 s)."""

MAX_POLL_FAILURES = 20
"""Consecutive failed reads of the job record (about 10 s) process_audio waits out before giving up."""

REQUEST_TIMEOUT_S = 30.0
"""Seconds one ordinary HTTP request to the service may take."""


MB = 1024 * 1024

DEFAULT_MAX_UPLOAD_MB = 200.0
"""The service's default PERSONAPLEX_MAX_UPLOAD_MB (its 413 limit); the service does not report it."""
DEFAULT_MAX_UPLOAD_BYTES = int(DEFAULT_MAX_UPLOAD_MB * MB)

SYSTEM_TREES = ("/proc", "/sys", "/dev")
"""Kernel and device files: never sent as audio (/proc/self/environ holds the API key), never written."""


def _path_limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no such limit
        return default


PATH_MAX = _path_limit("PC_PATH_MAX", 4096)
"""Bytes of a path, its terminating NUL included (Linux: 4096)."""

NAME_MAX = _path_limit("PC_NAME_MAX", 255)
"""Bytes of one file or folder name."""

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_PINNED_FOLDER = (
    hasattr(os, "O_DIRECTORY") and {os.open, os.stat, os.replace, os.unlink} <= os.supports_dir_fd
)
"""Whether the folder can be held open so that the last check and the rename see the same folder."""

T = TypeVar("T")


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class McpConfig:
    """Where the service is and how long process_audio may wait; read from the environment by main()."""

    api_url: str = DEFAULT_API_URL
    api_key: str | None = None
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    """The service's upload limit. It is not in any API answer, so it comes from the same variable the
    service reads (in the web container that is the service's own value)."""

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> McpConfig:
        env = os.environ if environ is None else environ
        upload_mb = _env_number(env, "PERSONAPLEX_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)
        client = ClientSettings.from_env(env)
        return cls(
            api_url=client.api_url,
            api_key=client.api_key,
            max_wait_s=max(_env_number(env, "PERSONAPLEX_MCP_MAX_WAIT", DEFAULT_MAX_WAIT_S), 0.0),
            max_upload_mb=upload_mb if upload_mb > 0 else DEFAULT_MAX_UPLOAD_MB,
        )


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    """The variable as a float; `default` (with a warning) when it is not a number."""
    raw = env.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number; using %g", name, raw, default)
        return default


# -- result types (each tool publishes its output schema from these) -----------------------------


class HealthResult(TypedDict, total=False):
    status: Required[str]
    """healthy (workers alive), degraded (no worker: jobs wait), unhealthy (Redis down) or error."""
    error: str
    api_url: str
    redis: str
    workers: int
    queue_length: int | None
    live_slots_free: int
    """Live conversations the fleet can take now."""
    live_waiting: int | None
    """Conversations waiting for a free live slot."""
    gpu_available: bool
    model_loaded: bool
    timestamp: str
    detail: str


class GpuStatusResult(TypedDict, total=False):
    status: Required[str]
    error: str
    model_loaded: bool
    active_connections: int
    """Running jobs plus live conversations, over the fleet."""
    live_sessions: int
    """Live conversations (WS /api/chat), over the fleet; each worker adds live_slots_free."""
    idle_timeout: float
    gpu: dict[str, Any]
    worker_count: int
    workers: list[dict[str, Any]]


class OffloadResult(TypedDict, total=False):
    status: Required[str]
    """offloaded, deferred (a job is running: offloaded after it), not_loaded, or error."""
    error: str
    memory_allocated: float
    workers: list[dict[str, Any]]


class VoiceInfo(TypedDict):
    id: str
    """The value for voice_prompt: a catalog voice's legacy id ("NATF2.pt") or a custom voice's
    ("custom-anna")."""
    name: str
    """E.g. "Natural Female 2"."""
    category: str
    """natural, variety or custom."""
    filename: str
    """The same as id (kept for clients that read it)."""
    custom: NotRequired[bool]
    """Uploaded with create_voice (false: it ships with the model)."""
    created_at: NotRequired[float | None]
    """Custom voices: when it was uploaded (Unix time)."""
    duration_s: NotRequired[float | None]
    """Custom voices: the recording's length in seconds."""


class CustomVoiceInfo(VoiceInfo, total=False):
    loudness_lufs: float
    """The recording's integrated loudness (normalised to -24 LUFS before use)."""
    consent: dict[str, Any]
    """When the speaker's consent was attested (`at`, Unix time) and, to the uploader, from where."""


class CreateVoiceResult(TypedDict, total=False):
    status: Required[str]
    """ok, or error."""
    error: str
    message: str
    voice: CustomVoiceInfo


class DeleteVoiceResult(TypedDict, total=False):
    status: Required[str]
    """ok, or error."""
    error: str
    message: str
    voice_id: str
    deleted: bool


class VoicesResult(TypedDict, total=False):
    status: Required[str]
    error: str
    voices: list[VoiceInfo]
    default: str
    count: int


class PromptInfo(TypedDict):
    id: str
    name: str
    text: str


class PromptsResult(TypedDict, total=False):
    status: Required[str]
    error: str
    prompts: list[PromptInfo]
    default: str
    default_seed: int


class AudioResult(TypedDict, total=False):
    """process_audio and get_job_result: success, pending (still running) or error."""

    status: Required[str]
    error: str
    message: str
    job_id: str
    job_status: str
    progress: dict[str, Any]
    output_audio: str
    generated_text: str
    voice_used: str
    text_prompt_used: str
    seed: int
    duration_s: float
    frames: int
    timings: dict[str, float | bool]


class SubmitResult(TypedDict, total=False):
    status: Required[str]
    """submitted, or error."""
    error: str
    message: str
    job_id: str
    job_status: str
    voice_used: str
    text_prompt_used: str
    seed: int
    input_duration_s: float | None


class JobStatusResult(TypedDict, total=False):
    status: Required[str]
    """The job's status (queued, running, succeeded, failed, cancelled) or error."""
    error: str
    message: str
    job_id: str
    progress: dict[str, Any]
    percent: float | None
    worker: str | None
    attempts: int
    input_name: str
    input_duration_s: float | None
    params: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    generated_text: str
    duration_s: float


class CancelResult(TypedDict, total=False):
    status: Required[str]
    """cancelled (it will not run), cancel_requested (running: stops at its next frame), or error."""
    error: str
    message: str
    job_id: str
    job_status: str


# -- helpers -------------------------------------------------------------------------------------


class ToolError(Exception):
    """A failure whose message already says what went wrong and what to do, reported as an MCP tool
    error: the MCP server's boundary adapter (personaplex/errors.py)."""


def error(message: str) -> dict[str, Any]:
    return {"status": "error", "error": message}


def describe_client_error(exc: ClientError, config: McpConfig) -> str:
    """The service's error in words an assistant can act on."""
    if exc.status is None:
        return (
            f"The PersonaPlex service at {config.api_url} is unreachable ({unreachable_reason(exc)}). "
            "Start it (`docker compose up -d`, or `python -m web` with Redis and `celery -A worker "
            "worker`) or point PERSONAPLEX_API_URL at the running service, then try again."
        )
    if exc.status == 401:
        return f"{exc} Set PERSONAPLEX_API_KEY to the service's API key."
    if exc.status == 429:
        wait = exc.retry_after
        return f"{exc} Try again{f' in {wait:g} s' if wait else ' later'}."
    if exc.status == 400 and exc.payload.get("valid_voices"):
        return f"{exc} Valid voices: {', '.join(exc.payload['valid_voices'])}."
    if exc.status == 503:
        return f"{exc} The service is unhealthy: check its Redis and workers (health_check)."
    return str(exc)


def unreachable_reason(exc: ClientError) -> str:
    """'connection refused', 'timed out', ... rather than urllib3's nested repr."""
    cause = exc.__cause__
    text = str(cause or exc)
    for marker, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host name"),
        ("nodename nor servname", "unknown host name"),
        ("timed out", "timed out"),
        ("Timeout", "timed out"),
    ):
        if marker in text:
            return reason
    return type(cause).__name__ if cause is not None else text


def guarded(config: McpConfig, what: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a tool body; turn every failure into {"status": "error", "error": ...}."""
    try:
        return body()
    except ToolError as exc:
        return error(str(exc))
    except ClientError as exc:
        return error(describe_client_error(exc, config))
    except Exception as exc:  # a tool never raises: report it, log the traceback on stderr
        log.exception("%s failed unexpectedly", what)
        return error(f"{what} failed unexpectedly: {type(exc).__name__}: {exc}")


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut for an error message (a 10,000-character path would drown the message)."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def checked_path(raw: str, what: str) -> Path:
    """`raw` as an absolute path (~ expanded, links not resolved), or ToolError when no file system
    could take it: a NUL character, an undecodable name, a path over PATH_MAX or a name over NAME_MAX."""
    if "\x00" in raw:
        raise ToolError(f"{what} path {shorten(raw)!r} contains a NUL character: pass a plain file path.")
    try:
        path = Path(raw).expanduser().absolute()
        encoded = os.fsencode(path)
    except (UnicodeError, RuntimeError) as exc:  # RuntimeError: "~" with no home folder
        raise ToolError(
            f"{what} path {shorten(raw)!r} is not usable ({exc}): pass a plain file path."
        ) from exc
    if len(encoded) >= PATH_MAX:
        raise ToolError(
            f"{what} path {shorten(str(path))!r} is {len(encoded)} bytes long, over the system's limit "
            f"of {PATH_MAX - 1}: pass a shorter path."
        )
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ToolError(
                f"{what} path {shorten(str(path))!r} has a name of {len(os.fsencode(part))} bytes "
                f"({shorten(part, 40)!r}), over the system's limit of {NAME_MAX}: pass shorter names."
            )
    return path


def system_tree(path: str | Path) -> str | None:
    """/proc, /sys or /dev when `path`, its links resolved, lies in one of them; else None."""
    real = os.path.realpath(path)
    return next((tree for tree in SYSTEM_TREES if real == tree or real.startswith(tree + "/")), None)


def file_kind(mode: int) -> str:
    """'a symbolic link', 'a FIFO (named pipe)', ... for a mode that is not a regular file's."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_input(input_file: str, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> tuple[bytes, str]:
    """The input recording's bytes and name; ToolError if it is missing, unreadable, not a regular
    file, a kernel or device file, or over the upload limit (checked before a byte is read)."""
    if not input_file or not input_file.strip():
        raise ToolError("input_file is empty: pass the absolute path of a WAV, FLAC or MP3 recording.")
    path = checked_path(input_file, "Input")
    if tree := system_tree(path):
        raise ToolError(
            f"Input file {str(path)!r} is in {tree} (kernel and device files, never audio): refused. "
            "Pass the path of an audio file."
        )
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        relative = not Path(input_file).expanduser().is_absolute()
        where = f" in {os.getcwd()!r}, the MCP server's working folder" if relative else ""
        raise ToolError(
            f"Input file {str(path)!r} does not exist{where}. Pass the absolute path of an existing "
            "audio file, as the MCP server sees it (inside the container when it runs in one)."
        ) from None
    except OSError as exc:
        raise ToolError(f"Input file {str(path)!r} cannot be read ({exc.strerror or exc}).") from exc
    # Checked before opening: opening a FIFO blocks, and opening a device can act on it.
    check_input_stat(path, info, max_bytes)
    data = read_opened(path, max_bytes)
    if not data:
        raise ToolError(f"Input file {str(path)!r} is empty: pass a recording with audio in it.")
    return data, path.name


def check_input_stat(path: Path, info: os.stat_result, max_bytes: int) -> None:
    """ToolError unless `info` is a regular file within the upload limit."""
    if not stat.S_ISREG(info.st_mode):
        raise ToolError(
            f"Input path {str(path)!r} is not a regular file ({file_kind(info.st_mode)}): "
            "pass the path of an audio file."
        )
    if info.st_size > max_bytes:
        raise ToolError(
            f"Input file {str(path)!r} is {info.st_size / MB:,.1f} MB, over the service's upload limit "
            f"of {max_bytes / MB:g} MB (PERSONAPLEX_MAX_UPLOAD_MB), so it was neither read nor sent. "
            "Pass a shorter recording or a compressed one (FLAC, MP3)."
        )


def read_opened(path: Path, max_bytes: int) -> bytes:
    """Read `path`, checking again what was opened: the path may have been swapped since it was
    checked (a FIFO, a link into /proc), and the descriptor's file is the one whose bytes are sent."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ToolError(
            f"Input file {str(path)!r} cannot be read ({exc.strerror or exc}). Check its permissions."
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        check_input_stat(path, info, max_bytes)
        try:  # Linux names the opened file in /proc/self/fd; elsewhere the checks above stand
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = None
        if opened is not None and (tree := system_tree(opened)):
            raise ToolError(f"Input file {str(path)!r} leads into {tree}: refused.")
        try:
            data = handle.read(info.st_size + 1)  # one byte more tells a file still growing
        except OSError as exc:
            raise ToolError(f"Input file {str(path)!r} cannot be read ({exc.strerror or exc}).") from exc
    if len(data) > info.st_size:
        raise ToolError(f"Input file {str(path)!r} grew while it was read: call again once it is complete.")
    return data


def custom_voice_id(raw: str) -> str | None:
    """`raw` as a custom voice id ("Custom-Anna " -> "custom-anna"), or None if it has not the form;
    the service spells them in lower case and accepts any case, so the MCP server does too."""
    candidate = (raw or "").strip().lower()
    return candidate if is_custom_voice(candidate) else None


def check_voice(voice_prompt: str) -> str:
    """The catalog file name of the voice, or a custom voice's id, or ToolError listing the valid ones.

    Whether a custom voice exists is the service's to say: it answers 400 with every valid voice."""
    voice = normalize_voice_name(voice_prompt or "") or custom_voice_id(voice_prompt)
    if voice is None:
        raise ToolError(
            f"Unknown voice prompt {voice_prompt!r}. Use one of: {', '.join(voice_ids())}, or a custom "
            "voice's id such as 'custom-anna' (list_voices describes them all)."
        )
    return voice


def check_output(output_file: str) -> Path:
    """The absolute output path, after proving it is a regular file or a new name (never a link, a
    device, a FIFO or a socket: writing there would replace it) in a folder that can be written."""
    if not output_file or not output_file.strip():
        raise ToolError("output_file is empty: pass the absolute path where the answer WAV should go.")
    path = checked_path(output_file, "Output")
    try:
        refuse_unsafe_output(path)
    except OSError as exc:
        raise ToolError(f"Output file {str(path)!r} is not writable ({exc.strerror or exc}).") from exc
    if tree := system_tree(path):
        raise ToolError(
            f"Output path {str(path)!r} is in {tree} (kernel and device files): refused. "
            "Choose a path in a folder of your own."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # documented: missing folders are created
        probe = path.parent / f".personaplex-probe.{os.getpid()}.{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as exc:
        raise ToolError(
            f"Output file {str(path)!r} is not writable ({exc.strerror or exc}). "
            "Choose a path in a folder you can write to."
        ) from exc
    return path


def refuse_unsafe_output(path: Path, folder: int | None = None) -> None:
    """ToolError if `path` (its name looked up in `folder`, an open folder, when given) exists and is
    not a regular file; OSError if it cannot be looked at. Links are looked at, never followed."""
    name = path.name if folder is not None else path
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return  # a new file (or a missing folder, which creating it reports)
    if stat.S_ISREG(info.st_mode):
        return  # documented: an existing answer is replaced
    if stat.S_ISDIR(info.st_mode):
        raise ToolError(
            f"Output path {str(path)!r} is a directory: pass a file path such as {str(path / 'answer.wav')!r}."
        )
    raise ToolError(
        f"Output path {str(path)!r} is {file_kind(info.st_mode)}, not a regular file: the MCP server "
        "never writes through or replaces one. Pass the path of a regular file or a new one."
    )


def write_output(path: Path, data: bytes) -> None:
    """Write atomically (a temporary file renamed into place), creating parent folders."""
    try:
        replace_atomically(path, data)
    except ToolError as exc:  # the path became a link, a device, ... while the job ran
        raise ToolError(f"{exc} Then call get_job_result with the job id to fetch the answer.") from exc
    except OSError as exc:
        raise ToolError(
            f"Could not write the output to {str(path)!r} ({exc.strerror or exc}). "
            "Choose a writable path, then call get_job_result with the job id to fetch it again."
        ) from exc


def replace_atomically(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path` and rename it over `path`.

    The job ran for a while since check_output: the target is checked again right before the rename
    (a link, device or FIFO put there meanwhile is refused, not replaced). The folder is held open,
    so the check and the rename act on the same folder even if a parent is swapped for a link; the
    rename itself never follows a link.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC) if _PINNED_FOLDER else None

    def at(name: str) -> str:
        return name if folder is not None else str(path.parent / name)

    temp = f".personaplex-output.{secrets.token_hex(6)}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(at(temp), flags, 0o666, dir_fd=folder)  # 0o666 less the umask, as open() gives
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            refuse_unsafe_output(path, folder)
            os.replace(at(temp), at(path.name), src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with suppress(OSError):
                os.unlink(at(temp), dir_fd=folder)
            raise
    finally:
        if folder is not None:
            os.close(folder)


def estimated_frames(job: Mapping[str, Any]) -> int:
    """Frames the generation phase will run, derived from the input's duration."""
    duration = job.get("input_duration_s") or 0.0
    return max(int(math.ceil(duration * FRAME_RATE - 1e-9)), 1)


def progress_message(job: Mapping[str, Any]) -> str:
    status = job.get("status")
    progress = job.get("progress") or {}
    phase = progress.get("phase")
    if status == "queued":
        return "Queued: waiting for a GPU worker."
    if status == "running" and phase == "load":
        return "Running: loading the model."
    if status == "running" and phase == "prompt":
        return f"Running: voice and persona prompt, frame {progress.get('done', 0)} of {progress.get('total', '?')}."
    if status == "running" and phase == "generate":
        return f"Running: generating, frame {progress.get('done', 0)} of {progress.get('total', '?')}."
    if status == "running" and phase == "decode":
        return "Running: decoding the answer's audio."
    if status == "running":
        return "Running: starting."
    return f"Job {status}."


def percent_done(job: Mapping[str, Any]) -> float | None:
    progress = job.get("progress") or {}
    if job.get("status") == "succeeded":
        return 100.0
    if progress.get("phase") in ("generate", "decode") and progress.get("total"):
        share = progress.get("done", 0) / progress["total"]
        return round(100.0 * min(share, 1.0) * (0.99 if progress["phase"] == "generate" else 1.0), 1)
    return 0.0 if job.get("status") in ("queued", "running") else None


class ProgressMeter:
    """Turns job records into strictly increasing progress values (the MCP rule) on a frame scale.

    `progress` counts generated frames and `total` is those frames plus one for writing the answer.
    While the count stands still (queued, loading, prompt phase), each heartbeat adds a shrinking
    fraction (k/(k+1)) that never reaches the next whole frame: values rise, yet never overstate the
    work done.
    """

    def __init__(self) -> None:
        self.last = -1.0
        self.ticks = 0
        self.frames: int | None = None

    def total(self, job: Mapping[str, Any]) -> int:
        progress = job.get("progress") or {}
        if progress.get("phase") == "generate" and progress.get("total"):
            self.frames = int(progress["total"])  # the worker's count wins over the estimate
        return (self.frames or estimated_frames(job)) + 1

    def update(self, job: Mapping[str, Any]) -> tuple[float, int]:
        """(progress, total) for the job's latest record."""
        total = self.total(job)
        progress = job.get("progress") or {}
        done = 0
        if job.get("status") == "succeeded" or progress.get("phase") == "decode":
            done = total - 1
        elif progress.get("phase") == "generate":
            done = min(int(progress.get("done") or 0), total - 1)
        base = max(float(done), math.floor(self.last))
        if base > self.last:
            self.ticks = 0
            self.last = base
        else:
            self.ticks += 1
            self.last = base + self.ticks / (self.ticks + 1)
        return self.last, total

    def finish(self, job: Mapping[str, Any]) -> tuple[float, int]:
        """(total, total): the answer is written."""
        total = self.total(job)
        self.last = max(float(total), self.last)
        return self.last, total


def success_result(job: Mapping[str, Any], output: Path) -> dict[str, Any]:
    result = job.get("result") or {}
    params = job.get("params") or {}
    return {
        "status": "success",
        "job_id": job["id"],
        "output_audio": str(output),
        "generated_text": str(result.get("text", "")),
        "voice_used": str(params.get("voice_prompt", "")),
        "text_prompt_used": str(params.get("text_prompt", "")),
        "seed": int(params.get("seed", DEFAULT_SEED)),
        "duration_s": float(result.get("duration_s") or job.get("input_duration_s") or 0.0),
        "frames": int(result.get("frames") or 0),
        "timings": {
            k: v if isinstance(v, bool) else float(v) for k, v in (result.get("timings") or {}).items()
        },
    }


def pending_result(job: Mapping[str, Any], waited_s: float) -> dict[str, Any]:
    job_id = job["id"]
    return {
        "status": "pending",
        "job_id": job_id,
        "job_status": str(job.get("status")),
        "progress": dict(job.get("progress") or {}),
        "message": (
            f"The job is still {job.get('status')} after {waited_s:.0f} s and goes on in the service. "
            f"Call get_job_status('{job_id}') to follow it, then get_job_result('{job_id}', output_file) "
            f"to write the answer; cancel_job('{job_id}') stops it."
        ),
    }


def final_job_error(job: Mapping[str, Any]) -> str:
    job_id = job["id"]
    reason = str(job.get("error") or "the worker gave no reason")
    if job.get("status") == "failed":
        return (
            f"Job {job_id} failed: {reason.rstrip('.')}. Fix the cause "
            "(input audio, voice, parameters) and submit again; health_check shows whether workers run."
        )
    return f"Job {job_id} was cancelled before it finished: submit it again to get an answer."


# -- the server ----------------------------------------------------------------------------------


INSTRUCTIONS = """\
PersonaPlex answers a spoken recording with a spoken reply in a chosen voice and persona.
Use process_audio(input_file, output_file) with absolute paths for one call that waits (progress is
reported). If your client cuts tool calls at about 60 s, use submit_audio_job, then poll
get_job_status and fetch the WAV with get_job_result. list_voices and get_prompt_examples show the
choices; create_voice adds a custom voice from a 1-60 s recording of a speaker who consented (pass its
id as voice_prompt) and delete_voice removes it. health_check says whether the service and its GPU
workers are up."""


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(partial(fn, *args))


class Tools:
    """Every tool of the MCP server, as methods over one configuration; `TOOLS` registers them."""

    def __init__(self, config: McpConfig) -> None:
        self.config = config

    def client(self) -> PersonaPlexClient:
        return PersonaPlexClient(self.config.api_url, api_key=self.config.api_key, timeout=REQUEST_TIMEOUT_S)

    # -- service and catalog ---------------------------------------------------------------------

    def health_check(self) -> HealthResult:
        """Check the PersonaPlex service: Redis, live GPU workers and queue length.

        status is "healthy" (workers are up), "degraded" (no worker is alive, so jobs wait in the
        queue until one starts), "unhealthy" (the service cannot reach Redis) or "error" (the service
        itself is unreachable; the error says how to fix it).
        """

        def body() -> dict[str, Any]:
            report = self.client().health()
            return {"api_url": self.config.api_url, **report}

        return guarded(self.config, "health_check", body)  # type: ignore[return-value]

    def get_gpu_status(self) -> GpuStatusResult:
        """GPU workers and their memory: whether the model is loaded, running jobs and live
        conversations (with each worker's free live slots), idle timeout.

        One entry per live worker in `workers`; the top-level fields summarise the fleet.
        """

        def body() -> dict[str, Any]:
            return {"status": "ok", **self.client().gpu_status()}

        return guarded(self.config, "get_gpu_status", body)  # type: ignore[return-value]

    def offload_gpu(self) -> OffloadResult:
        """Free GPU memory by unloading the model from every worker; the next job reloads it.

        status: "offloaded", "deferred" (a job is running: the model is unloaded after it) or
        "not_loaded" (nothing to free). Safe to repeat.
        """

        def body() -> dict[str, Any]:
            return dict(self.client().offload())

        return guarded(self.config, "offload_gpu", body)  # type: ignore[return-value]

    def list_voices(self) -> VoicesResult:
        """The voices PersonaPlex can answer in: the 18 that ship with the model (natural and variety,
        female and male), then the custom ones made with create_voice (custom true, with created_at
        and duration_s).

        Pass a voice's `id` (e.g. "NATF2.pt" or "custom-anna") as voice_prompt; "NATF2" and "natf2"
        work too.
        """

        def body() -> dict[str, Any]:
            voices = self.client().voices()
            return {"status": "ok", "voices": voices, "default": DEFAULT_VOICE, "count": len(voices)}

        return guarded(self.config, "list_voices", body)  # type: ignore[return-value]

    def create_voice(self, input_file: str, name: str, consent: bool) -> CreateVoiceResult:
        """Make a custom voice from a recording of one speaker, to answer in by its id.

        input_file: absolute path of 1-60 s of clear speech (WAV, FLAC, MP3, ...; any rate).
        name: the voice's display name; its id is made from it ("Anna" -> "custom-anna").
        consent: true only if the speaker agreed to their voice being used this way (the service
            records the attestation with the time); without it nothing is uploaded.

        Returns status "ok" with the voice (its `id` is the voice_prompt for process_audio and
        submit_audio_job), or "error" saying why (silent or too short a recording, a taken name, ...).
        """

        def body() -> dict[str, Any]:
            if not consent:
                raise ToolError(
                    "Refused: consent must be true. Only upload a voice whose speaker agreed to it being "
                    "used to generate speech; then call create_voice again with consent=true."
                )
            data, filename = read_input(input_file, self.config.max_upload_bytes)
            voice = self.client().create_voice(data, name, consent=True, filename=filename)
            return {
                "status": "ok",
                "voice": voice,
                "message": f"Created. Pass voice_prompt='{voice['id']}' to process_audio or submit_audio_job.",
            }

        return guarded(self.config, "create_voice", body)  # type: ignore[return-value]

    def delete_voice(self, voice_id: str) -> DeleteVoiceResult:
        """Delete a custom voice (made with create_voice) for good; voices that ship with the model stay.

        Jobs already queued with it fail, saying it was deleted. Only the API key that uploaded it,
        or an admin key, may delete it.
        """

        def body() -> dict[str, Any]:
            if not voice_id.strip():  # the path would name the list of voices, not one
                raise ToolError(
                    "voice_id is empty: pass a custom voice's id from list_voices, e.g. 'custom-anna'."
                )
            answer = self.client().delete_voice(custom_voice_id(voice_id) or voice_id.strip())
            return {
                "status": "ok",
                "voice_id": answer["voice_id"],
                "deleted": bool(answer.get("deleted")),
                "message": f"Deleted {answer['voice_id']}.",
            }

        return guarded(self.config, "delete_voice", body)  # type: ignore[return-value]

    def get_prompt_examples(self) -> PromptsResult:
        """Example persona prompts (assistant, customer service, casual chat, ...) for text_prompt.

        The text prompt sets who the voice is and what it knows; write your own in the same style.
        """

        def body() -> dict[str, Any]:
            prompts = self.client().prompts()
            return {
                "status": "ok",
                "prompts": prompts,
                "default": ASSISTANT_PROMPT,
                "default_seed": DEFAULT_SEED,
            }

        return guarded(self.config, "get_prompt_examples", body)  # type: ignore[return-value]

    # -- jobs ------------------------------------------------------------------------------------

    def submit(
        self,
        input_file: str,
        voice_prompt: str,
        text_prompt: str,
        seed: int,
        output_file: str | None = None,
    ) -> tuple[dict[str, Any], Path | None]:
        """Check the voice, the input and (if given) the output path, then queue the job."""
        voice = check_voice(voice_prompt)
        data, name = read_input(input_file, self.config.max_upload_bytes)
        output = check_output(output_file) if output_file is not None else None
        submitted = self.client().submit_job(
            data, filename=name, voice_prompt=voice, text_prompt=text_prompt, seed=seed
        )
        return submitted, output

    def fetch_output(self, job: Mapping[str, Any], output: Path) -> dict[str, Any]:
        data = self.client().download_audio(job["id"])
        assert isinstance(data, bytes)
        write_output(output, data)
        return success_result(job, output)

    async def wait_for(
        self, job_id: str, ctx: Context, meter: ProgressMeter, deadline: float
    ) -> dict[str, Any]:
        """Poll until the job is final or the deadline passes, notifying progress every second.

        A few failed reads in a row (the service restarting) are waited out; more raise.
        """
        poller = self.client()
        latest: dict[str, Any] = await in_thread(poller.get_job, job_id)

        async def heartbeat() -> None:
            while True:
                progress, total = meter.update(latest)
                await ctx.report_progress(progress, total, f"Job {job_id}: {progress_message(latest)}")
                await anyio.sleep(PROGRESS_INTERVAL_S)

        failures = 0
        async with anyio.create_task_group() as group:
            group.start_soon(heartbeat)
            while latest.get("status") not in FINAL_STATUSES and time.monotonic() < deadline:
                await anyio.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0.0)))
                try:
                    latest = await in_thread(poller.get_job, job_id)
                    failures = 0
                except ClientError as exc:
                    failures += 1
                    if failures > MAX_POLL_FAILURES or (exc.status is not None and exc.status < 500):
                        raise
                    log.warning("Reading job %s failed (%s); trying again", job_id, exc)
            group.cancel_scope.cancel()
        return latest

    async def cancel_quietly(self, job_id: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                await in_thread(self.client().cancel_job, job_id)
                log.info("process_audio was cancelled by the client: cancelled job %s", job_id)
            except Exception as exc:
                log.warning("Could not cancel job %s after the call was cancelled: %s", job_id, exc)

    async def process_audio(
        self,
        input_file: str,
        output_file: str,
        ctx: Context,
        voice_prompt: str = DEFAULT_VOICE,
        text_prompt: str = ASSISTANT_PROMPT,
        seed: int = DEFAULT_SEED,
    ) -> AudioResult:
        """Answer a spoken recording with PersonaPlex and write the spoken reply as a WAV file.

        input_file: absolute path of the recording (WAV, FLAC, MP3, ...; any rate, mono or stereo).
        output_file: absolute path for the answer (24 kHz mono WAV, as long as the input); parent
            folders are created and an existing file is replaced.
        voice_prompt: one of list_voices' ids, default "NATF2.pt" ("NATF2" works too).
        text_prompt: the persona (see get_prompt_examples); default: a wise and friendly teacher.
        seed: sampling seed; the same inputs and seed give the same answer.

        Waits for the job, reporting progress, up to PERSONAPLEX_MCP_MAX_WAIT seconds (default 600).
        Returns status "success" with output_audio, generated_text, voice_used, text_prompt_used,
        job_id and duration_s; or "pending" with a job_id when the wait ran out (then use
        get_job_status and get_job_result); or "error" with what to do. Cancelling this call cancels
        the job.
        """
        started = time.monotonic()
        try:
            submitted, output = await in_thread(
                self.submit, input_file, voice_prompt, text_prompt, seed, output_file
            )
            assert output is not None
        except ToolError as exc:
            return error(str(exc))  # type: ignore[return-value]
        except ClientError as exc:
            return error(describe_client_error(exc, self.config))  # type: ignore[return-value]
        except Exception as exc:
            log.exception("process_audio failed unexpectedly")
            return error(f"process_audio failed unexpectedly: {type(exc).__name__}: {exc}")  # type: ignore[return-value]

        job_id = submitted["job_id"]
        log.info("process_audio: submitted job %s (%s)", job_id, input_file)
        try:
            meter = ProgressMeter()
            job = await self.wait_for(job_id, ctx, meter, started + self.config.max_wait_s)
            if job.get("status") not in FINAL_STATUSES:
                return pending_result(job, time.monotonic() - started)  # type: ignore[return-value]
            if job.get("status") != "succeeded":
                return error(final_job_error(job))  # type: ignore[return-value]
            result = await in_thread(self.fetch_output, job, output)
            progress, total = meter.finish(job)
            await ctx.report_progress(progress, total, f"Job {job_id}: done, the answer is written.")
            return result  # type: ignore[return-value]
        except anyio.get_cancelled_exc_class():
            await self.cancel_quietly(job_id)
            raise
        except ToolError as exc:
            return error(str(exc))  # type: ignore[return-value]
        except ClientError as exc:
            message = describe_client_error(exc, self.config)
            return error(f"{message} (job {job_id}: get_job_status tells whether it goes on)")  # type: ignore[return-value]
        except Exception as exc:
            log.exception("process_audio failed unexpectedly for job %s", job_id)
            return error(f"process_audio failed unexpectedly for job {job_id}: {type(exc).__name__}: {exc}")  # type: ignore[return-value]

    def submit_audio_job(
        self,
        input_file: str,
        voice_prompt: str = DEFAULT_VOICE,
        text_prompt: str = ASSISTANT_PROMPT,
        seed: int = DEFAULT_SEED,
    ) -> SubmitResult:
        """Queue a recording for PersonaPlex and return its job_id at once (for clients that cut long calls).

        Same arguments as process_audio, without output_file. Then poll get_job_status(job_id) every
        few seconds until it is "succeeded" and call get_job_result(job_id, output_file) to write the
        WAV, or cancel_job(job_id).
        """

        def body() -> dict[str, Any]:
            submitted, _ = self.submit(input_file, voice_prompt, text_prompt, seed)
            job = submitted.get("job") or {}
            params = job.get("params") or {}
            job_id = submitted["job_id"]
            return {
                "status": "submitted",
                "job_id": job_id,
                "job_status": submitted.get("status", "queued"),
                "voice_used": str(params.get("voice_prompt", "")),
                "text_prompt_used": str(params.get("text_prompt", "")),
                "seed": int(params.get("seed", seed)),
                "input_duration_s": job.get("input_duration_s"),
                "message": f"Queued. Poll get_job_status('{job_id}'), then call get_job_result('{job_id}', output_file).",
            }

        return guarded(self.config, "submit_audio_job", body)  # type: ignore[return-value]

    def get_job_status(self, job_id: str) -> JobStatusResult:
        """A job's state: queued, running (with progress), succeeded, failed (with the worker's reason) or cancelled.

        When it is "succeeded", call get_job_result(job_id, output_file) to write the answer.
        """

        def body() -> dict[str, Any]:
            job = self.client().get_job(job_id.strip())
            status = str(job.get("status"))
            out: dict[str, Any] = {
                "status": status,
                "job_id": job["id"],
                "progress": dict(job.get("progress") or {}),
                "percent": percent_done(job),
                "worker": job.get("worker"),
                "attempts": int(job.get("attempts") or 0),
                "input_name": str(job.get("input_name", "")),
                "input_duration_s": job.get("input_duration_s"),
                "params": dict(job.get("params") or {}),
                "created_at": float(job.get("created_at") or 0.0),
                "started_at": job.get("started_at"),
                "finished_at": job.get("finished_at"),
            }
            if status == "succeeded":
                result = job.get("result") or {}
                out["generated_text"] = str(result.get("text", ""))
                out["duration_s"] = float(result.get("duration_s") or 0.0)
                out["message"] = f"Done: call get_job_result('{job['id']}', output_file) to write the WAV."
            elif status == "failed":
                out["error"] = str(job.get("error") or "the worker gave no reason")
                out["message"] = final_job_error(job)
            elif status == "cancelled":
                out["message"] = "The job was cancelled; submit it again to get an answer."
            else:
                out["message"] = progress_message(job) + " Ask again in a few seconds."
            return out

        return guarded(self.config, "get_job_status", body)  # type: ignore[return-value]

    def get_job_result(self, job_id: str, output_file: str) -> AudioResult:
        """Write a finished job's answer to output_file (WAV, atomically, creating parent folders).

        Returns the same fields as process_audio on success; "pending" with the job's progress if it
        has not finished yet (ask again later); "error" if it failed (with the worker's reason), was
        cancelled, or its output expired.
        """

        def body() -> dict[str, Any]:
            output = check_output(output_file)
            job = self.client().get_job(job_id.strip())
            if job.get("status") not in FINAL_STATUSES:
                pending = pending_result(job, time.time() - float(job.get("created_at") or time.time()))
                pending["message"] = (
                    progress_message(job) + f" Call get_job_result('{job['id']}', ...) again later."
                )
                return pending
            if job.get("status") != "succeeded":
                raise ToolError(final_job_error(job))
            return self.fetch_output(job, output)

        return guarded(self.config, "get_job_result", body)  # type: ignore[return-value]

    def cancel_job(self, job_id: str) -> CancelResult:
        """Cancel a job: a queued one never runs; a running one stops at its next frame.

        status "cancelled" (done) or "cancel_requested" (running: it ends as cancelled within a
        frame or two; get_job_status confirms).
        """

        def body() -> dict[str, Any]:
            job = self.client().cancel_job(job_id.strip())
            status = str(job.get("status"))
            if status == "cancelled":
                return {
                    "status": "cancelled",
                    "job_id": job["id"],
                    "job_status": status,
                    "message": "Cancelled.",
                }
            return {
                "status": "cancel_requested",
                "job_id": job["id"],
                "job_status": status,
                "message": "The job stops at its next frame; get_job_status confirms it is cancelled.",
            }

        return guarded(self.config, "cancel_job", body)  # type: ignore[return-value]


READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True)

TOOLS: tuple[tuple[str, ToolAnnotations], ...] = (
    ("health_check", READ_ONLY),
    ("get_gpu_status", READ_ONLY),
    ("offload_gpu", ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True)),
    ("list_voices", READ_ONLY),
    ("get_prompt_examples", READ_ONLY),
    ("create_voice", ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False)),
    ("delete_voice", ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True)),
    ("process_audio", ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False)),
    (
        "submit_audio_job",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False),
    ),
    ("get_job_status", READ_ONLY),
    ("get_job_result", ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True)),
    ("cancel_job", ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True)),
)
"""Each tool by its method name on `Tools`, with its hints; the one place tools are registered."""


def create_server(config: McpConfig | None = None) -> MCPServer:
    """The MCP server with every tool bound to `config` (default: read from the environment)."""
    tools = Tools(config or McpConfig.from_env())
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="INFO")
    for name, hints in TOOLS:
        method = getattr(tools, name)
        server.add_tool(method, description=inspect.getdoc(method), annotations=hints)
    return server


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m personaplex.mcp_server` and the `personaplex-mcp` console script."""
    del argv  # no options: configuration comes from the environment
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = McpConfig.from_env()
    log.info("PersonaPlex MCP server for %s (max wait %g s)", config.api_url, config.max_wait_s)
    create_server(config).run("stdio")


if __name__ == "__main__":
    main()

"""What the GPU workers and the web tier tell each other: one typed definition per record.

A worker describes itself in one record (`WorkerRecord`): it answers the `gpu_status` control command
with it and, stamped with a time, writes it to Redis as its heartbeat. It answers `offload` with an
`OffloadReply` whose status is an `OffloadStatus`. The worker builds these, the web reads them (health,
GPU status, offload) and the OpenAPI document lists their values, all from the definitions here: no
torch, no Celery, nothing but the standard library and typing_extensions, so every process can import it.
"""

# No `from __future__ import annotations` here: TypedDict reads NotRequired[...] from evaluated
# annotations only (Python 3.11), and the required/optional keys are part of the contract.
import json
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, NotRequired, cast

# typing_extensions' TypedDict: the web derives its schemas from these types with pydantic, which
# reads Python 3.11's typing.TypedDict only from 3.12 on.
from typing_extensions import TypedDict


class OffloadStatus(StrEnum):
    """What a worker did with an offload request (a `str, Enum`: it is its value in JSON and text).

    Ordered by strength, so a fleet's answer is its strongest worker's: one worker that offloaded
    means memory was freed, even if others had nothing loaded.
    """

    NOT_LOADED = "not_loaded"
    """Nothing was resident: nothing to free."""
    DEFERRED = "deferred"
    """A job (or a load) holds the model: it is freed as soon as the worker is idle."""
    OFFLOADED = "offloaded"
    """The model's GPU memory was freed now."""

    @classmethod
    def strongest(cls, statuses: Iterable[object]) -> "OffloadStatus":
        """The strongest known status among `statuses` (unknown values are ignored); NOT_LOADED if none."""
        found = {s for s in statuses if isinstance(s, str)}
        present = [status for status in cls if status in found]  # members run weakest to strongest
        return present[-1] if present else cls.NOT_LOADED


class GpuMemory(TypedDict):
    """The worker's GPU and its memory, MB (zeros and no name until the engine exists)."""

    name: str | None
    memory_total: float
    memory_allocated: float
    memory_reserved: float


class PromptCacheStats(TypedDict):
    """The worker's prompt-state cache (personaplex.engine.prompt): what it holds and how it serves."""

    entries: int
    megabytes: float
    budget_megabytes: float
    """PERSONAPLEX_PROMPT_CACHE_MB."""
    hits: int
    misses: int


class WorkerRecord(TypedDict):
    """One worker as it describes itself: the `gpu_status` reply, and (with `timestamp`) its heartbeat.

    A TypedDict rather than a dataclass because the record is JSON from end to end: the worker sends it
    through Celery's control channel and Redis, the web merges a heartbeat with a fresher reply and
    adds `source`, and answers it over HTTP as it is. A dict type checks every key where it is built and
    read without a conversion at each hop, and a record from an older worker that lacks a key still
    reads (readers use `.get`).
    """

    worker: str
    """The Celery node name, e.g. gpu0@host."""
    model: str
    model_loaded: bool
    device: str | None
    """The engine's torch device (cuda:0, cpu), or the configured DEVICE before the engine exists
    (None: chosen automatically)."""
    gpu: GpuMemory
    running_job: str | None
    """The first job of its running batch."""
    progress: dict[str, Any] | None
    running_jobs: list[str]
    active_connections: int
    """How many jobs and live conversations its loop runs (the legacy server's name for it)."""
    live_sessions: int
    """Live conversations in its loop."""
    live_slots_free: int
    """Conversations it can take now (PERSONAPLEX_MAX_LIVE less those running; 0 while draining)."""
    idle_timeout: float
    idle_deadline: float | None
    last_used: float | None
    prompt_cache: PromptCacheStats
    timestamp: NotRequired[float]
    """When the heartbeat was written (unix time); not in control replies."""


class OffloadReply(TypedDict):
    """A worker's answer to `offload`."""

    status: OffloadStatus
    memory_allocated: float
    """MB still allocated on its GPU after the request."""
    worker: NotRequired[str]
    """Added by the control command (the runtime does not know its node name)."""


def gpu_available(record: WorkerRecord) -> bool:
    """Whether the worker runs on a CUDA device: what its `device` says (the engine's, once created)."""
    return str(record.get("device") or "").startswith("cuda")


def record_to_json(record: WorkerRecord) -> str:
    return json.dumps(record)


def record_from_json(text: str | bytes) -> WorkerRecord:
    """A heartbeat read back from Redis; ValueError if it is not a worker's record."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("worker"), str):
        raise ValueError(f"not a worker record: {str(text)[:80]!r}")
    return cast(WorkerRecord, data)

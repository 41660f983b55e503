"""The API's request and response types, as pydantic models: the one source of the OpenAPI schemas.

Why pydantic rather than a Flask OpenAPI integration (flask-smorest, flask-openapi3, spectree): those
own the routing and the error answers, and ours are specific (413 before the body is read, 429 with
Retry-After, 507, WebSocket routes through flask-sock). pydantic only types data: the form parser
validates with `GenerationForm`, every JSON route answers through `answer()`, which checks the body
against its model, and web/openapi.py writes each model's JSON Schema (draft 2020-12, the dialect of
OpenAPI 3.1) into the document. A field added to a route but not to its model fails that route in
the tests (views forbid undeclared keys), so the document cannot drift from the code.

Records the worker defines (`personaplex.fleet`) are typed there as TypedDicts; their models here are
derived from those types, not restated.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, TypeVar, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError
from typing_extensions import is_typeddict

from personaplex.catalog import DEFAULT_VOICE, normalize_voice_name, voice_ids
from personaplex.custom_voices import MAX_NAME_CHARS, VOICE_ID_PATTERN, is_custom_voice
from personaplex.fleet import OffloadStatus, WorkerRecord
from personaplex.jobs import JobStatus
from personaplex.params import SEED_RANGE, TEMPERATURE_RANGE, GenerationParams
from personaplex.settings import FALSE_WORDS, TRUE_WORDS

M = TypeVar("M", bound=BaseModel)

MAX_TEXT_PROMPT_CHARS = 8000
"""Longest persona prompt accepted (characters)."""

_DEFAULTS = GenerationParams()
BINARY = {"type": "string", "format": "binary"}


class Schema(BaseModel):
    """A body this API writes: every key declared (an undeclared one is a bug, caught by the tests)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)


class OpenSchema(BaseModel):
    """A body whose keys may grow: other versions' workers, an error's details, an event's fields."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


def answer(model: type[M], data: Any) -> dict[str, Any]:
    """`data` checked against `model` and made JSON-ready: what a route answers is its schema."""
    return model.model_validate(data).model_dump(mode="json", by_alias=True, exclude_unset=True)


# -- requests -------------------------------------------------------------------------------------


def _word_bool(value: Any) -> Any:
    """The words the service's settings take for true and false (1/0, true/false, yes/no, on/off)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError("must be true or false")
    return value


def _known_voice(value: str) -> str:
    """A catalog id ('NATF2', 'natf2.pt' -> 'NATF2.pt'), or a custom voice's id in lower case; whether
    that custom voice exists is checked by web.validation.parse_params, which reads Redis."""
    voice = normalize_voice_name(value)
    if voice is None and is_custom_voice(value.strip().lower()):
        voice = value.strip().lower()
    if voice is None:
        message = "Unknown voice prompt {voice}. See GET /api/voices."
        raise PydanticCustomError("unknown_voice", message, {"voice": repr(value[:64])})
    return voice


VOICE_ID_SCHEMA: dict[str, Any] = {
    "anyOf": [{"enum": voice_ids()}, {"type": "string", "pattern": VOICE_ID_PATTERN}]
}
"""A catalog id, or the form of a custom voice's id (which must also exist)."""

Temperature = Annotated[float, Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1], allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=1)]


class GenerationForm(Schema):
    """The generation parameters of a job, as form fields; a field left out (or blank) takes its default."""

    model_config = ConfigDict(extra="ignore")  # a form's other fields are not parameters

    voice_prompt: Annotated[str, AfterValidator(_known_voice), Field(json_schema_extra=VOICE_ID_SCHEMA)] = (
        _DEFAULTS.voice_prompt
    )
    """Voice id as GET /api/voices lists it: a catalog voice (e.g. 'NATF2.pt'; 'NATF2' and 'natf2'
    work too) or a custom one ('custom-<name>', POST /api/voices)."""
    text_prompt: Annotated[str, Field(max_length=MAX_TEXT_PROMPT_CHARS), AfterValidator(str.strip)] = (
        _DEFAULTS.text_prompt
    )
    """The persona: who the model is and what it knows."""
    seed: Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1])] = _DEFAULTS.seed
    """-1: random."""
    greedy: Annotated[bool, BeforeValidator(_word_bool)] = _DEFAULTS.greedy
    """Take the likeliest token instead of sampling."""
    temp_audio: Temperature = _DEFAULTS.temp_audio
    temp_text: Temperature = _DEFAULTS.temp_text
    topk_audio: TopK = _DEFAULTS.topk_audio
    topk_text: TopK = _DEFAULTS.topk_text

    def to_params(self) -> GenerationParams:
        return GenerationParams(**self.model_dump())


PARAM_FIELDS = tuple(GenerationForm.model_fields)
"""Every form field the parameters are read from."""


class JobUpload(GenerationForm):
    """POST /api/jobs and /api/offline: one input and its parameters."""

    file: Annotated[bytes, Field(json_schema_extra=BINARY)]
    """Input speech: WAV, FLAC or OGG."""


class VoiceUpload(Schema):
    """POST /api/voices: a recording of the voice, its name and the speaker's consent."""

    file: Annotated[bytes, Field(json_schema_extra=BINARY)]
    """1-60 s of speech by one speaker, any sample rate and channel count (WAV, FLAC or OGG)."""
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    """Display name; the id is made from it ('Anna (studio)' -> 'custom-anna-studio')."""
    consent: Annotated[str, Field(json_schema_extra={"enum": sorted(TRUE_WORDS)})]
    """Attests that the speaker agreed to this use of their voice; recorded with the time and the
    client's address."""


class BatchUpload(GenerationForm):
    """POST /api/batches: repeated `files` fields and/or a zip (`archive`); shared parameters, and
    `per_file` overrides."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["files"]}, {"required": ["archive"]}]}
    )

    files: Annotated[list[bytes], Field(min_length=1, json_schema_extra={"items": BINARY})] = []
    """Input audio files (repeat the field); a zip among them is expanded."""
    archive: Annotated[bytes, Field(json_schema_extra=BINARY)] = b""
    """A zip of audio files (folders allowed; no absolute paths or '..')."""
    per_file: str = ""
    """JSON object: input name (as sent, or as listed in the response) -> parameters for that file
    only, e.g. {"a.wav": {"seed": 1, "voice_prompt": "NATM1"}}."""


_PHRASES = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "string_too_long": "is too long: the limit is {max_length} characters",
}


def describe(error: ValidationError) -> tuple[str, str]:
    """(field, message) for the first problem of a form, in words a user acts on:
    "seed must be an integer, got 'many'"."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "form"
    if first["type"] == "unknown_voice":
        return field, first["msg"]
    phrase = _PHRASES.get(first["type"])
    if phrase is None:
        phrase = first["msg"].removeprefix("Value error, ")
    else:
        phrase = phrase.format(**first.get("ctx", {}))
    got = first.get("input")
    if first["type"] == "string_too_long":
        shown = f"{len(got)}"
    else:
        shown = f"{got[:64]!r}" if isinstance(got, str) else repr(got)
    return field, f"{field} {phrase}, got {shown}."


# -- responses: jobs ------------------------------------------------------------------------------


class Progress(OpenSchema):
    """{} until the worker reports its first phase."""

    phase: str | None = None
    done: int | None = None
    total: int | None = None


class JobUrls(Schema):
    self_: str = Field(alias="self")
    audio: str
    text: str
    input: str
    """The upload as it was sent."""
    events: str
    """A WebSocket."""


class Job(Schema):
    """A job record as clients see it."""

    id: str
    job_id: str
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    worker: str | None
    progress: Progress
    params: dict[str, Any]
    input_name: str
    input_duration_s: float | None
    result: dict[str, Any] | None
    """duration_s, text, frames, timings, and attempt: the attempt whose outputs it serves."""
    error: str | None
    batch_id: str | None
    owner: str | None
    """Name of the API key that made the job; null when made without keys."""
    note: str | None
    """What the service did beyond the status, e.g. queued again after its worker died."""
    urls: JobUrls


class CancelledJob(Job):
    cancel_requested: bool
    message: str | None = None
    """When the job is running: when it stops."""


class JobAccepted(Schema):
    job_id: str
    status: JobStatus
    urls: JobUrls
    job: Job


class JobList(Schema):
    jobs: list[Job]
    count: int


class TextOutput(Schema):
    job_id: str
    text: str
    frames: list[str]
    """Per output frame: its text piece, or a marker (PAD, EPAD)."""
    tokens: list[list[int]]
    """Per output frame: the text token, then the 8 audio codes."""
    duration_s: float
    sample_rate: int
    timings: dict[str, float | bool]
    """Seconds per phase, and prompt_cached: whether the prompt state came from the worker's cache."""


# -- responses: batches ---------------------------------------------------------------------------

EXPIRED = "expired"
"""A batch entry's status once its job record is gone (retention ended)."""

BatchEntryStatus = StrEnum("BatchEntryStatus", {s.name: s.value for s in JobStatus} | {"EXPIRED": EXPIRED})


class BatchUrls(Schema):
    self_: str = Field(alias="self")
    archive: str


class BatchInputAccepted(Schema):
    name: str
    """Sanitized, unique in the batch."""
    filename: str
    """The name it was sent under."""
    job_id: str


class BatchAccepted(Schema):
    batch_id: str
    count: int
    jobs: dict[str, str]
    """Input name -> job id."""
    inputs: list[BatchInputAccepted]
    """In the order the files were sent (zip members in archive order)."""
    urls: BatchUrls


class BatchEntry(Schema):
    name: str
    output: str
    """Stem of its files in the archive."""
    job_id: str
    status: BatchEntryStatus
    progress: Progress
    error: str | None
    worker: str | None = None
    attempts: int | None = None
    input_duration_s: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    urls: JobUrls | None = None
    """Absent once the job has expired."""


class Batch(Schema):
    batch_id: str
    created_at: float
    total: int
    finished: bool
    """No job is queued or running."""
    counts: dict[BatchEntryStatus, int]
    jobs: list[BatchEntry]
    urls: BatchUrls
    cancelled: int | None = None
    """DELETE only: jobs cancelled now."""
    cancel_requested: int | None = None
    """DELETE only: running jobs asked to stop."""


# -- responses: the fleet ------------------------------------------------------------------------


class WorkerSource(StrEnum):
    HEARTBEAT = "heartbeat"
    """Read from the worker's last heartbeat in Redis."""
    LIVE = "live"
    """Its answer to this request's control broadcast."""


def _lenient(record: type, name: str | None = None, **required: Any) -> type[BaseModel]:
    """A model of a TypedDict with every key optional (nested TypedDicts too), but `required`: a view
    may leave keys out (a client key does not see job ids; an older worker's record lacks newer keys,
    a newer one has more)."""
    fields: dict[str, Any] = {}
    for key, hint in get_type_hints(record).items():
        fields[key] = ((_lenient(hint) if is_typeddict(hint) else hint) | None, None)
    return create_model(
        name or record.__name__, __base__=OpenSchema, __doc__=record.__doc__, **{**fields, **required}
    )


Worker = _lenient(WorkerRecord, "Worker", worker=(str, ...), source=(WorkerSource, ...))
"""One GPU worker: its heartbeat, overlaid by a fresh control reply when one came."""


class Gpu(Schema):
    name: str | None
    """The workers' GPU names, comma separated; null when none has one."""
    memory_total: float
    """MB, summed over the workers."""
    memory_allocated: float
    memory_reserved: float


class GpuStatus(Schema):
    """The legacy server's single-GPU fields, computed over the fleet."""

    model_loaded: bool
    active_connections: int
    """Running jobs and live conversations, summed over workers."""
    live_sessions: int
    """Live conversations, summed over workers."""
    idle_timeout: float
    gpu: Gpu
    worker_count: int
    workers: list[Worker]  # type: ignore[valid-type]


class OffloadReply(OpenSchema):
    worker: str
    status: OffloadStatus | None = None
    memory_allocated: float | None = None


class OffloadResult(Schema):
    status: OffloadStatus
    """The strongest of the workers' answers."""
    memory_allocated: float
    """MB still allocated, summed over the workers."""
    workers: list[OffloadReply]


# -- responses: the catalog and the service -------------------------------------------------------


class Voice(Schema):
    id: Annotated[str, Field(json_schema_extra=VOICE_ID_SCHEMA)]
    """Pass it as voice_prompt: the legacy server's id for a catalog voice ('NATF2.pt'), or a custom
    voice's ('custom-anna')."""
    name: Annotated[str, Field(examples=["Natural Female 2"], max_length=MAX_NAME_CHARS)]
    category: Annotated[str, Field(json_schema_extra={"enum": ["natural", "variety", "custom"]})]
    filename: str
    """The same as id (kept for older clients)."""
    custom: bool
    """Uploaded through POST /api/voices (false: it ships with the model)."""
    created_at: float | None = None
    """Custom voices: when it was uploaded (Unix time)."""
    duration_s: float | None = None
    """Custom voices: the recording's length."""


class VoiceConsent(Schema):
    at: float
    """When the uploader attested the speaker's consent (Unix time)."""
    address: str | None = None
    """The client address it came from; shown to admin keys and the voice's uploader only."""


class CustomVoice(Voice):
    """A custom voice, as POST /api/voices answers it and GET /api/voices/{voice_id} reads it."""

    loudness_lufs: float
    """The recording's integrated loudness (it is normalised to -24 LUFS before use)."""
    consent: VoiceConsent


class VoiceList(Schema):
    voices: list[Voice]
    """The catalog first, then the custom voices, oldest first."""
    default: Annotated[str, Field(json_schema_extra={"const": DEFAULT_VOICE})]
    count: int


class VoiceDeleted(Schema):
    voice_id: str
    deleted: Annotated[bool, Field(json_schema_extra={"const": True})]


class PromptExample(Schema):
    id: str
    name: str
    text: str


class PromptList(Schema):
    prompts: list[PromptExample]
    default: str
    default_seed: int


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    """Redis answers but no worker is alive."""
    UNHEALTHY = "unhealthy"
    """Redis is unreachable."""


class Health(Schema):
    status: HealthStatus
    gpu_available: bool
    model_loaded: bool
    timestamp: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    redis: str
    workers: int
    queue_length: int | None
    live_slots_free: int
    """Live conversations the fleet can take now (PERSONAPLEX_MAX_LIVE per worker less those running)."""
    live_waiting: int | None
    """Conversations waiting for a free live slot."""
    detail: str | None = None
    error: str | None = None


class Error(OpenSchema):
    """Every 4xx and 5xx body: `error` says what went wrong and what to do; some add details."""

    error: str
    field: str | None = None
    """The request field at fault, where one is ('file', 'voice_prompt', ...)."""


class EventType(StrEnum):
    STATE = "state"
    """Sent first: the job as it is now."""
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ERROR = "error"
    """The socket's own trouble (e.g. Redis lost); it closes after."""


class Event(OpenSchema):
    """One WebSocket message of a job's event stream."""

    type: EventType
    job_id: str | None = None
    status: str | None = None
    job: Job | None = None
    """The "state" message only."""


RESPONSES: tuple[type[BaseModel], ...] = (
    Error,
    Job,
    CancelledJob,
    JobAccepted,
    JobList,
    TextOutput,
    BatchAccepted,
    Batch,
    GpuStatus,
    OffloadResult,
    VoiceList,
    CustomVoice,
    VoiceDeleted,
    PromptList,
    Health,
    Event,
)
"""Every body the document describes (models they nest come along)."""

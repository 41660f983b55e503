"""GET /openapi.json: an OpenAPI 3.1 description of the API, checked against the routes by a test.

Values that have a home elsewhere are read from it, so the document cannot drift from the code: the
parameter defaults from `GenerationParams`, the environment variables from `Settings`, the limits from
the modules that enforce them, and the enums from `JobStatus` and `OffloadStatus`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from flask import Blueprint, Response, jsonify

from personaplex import __version__
from personaplex.catalog import DEFAULT_VOICE, voice_ids
from personaplex.fleet import OffloadStatus
from personaplex.jobs import JobStatus
from personaplex.params import GenerationParams
from personaplex.settings import Settings
from web.api_batches import MAX_BATCH_FILES
from web.api_jobs import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from web.services import services
from web.validation import MAX_TEXT_PROMPT_CHARS

bp = Blueprint("openapi", __name__)

JSON = "application/json"

PARAM_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(GenerationParams)}
"""Each generation parameter's default, as a job gets it when the form leaves the field out."""

ENV: dict[str, str] = {f.name: f.metadata["env"] for f in fields(Settings)}
"""Each setting's environment variable, by field name."""


def _param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A generation parameter's form field: `schema` with the parameter's default."""
    return {**schema, "default": PARAM_DEFAULTS[name]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _wav(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}},
    }


JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    "description": "The job id (32 lower-case hex digits); anything else is 404.",
}

UPLOAD_FIELDS: dict[str, Any] = {
    "file": {"type": "string", "format": "binary", "description": "Input speech: WAV, FLAC or OGG."},
    "voice_prompt": _param(
        "voice_prompt",
        {
            "type": "string",
            "enum": voice_ids(),
            "description": "Voice id as GET /api/voices lists it (e.g. 'NATF2.pt'); 'NATF2' and 'natf2' work too.",
        },
    ),
    "text_prompt": _param("text_prompt", {"type": "string", "maxLength": MAX_TEXT_PROMPT_CHARS}),
    "seed": _param("seed", {"type": "integer", "minimum": -1, "description": "-1: random."}),
    "greedy": _param("greedy", {"type": "boolean"}),
    "temp_audio": _param("temp_audio", {"type": "number", "minimum": 0, "maximum": 10}),
    "temp_text": _param("temp_text", {"type": "number", "minimum": 0, "maximum": 10}),
    "topk_audio": _param("topk_audio", {"type": "integer", "minimum": 1}),
    "topk_text": _param("topk_text", {"type": "integer", "minimum": 1}),
}

UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": UPLOAD_FIELDS}
        }
    },
}

BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    "description": "The batch id (32 lower-case hex digits); anything else is 404.",
}

BATCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "anyOf": [{"required": ["files"]}, {"required": ["archive"]}],
                "properties": {
                    "files": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "format": "binary"},
                        "description": "Input audio files (repeat the field); a zip among them is expanded.",
                    },
                    "archive": {
                        "type": "string",
                        "format": "binary",
                        "description": "A zip of audio files (folders allowed; no absolute paths or '..').",
                    },
                    "per_file": {
                        "type": "string",
                        "description": "JSON object: input name (as sent, or as listed in the response) -> "
                        'parameters for that file only, e.g. {"a.wav": {"seed": 1, "voice_prompt": "NATM1"}}.',
                    },
                    **{k: v for k, v in UPLOAD_FIELDS.items() if k != "file"},
                },
            },
            "encoding": {"files": {"contentType": "application/octet-stream"}},
        }
    },
}

SUBMIT_ERRORS = {
    "400": _error(
        "Bad input: not audio, empty, truncated, too long, over the decode budget, NaN or infinite "
        "samples, unknown voice, bad seed or parameter."
    ),
    "401": _error("Missing or wrong API key."),
    "413": _error(f"Upload larger than {ENV['max_upload_mb']}."),
    "429": _error("The queue is full; see the Retry-After header."),
    "503": _error("Redis or the broker is unreachable."),
    "507": _error("No room to store the upload: the data directory is full or Redis is out of memory."),
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "additionalProperties": True,
    },
    "Progress": {
        "type": "object",
        "properties": {
            "phase": {"type": "string"},
            "done": {"type": "integer"},
            "total": {"type": "integer"},
        },
    },
    "Job": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "job_id": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in JobStatus]},
            "created_at": {"type": "number"},
            "started_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]},
            "attempts": {"type": "integer"},
            "worker": {"type": ["string", "null"]},
            "progress": _ref("Progress"),
            "params": {"type": "object"},
            "input_name": {"type": "string"},
            "input_duration_s": {"type": ["number", "null"]},
            "result": {
                "type": ["object", "null"],
                "description": "duration_s, text, frames, timings, and attempt: the attempt whose outputs it serves",
            },
            "error": {"type": ["string", "null"]},
            "batch_id": {"type": ["string", "null"]},
            "note": {
                "type": ["string", "null"],
                "description": "What the service did beyond the status, e.g. queued again after its worker died.",
            },
            "owner": {
                "type": ["string", "null"],
                "description": "Name of the API key that made the job; null when made without keys.",
            },
            "urls": _ref("JobUrls"),
        },
    },
    "JobUrls": {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("self", "audio", "text", "events")},
    },
    "JobAccepted": {
        "type": "object",
        "properties": {
            "job_id": {"type": "string"},
            "status": {"type": "string"},
            "urls": _ref("JobUrls"),
            "job": _ref("Job"),
        },
    },
    "JobList": {
        "type": "object",
        "properties": {"jobs": {"type": "array", "items": _ref("Job")}, "count": {"type": "integer"}},
    },
    "BatchAccepted": {
        "type": "object",
        "properties": {
            "batch_id": {"type": "string"},
            "count": {"type": "integer"},
            "jobs": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Input name -> job id.",
            },
            "inputs": {
                "type": "array",
                "description": "In the order the files were sent (zip members in archive order).",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "description": "Sanitized, unique in the batch."},
                        "filename": {"type": "string", "description": "The name it was sent under."},
                        "job_id": {"type": "string"},
                    },
                },
            },
            "urls": _ref("BatchUrls"),
        },
    },
    "BatchUrls": {
        "type": "object",
        "properties": {k: {"type": "string"} for k in ("self", "archive")},
    },
    "BatchJob": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "output": {"type": "string", "description": "Stem of its files in the archive."},
            "job_id": {"type": "string"},
            "status": {"type": "string", "enum": [*(s.value for s in JobStatus), "expired"]},
            "progress": _ref("Progress"),
            "error": {"type": ["string", "null"]},
            "worker": {"type": ["string", "null"]},
            "attempts": {"type": "integer"},
            "input_duration_s": {"type": ["number", "null"]},
            "started_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]},
            "urls": _ref("JobUrls"),
        },
    },
    "Batch": {
        "type": "object",
        "properties": {
            "batch_id": {"type": "string"},
            "created_at": {"type": "number"},
            "total": {"type": "integer"},
            "finished": {"type": "boolean", "description": "No job is queued or running."},
            "counts": {
                "type": "object",
                "properties": {s: {"type": "integer"} for s in [*(s.value for s in JobStatus), "expired"]},
            },
            "jobs": {"type": "array", "items": _ref("BatchJob")},
            "urls": _ref("BatchUrls"),
            "cancelled": {"type": "integer", "description": "DELETE only: jobs cancelled now."},
            "cancel_requested": {"type": "integer", "description": "DELETE only: running jobs stopping."},
        },
    },
    "TextOutput": {
        "type": "object",
        "properties": {
            "job_id": {"type": "string"},
            "text": {"type": "string"},
            "frames": {"type": "array", "items": {"type": "string"}},
            "tokens": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            "duration_s": {"type": "number"},
            "sample_rate": {"type": "integer"},
            "timings": {"type": "object"},
        },
    },
    "Gpu": {
        "type": "object",
        "properties": {
            "name": {"type": ["string", "null"]},
            **{
                f: {"type": "number", "description": "MB"}
                for f in ("memory_total", "memory_allocated", "memory_reserved")
            },
        },
    },
    "Worker": {
        "type": "object",
        "properties": {
            "worker": {"type": "string"},
            "model": {"type": "string", "description": "The model it serves (HF repo id or checkpoint)."},
            "model_loaded": {"type": "boolean"},
            "device": {"type": ["string", "null"]},
            "gpu": _ref("Gpu"),
            "running_job": {
                "type": ["string", "null"],
                "description": "The first job of its batch still running.",
            },
            "running_jobs": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Every job of its batch.",
            },
            "active_connections": {"type": "integer", "description": "Running jobs (its batch's size)."},
            "progress": {"type": ["object", "null"]},
            "idle_timeout": {"type": "number"},
            "idle_deadline": {"type": ["number", "null"]},
            "last_used": {"type": ["number", "null"]},
            "timestamp": {"type": "number", "description": "When its heartbeat was written."},
            "source": {"type": "string", "enum": ["heartbeat", "live"]},
        },
    },
    "GpuStatus": {
        "type": "object",
        "properties": {
            "model_loaded": {"type": "boolean"},
            "active_connections": {"type": "integer", "description": "Running jobs, summed over workers."},
            "idle_timeout": {"type": "number"},
            "gpu": _ref("Gpu"),
            "worker_count": {"type": "integer"},
            "workers": {"type": "array", "items": _ref("Worker")},
        },
    },
    "OffloadResult": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": [s.value for s in reversed(OffloadStatus)]},
            "memory_allocated": {"type": "number"},
            "workers": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Voice": {
        "type": "object",
        "required": ["id", "name", "category", "filename"],
        "properties": {
            "id": {
                "type": "string",
                "enum": voice_ids(),
                "description": "The legacy server's id, e.g. 'NATF2.pt'; pass it as voice_prompt.",
            },
            "name": {"type": "string", "examples": ["Natural Female 2"]},
            "category": {"type": "string", "enum": ["natural", "variety"]},
            "filename": {"type": "string", "description": "The same as id (kept for older clients)."},
        },
    },
    "VoiceList": {
        "type": "object",
        "properties": {
            "voices": {"type": "array", "items": _ref("Voice")},
            "default": {"type": "string", "const": DEFAULT_VOICE},
            "count": {"type": "integer"},
        },
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
            "gpu_available": {"type": "boolean"},
            "model_loaded": {"type": "boolean"},
            "timestamp": {"type": "string", "format": "date-time"},
            "redis": {"type": "string"},
            "workers": {"type": "integer"},
            "queue_length": {"type": ["integer", "null"]},
        },
    },
    "Event": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {
                "type": "string",
                "enum": [
                    "state",
                    "queued",
                    "started",
                    "progress",
                    "succeeded",
                    "failed",
                    "cancelled",
                    "error",
                ],
            },
            "job_id": {"type": "string"},
            "status": {"type": "string"},
        },
        "additionalProperties": True,
    },
}


def _paths() -> dict[str, Any]:
    job_ops = {"parameters": [JOB_ID]}
    return {
        "/health": {
            "get": {
                "summary": "Service health",
                "security": [],
                "tags": ["service"],
                "responses": {
                    "200": _json(_ref("Health"), "Redis reachable ('degraded' when no worker is alive)."),
                    "503": _json(_ref("Health"), "Redis unreachable (answered within 2 s)."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "tags": ["service"],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")},
            }
        },
        "/api/voices": {
            "get": {
                "summary": "The 18 voices",
                "tags": ["catalog"],
                "responses": {"200": _json(_ref("VoiceList"), "Voices and the default.")},
            }
        },
        "/api/prompts": {
            "get": {
                "summary": "Example persona prompts",
                "tags": ["catalog"],
                "responses": {"200": _json({"type": "object"}, "Prompts and defaults.")},
            }
        },
        "/api/gpu/status": {
            "get": {
                "summary": "GPU fleet status",
                "tags": ["gpu"],
                "responses": {"200": _json(_ref("GpuStatus"), "Fleet and per-worker view.")},
            }
        },
        "/api/gpu/offload": {
            "post": {
                "summary": "Free GPU memory now (or after the running job)",
                "tags": ["gpu"],
                "parameters": [
                    {
                        "name": "worker",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Only this worker (Celery node name); default all.",
                    }
                ],
                "responses": {
                    "200": _json(_ref("OffloadResult"), "What the workers did."),
                    "403": _error("A client key: offloading acts on the fleet and takes an admin key."),
                    "404": _error("The named worker did not answer."),
                },
            }
        },
        "/api/jobs": {
            "post": {
                "summary": "Submit a job",
                "tags": ["jobs"],
                "requestBody": UPLOAD_BODY,
                "responses": {"202": _json(_ref("JobAccepted"), "Queued; see Location."), **SUBMIT_ERRORS},
            },
            "get": {
                "summary": "Recent jobs, newest first",
                "tags": ["jobs"],
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIST_LIMIT,
                            "default": DEFAULT_LIST_LIMIT,
                        },
                    },
                ],
                "responses": {"200": _json(_ref("JobList"), "Jobs."), "400": _error("Bad filter.")},
            },
        },
        "/api/jobs/{job_id}": {
            **job_ops,
            "get": {
                "summary": "A job record",
                "tags": ["jobs"],
                "responses": {
                    "200": _json(_ref("Job"), "The job."),
                    "404": _error("Unknown job, or another client's."),
                },
            },
            "delete": {
                "summary": "Cancel a queued or running job",
                "tags": ["jobs"],
                "responses": {
                    "200": _json(_ref("Job"), "Was queued: cancelled now."),
                    "202": _json(_ref("Job"), "Is running: stops at its next frame."),
                    "404": _error("Unknown job, or another client's."),
                    "409": _error("Already final."),
                },
            },
        },
        "/api/jobs/{job_id}/audio": {
            **job_ops,
            "get": {
                "summary": "Output WAV",
                "tags": ["jobs"],
                "responses": {
                    "200": _wav("24 kHz mono WAV."),
                    "404": _error("Unknown job, or another client's."),
                    "409": _error("Not succeeded."),
                    "410": _error("Output deleted."),
                },
            },
        },
        "/api/jobs/{job_id}/text": {
            **job_ops,
            "get": {
                "summary": "Output text",
                "tags": ["jobs"],
                "responses": {
                    "200": _json(_ref("TextOutput"), "Text, per-frame pieces, tokens, timings."),
                    "404": _error("Unknown job, or another client's."),
                    "409": _error("Not succeeded."),
                    "410": _error("Output deleted."),
                },
            },
        },
        "/api/jobs/{job_id}/events": {
            **job_ops,
            "get": {
                "summary": "WebSocket of job events",
                "description": "Upgrade to a WebSocket. The server sends the job's state at once "
                '({"type": "state"}), then JSON events (queued, started, progress, succeeded, '
                "failed, cancelled) until a final one, then closes. Browsers may pass the API key "
                "as ?access_token=.",
                "tags": ["jobs"],
                "responses": {
                    "101": {
                        "description": "Switching protocols; messages follow the Event schema.",
                        "content": {JSON: {"schema": _ref("Event")}},
                    },
                    "400": _error("Not a WebSocket upgrade (a plain HTTP request)"),
                },
            },
        },
        "/api/batches": {
            "post": {
                "summary": "Submit many inputs at once",
                "description": "Repeated `files` fields and/or a zip (`archive`). Shared parameters are "
                "form fields; `per_file` overrides them per input. Every input is validated before "
                "any is queued: one bad file answers 400 naming it and nothing is queued. At most "
                f"{MAX_BATCH_FILES} inputs; a zip's expanded size counts against {ENV['max_upload_mb']}.",
                "tags": ["batches"],
                "requestBody": BATCH_BODY,
                "responses": {
                    "202": _json(_ref("BatchAccepted"), "Queued; see Location."),
                    **SUBMIT_ERRORS,
                    "400": _error(
                        "A bad file, zip member (absolute path, '..', link, not audio) or parameter; "
                        "`file` names it."
                    ),
                },
            }
        },
        "/api/batches/{batch_id}": {
            "parameters": [BATCH_ID],
            "get": {
                "summary": "Counts by state and each job's status",
                "tags": ["batches"],
                "responses": {
                    "200": _json(_ref("Batch"), "The batch."),
                    "404": _error("Unknown batch, or another client's."),
                },
            },
            "delete": {
                "summary": "Cancel every job of the batch that has not finished",
                "tags": ["batches"],
                "responses": {
                    "200": _json(_ref("Batch"), "Queued jobs cancelled."),
                    "202": _json(_ref("Batch"), "Some jobs were running: they stop at their next frame."),
                    "404": _error("Unknown batch, or another client's."),
                    "409": _error("Every job is already final."),
                },
            },
        },
        "/api/batches/{batch_id}/archive": {
            "parameters": [BATCH_ID],
            "get": {
                "summary": "Zip of the outputs",
                "description": "Once no job is queued or running: `<stem>.wav` and `<stem>.json` per input "
                "that succeeded (stems from the input names, made unique with -2, -3...), and "
                "`_batch.json` listing every input with its status, files or error.",
                "tags": ["batches"],
                "responses": {
                    "200": {
                        "description": "The zip, streamed.",
                        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                        "headers": {
                            "X-Missing-Outputs": {
                                "schema": {"type": "integer"},
                                "description": "Inputs without outputs (failed, cancelled, expired).",
                            }
                        },
                    },
                    "404": _error("Unknown batch, or another client's."),
                    "409": _error("Some jobs are still queued or running; the body has `counts`."),
                },
            },
        },
        "/api/offline": {
            "post": {
                "summary": "Seed-compatible synchronous call",
                "tags": ["jobs"],
                "requestBody": UPLOAD_BODY,
                "description": f"Queues a job and waits up to {ENV['offline_timeout']} seconds.",
                "responses": {
                    "200": {
                        **_wav("The output WAV."),
                        "headers": {
                            "X-Text-Output": {
                                "schema": {"type": "string"},
                                "description": "JSON array of the generated text pieces (ASCII-escaped).",
                            },
                            "X-Job-Id": {"schema": {"type": "string"}},
                        },
                    },
                    **SUBMIT_ERRORS,
                    "409": _error("The job was cancelled."),
                    "500": _error("Processing failed."),
                    "504": _error("Still running when the wait ran out; the body has job_id and urls."),
                },
            }
        },
    }


def _with_key_errors(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation that needs a key also answers 401 without one (or with a wrong one)."""
    for path in paths.values():
        for method, operation in path.items():
            if method != "parameters" and operation.get("security") != []:
                operation["responses"].setdefault("401", _error("No API key, or not one of this server's"))
    return paths


def build_document(keys_required: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `keys_required`: whether this server asks /api calls for a key."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "PersonaPlex Queue",
            "version": __version__,
            "description": "Offline PersonaPlex speech-to-speech as a queued service.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}] if keys_required else [],
        "paths": _with_key_errors(_paths()) if keys_required else _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        f"Needed on /api routes when any key is set ({ENV['api_key']}, "
                        f"{ENV['api_keys']}, {ENV['admin_keys']}). A client key sees only its own "
                        "jobs and batches (another's id answers 404, like an unknown one); an admin key "
                        "sees all and may offload."
                    ),
                }
            },
        },
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_document(services().settings.has_keys))

"""GET /openapi.json: an OpenAPI 3.1 description of the API, checked against the routes by a test
and against the live server by schemathesis (tests/test_openapi.py).

The paths are written here; every request and response body is a pydantic model of web/schemas.py,
the same model the route validates with or answers through, so the document cannot drift from the
code. The environment variables come from `Settings` and the limits from the modules that enforce them.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic.json_schema import models_json_schema

from personaplex import __version__
from personaplex.jobs import JobStatus
from personaplex.settings import Settings
from web.api_batches import MAX_BATCH_FILES
from web.api_jobs import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from web.schemas import RESPONSES, VOICE_ID_SCHEMA, BatchUpload, JobUpload, VoiceUpload
from web.services import services

bp = Blueprint("openapi", __name__)

JSON = "application/json"

ENV: dict[str, str] = {f.name: f.metadata["env"] for f in fields(Settings)}
"""Each setting's environment variable, by field name."""


REF_TEMPLATE = "#/components/schemas/{model}"


CHAT_DESCRIPTION = (
    "Upgrade to a WebSocket. Every message is binary, its first byte its kind: 0x00 handshake "
    "(server to client, once the voice and text prompts are done: then send audio), 0x01 audio "
    "(both ways: Ogg Opus pages at 24 kHz, or with codec=pcm 16-bit little-endian mono PCM at "
    "24 kHz of any length), 0x02 text (UTF-8 piece of each generated text token that is not "
    "padding), 0x04 metadata (JSON: session_id, queue_position while it waits for a free live "
    f"slot, then worker), 0x05 error (UTF-8, followed by a close). A conversation waits at most "
    f"{ENV['live_wait_s']} for a slot ({ENV['max_live']} per worker), then gets 0x05 and close 1013; "
    f"it lasts at most {ENV['max_live_seconds']} (0x05, close 1000). Close codes: 1000 ended, 1007 "
    "audio that does not decode, 1008 bad parameters, 1009 a message over 256 kB, 1011 the "
    "worker failed or died, 1012 the server or worker restarts. Text messages and unknown kinds "
    "are ignored. The API key goes in the Authorization header or ?access_token=."
)
CHAT_IGNORED = ("pad_mult", "text_seed", "audio_seed", "repetition_penalty_context", "repetition_penalty")
"""What the reference's client sends and PersonaPlex's sampling does not use: accepted, ignored."""


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


CHAT_PARAMETERS = [
    _query(
        "voice_prompt",
        {"type": "string"},
        "Voice id as GET /api/voices lists it, catalog or custom (default NATF2.pt).",
    ),
    _query("text_prompt", {"type": "string"}, "The persona; empty: none."),
    _query("seed", {"type": "integer"}, "-1: random."),
    _query("greedy", {"type": "boolean"}, "Our extension: take the likeliest tokens."),
    _query("text_temperature", {"type": "number"}, "As a job's temp_text."),
    _query("text_topk", {"type": "integer"}, "As a job's topk_text."),
    _query("audio_temperature", {"type": "number"}, "As a job's temp_audio."),
    _query("audio_topk", {"type": "integer"}, "As a job's topk_audio."),
    _query("codec", {"type": "string", "enum": ["opus", "pcm"], "default": "opus"}, "Our extension."),
    _query("access_token", {"type": "string"}, "The API key, where a client cannot set headers."),
    *(_query(name, {"type": "string"}, "Sent by the reference's client; ignored.") for name in CHAT_IGNORED),
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


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

VOICE_ID = {
    "name": "voice_id",
    "in": "path",
    "required": True,
    "schema": VOICE_ID_SCHEMA,
    "description": "A catalog id ('NATF2.pt'; 'NATF2' works too) or a custom voice's ('custom-anna').",
}

UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": _ref(JobUpload.__name__)}},
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
            "schema": _ref(BatchUpload.__name__),
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


def component_schemas() -> dict[str, Any]:
    """Every body's JSON Schema, written by pydantic from the models in web/schemas.py: the forms as
    they are validated, the responses as they are written (nested models become components too)."""
    models = [(m, "validation") for m in (JobUpload, BatchUpload, VoiceUpload)]
    models += [(m, "serialization") for m in RESPONSES]
    _, document = models_json_schema(models, ref_template=REF_TEMPLATE)
    return document["$defs"]


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
                "summary": "The 18 catalog voices and the custom ones",
                "tags": ["voices"],
                "responses": {"200": _json(_ref("VoiceList"), "Voices and the default.")},
            },
            "post": {
                "summary": "Upload a custom voice",
                "tags": ["voices"],
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _ref(VoiceUpload.__name__)}},
                },
                "responses": {
                    "201": _json(_ref("CustomVoice"), "Stored; use its id as voice_prompt."),
                    "400": _error(
                        "Bad recording (not audio, under 1 s or over 60 s, silent, NaN or infinite "
                        "samples), a bad name, or no consent; `field` names which."
                    ),
                    "401": _error("Missing or wrong API key."),
                    "409": _error("The name (or the id made from it) is taken."),
                    "413": _error(f"Upload larger than {ENV['max_upload_mb']}."),
                    "503": _error("Redis is unreachable."),
                },
            },
        },
        "/api/voices/{voice_id}": {
            "parameters": [VOICE_ID],
            "get": {
                "summary": "One voice",
                "tags": ["voices"],
                "responses": {
                    "200": _json({"anyOf": [_ref("Voice"), _ref("CustomVoice")]}, "The voice."),
                    "400": _error("Not a voice id: ids are catalog ids or 'custom-' and a slug."),
                    "404": _error("No such custom voice."),
                },
            },
            "delete": {
                "summary": "Delete a custom voice",
                "description": "Jobs already queued with it fail with a reason that says so.",
                "tags": ["voices"],
                "responses": {
                    "200": _json(_ref("VoiceDeleted"), "Deleted: its recording and codes are gone."),
                    "400": _error("Not a voice id."),
                    "403": _error(
                        "A catalog voice (it ships with the model), or uploaded with another client key."
                    ),
                    "404": _error("No such custom voice."),
                },
            },
        },
        "/api/prompts": {
            "get": {
                "summary": "Example persona prompts",
                "tags": ["catalog"],
                "responses": {"200": _json(_ref("PromptList"), "Prompts and defaults.")},
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
                    "200": _json(_ref("CancelledJob"), "Was queued: cancelled now."),
                    "202": _json(_ref("CancelledJob"), "Is running: stops at its next frame."),
                    "404": _error("Unknown job, or another client's."),
                    "409": _error("Already final."),
                },
            },
        },
        "/api/jobs/{job_id}/input": {
            **job_ops,
            "get": {
                "summary": "The uploaded input, as it was sent",
                "tags": ["jobs"],
                "responses": {
                    "200": {
                        "description": "The upload's bytes; the type from its name (audio/wav, audio/flac, ...).",
                        "content": {
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    "404": _error("Unknown job, or another client's."),
                    "410": _error("Gone: the job's retention ended."),
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
        "/api/chat": {
            "get": {
                "summary": "WebSocket: a live full-duplex conversation (the reference's protocol)",
                "description": CHAT_DESCRIPTION,
                "tags": ["live"],
                "parameters": CHAT_PARAMETERS,
                "responses": {
                    "101": {"description": "Switching protocols; binary messages as described."},
                    "400": _error("Not a WebSocket upgrade (a plain HTTP request)"),
                },
            }
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
            "schemas": component_schemas(),
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

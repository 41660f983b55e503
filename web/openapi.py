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
from web.schemas import RESPONSES, BatchUpload, JobUpload
from web.services import services

bp = Blueprint("openapi", __name__)

JSON = "application/json"

ENV: dict[str, str] = {f.name: f.metadata["env"] for f in fields(Settings)}
"""Each setting's environment variable, by field name."""


REF_TEMPLATE = "#/components/schemas/{model}"


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
    models = [(m, "validation") for m in (JobUpload, BatchUpload)]
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
                "summary": "The 18 voices",
                "tags": ["catalog"],
                "responses": {"200": _json(_ref("VoiceList"), "Voices and the default.")},
            }
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

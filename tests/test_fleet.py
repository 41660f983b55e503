"""The records web and workers exchange (personaplex.fleet) and the line between the two processes.

No Redis, no worker process: the records are checked where they are built (WorkerRuntime), where
they are documented (the OpenAPI document), and the web app is imported in a fresh interpreter to
see that it loads none of the worker's machinery.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from fixtures import REPO_ROOT

from personaplex.fleet import (
    OffloadReply,
    OffloadStatus,
    WorkerRecord,
    gpu_available,
    record_from_json,
    record_to_json,
)
from personaplex.params import GenerationParams
from personaplex.settings import Settings
from web.openapi import component_schemas
from worker.runtime import WorkerRuntime

WORKER_ONLY_MODULES = ("worker.tasks", "worker.runner", "worker.runtime", "worker.commands", "torch")

WEB_IMPORTS = """
import json, sys
from personaplex.settings import Settings
from web import create_app
from web.services import celery_producer

create_app({}, environ={})
producer = celery_producer(Settings.from_env({}))
producer.conf.broker_url, producer.control  # configure the producer as a first send would
print(json.dumps(sorted(sys.modules)))
"""


def test_the_web_app_imports_none_of_the_worker_machinery() -> None:
    """The web sends tasks and control commands by name: the task, its runner, the runtime, the
    control commands and torch stay out of the web process."""
    out = subprocess.run(
        [sys.executable, "-c", WEB_IMPORTS], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert "worker.control" in loaded  # what the web does use
    assert not loaded & set(WORKER_ONLY_MODULES)


def test_offload_status_of_a_fleet_is_its_strongest() -> None:
    assert OffloadStatus.strongest([]) is OffloadStatus.NOT_LOADED
    assert OffloadStatus.strongest(["not_loaded", "offloaded", "deferred"]) is OffloadStatus.OFFLOADED
    assert OffloadStatus.strongest(["deferred", None, "unknown"]) is OffloadStatus.DEFERRED
    assert json.dumps({"status": OffloadStatus.DEFERRED}) == '{"status": "deferred"}'
    assert f"{OffloadStatus.OFFLOADED}" == "offloaded"


@pytest.fixture
def runtime(tmp_path: Path) -> WorkerRuntime:
    return WorkerRuntime(Settings.from_env({}, data_dir=tmp_path, device="cpu"))


def test_the_worker_builds_every_field_of_its_record(runtime: WorkerRuntime) -> None:
    record = runtime.status("gpu0@host")
    assert set(record) == WorkerRecord.__required_keys__
    assert set(record["gpu"]) == {"name", "memory_total", "memory_allocated", "memory_reserved"}
    assert set(record["prompt_cache"]) == {"entries", "megabytes", "budget_megabytes", "hits", "misses"}
    assert record_from_json(record_to_json(record)) == record
    reply = runtime.request_offload()
    assert set(reply) == OffloadReply.__required_keys__ and reply["status"] is OffloadStatus.NOT_LOADED


def test_gpu_availability_is_read_from_the_device_the_worker_writes(runtime: WorkerRuntime) -> None:
    record = runtime.status("gpu0@host")
    assert not gpu_available(record)
    assert gpu_available({**record, "device": "cuda:1"})
    assert not gpu_available({**record, "device": None})  # chosen at start, not known yet


def test_a_heartbeat_that_is_not_a_worker_record_is_refused() -> None:
    for text in ("[]", '{"model_loaded": true}', '{"worker": 3}'):
        with pytest.raises(ValueError):
            record_from_json(text)


def test_the_openapi_document_is_generated_from_the_records_and_defaults() -> None:
    schemas = component_schemas()
    worker = set(schemas["Worker"]["properties"])
    assert worker == set(WorkerRecord.__annotations__) | {"source"}
    assert schemas["OffloadResult"]["properties"]["status"]["$ref"] == "#/components/schemas/OffloadStatus"
    assert set(schemas["OffloadStatus"]["enum"]) == {"offloaded", "deferred", "not_loaded"}
    form = schemas["JobUpload"]["properties"]
    for param in fields(GenerationParams):
        assert form[param.name]["default"] == param.default

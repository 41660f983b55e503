"""The OpenAPI document against the live server: schemathesis generates requests for every route.

Two real servers on the private Redis: one with no key (the document asks for none) and one with
client and admin keys (the document asks for a bearer key on /api, schemathesis checks that calls
without it or with a wrong one are refused). A run passes when no request gets a 5xx, every status is
documented, and every response matches its schema. The seed is fixed so CI is reproducible; a
failure prints schemathesis' report, with a `curl` line per case.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from web.server_thread import ServerThread

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CONFIG = Path(__file__).with_name("schemathesis.toml")
ADMIN_KEY = "admin-key-for-schemathesis"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


SELF = "GET /openapi.json"
"""The one operation schemathesis leaves out: the route that serves the document it loaded."""


def documented_operations(base: str) -> set[str]:
    document = requests.get(base + "/openapi.json", timeout=10).json()
    return {
        f"{m.upper()} {path}" for path, ops in document["paths"].items() for m in ops if m in HTTP_METHODS
    }


def operations_in_report(events: Path) -> set[str]:
    """The operations a run's NDJSON report shows tests for."""
    return set(re.findall(r'"label":\s*"([A-Z]+ /[^"]*)"', events.read_text()))


def schemathesis(base: str, events: Path, *headers: str) -> subprocess.CompletedProcess[str]:
    args = [SCHEMATHESIS, "--no-color", "--config-file", str(CONFIG), "run", base + "/openapi.json"]
    args += ["--max-examples", "15", "--seed", "20261202", "--workers", "1", "--request-timeout", "20"]
    args += ["--report", "ndjson", "--report-ndjson-path", str(events)]
    for header in headers:
        args += ["--header", header]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("keys", [False, True], ids=["open", "with-keys"])
def test_every_route_answers_as_documented(
    start_web: Callable[..., ServerThread], keys: bool, tmp_path: Path
) -> None:
    overrides: dict[str, object] = {"offline_timeout": 2.0}
    headers: tuple[str, ...] = ()
    if keys:
        overrides.update(api_keys=(("alice", "alice-key"),), admin_keys=(("root", ADMIN_KEY),))
        headers = (f"Authorization: Bearer {ADMIN_KEY}",)
    server = start_web(**overrides)
    events = tmp_path / "schemathesis.ndjson"
    run = schemathesis(server.url, events, *headers)
    report = run.stdout[-12000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert operations_in_report(events) == documented_operations(server.url) - {SELF}, report


def test_the_api_docs_are_served_from_the_package(start_web: Callable[..., ServerThread]) -> None:
    """GET /docs: Swagger UI over /openapi.json, every file from this server, nothing from a CDN."""
    base = start_web().url
    page = requests.get(base + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(link.startswith("/") for link in linked), linked  # no CDN, no other host
    types = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
    for link in linked:
        asset = requests.get(base + link, timeout=10)
        assert asset.status_code == 200, link
        assert asset.headers["Content-Type"].startswith(types[Path(link).suffix]), link
    init = requests.get(base + "/static/docs.js", timeout=10).text
    assert '"/openapi.json"' in init and "validatorUrl: null" in init and "http" not in init
    assert requests.get(base + "/docs/index.html", timeout=10).status_code == 404  # only named files

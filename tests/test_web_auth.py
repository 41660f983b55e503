"""web/auth.py at the HTTP API: an API key guards every /api route and the events socket (which
also takes ?access_token=), /health and /openapi.json stay open, and access logs mask the key.

Over the real werkzeug server: the route sweep sends real requests, and the socket is a real
WebSocket.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import pytest
import requests
import simple_websocket
from fixtures import wait_until
from web_helpers import API_KEY, HEX_ID, Live, queued


def test_api_key_guards_every_api_route(serve: Callable[..., Live], clip: bytes) -> None:
    live = serve(api_key=API_KEY)
    assert live.get("/health").status_code == 200  # open: load balancers probe it
    assert live.get("/openapi.json").status_code == 200
    app = live.server.app
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/") or rule.rule.endswith("/events"):
            continue  # the events socket is checked in the next test
        path = re.sub(r"<(?:\w+:)?\w+>", HEX_ID, rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = requests.request(method, live.url + path, timeout=30)
            assert response.status_code == 401, (method, rule.rule, response.status_code)
            assert "API key" in response.json()["error"]
            checked += 1
    assert checked >= 15  # jobs, batches, offline, gpu, catalog: every /api route and method
    assert live.submit(clip).status_code == 401
    live.headers = {"Authorization": "Bearer wrong"}
    assert live.get("/api/voices").status_code == 401
    live.headers = {"Authorization": f"Bearer {API_KEY}"}
    assert live.get("/api/voices").status_code == 200
    job_id = queued(live, clip)
    ws = live.ws(job_id)
    assert json.loads(ws.receive(timeout=5))["type"] == "state"
    ws.close()


def test_access_log_records_keep_their_shape_with_the_key_masked() -> None:
    from web.auth import MASK_ACCESS_TOKEN

    def record(msg: str, args: object) -> logging.LogRecord:
        return logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, msg, args, None)  # type: ignore[arg-type]

    gunicorn = record('%(h)s "%(r)s"', {"h": "10.0.0.1", "r": f"GET /x?access_token={API_KEY}&a=1 HTTP/1.1"})
    assert MASK_ACCESS_TOKEN.filter(gunicorn) and isinstance(gunicorn.args, dict)
    assert gunicorn.getMessage() == '10.0.0.1 "GET /x?access_token=***&a=1 HTTP/1.1"'
    werkzeug = record('"%s" %s %s', (f"GET /ws?access_token={API_KEY} HTTP/1.1", "101", "-"))
    assert MASK_ACCESS_TOKEN.filter(werkzeug)
    assert werkzeug.getMessage() == '"GET /ws?access_token=*** HTTP/1.1" 101 -'


def test_events_socket_refuses_a_missing_key_and_takes_access_token(
    serve: Callable[..., Live], clip: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="werkzeug")
    live = serve(api_key=API_KEY)
    with pytest.raises(simple_websocket.ConnectionError):
        live.ws(HEX_ID)
    live.headers = {"Authorization": f"Bearer {API_KEY}"}
    job_id = queued(live, clip)
    live.headers = {}
    ws = live.ws(job_id, f"?access_token={API_KEY}")
    assert json.loads(ws.receive(timeout=5))["status"] == "queued"
    ws.close()
    # The request line reaches the access log with the key masked.
    wait_until(lambda: "access_token=***" in caplog.text, 5, what="the socket's access log line")
    assert API_KEY not in caplog.text

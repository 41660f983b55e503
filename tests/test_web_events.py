"""web/api_events.py: WS /api/jobs/<id>/events sends the job's state, then relays its events until it
is final. Real WebSockets over the real werkzeug server; the worker's part is played through the real
stores."""

from __future__ import annotations

import base64
import json
import os
import socket

import pytest
from fixtures import events_until_closed
from web_helpers import HEX_ID, Live, finish_like_a_worker, queued


def test_events_socket_sends_state_then_relays_until_final(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip)
    ws = live.ws(job_id)
    state = json.loads(ws.receive(timeout=5))
    assert state["type"] == "state" and state["status"] == "queued" and state["job"]["id"] == job_id
    finish_like_a_worker(live, job_id)
    events = events_until_closed(ws)
    assert [e["type"] for e in events] == ["started", "progress", "succeeded"]
    assert events[1]["done"] == 5 and events[1]["total"] == 10
    assert all(e["job_id"] == job_id for e in events)


def test_events_socket_for_a_final_job_sends_state_and_closes(live: Live, clip: bytes) -> None:
    job_id = queued(live, clip)
    live.delete(f"/api/jobs/{job_id}")
    events = events_until_closed(live.ws(job_id))
    assert [(e["type"], e["status"]) for e in events] == [("state", "cancelled")]


@pytest.mark.parametrize("job_id", [HEX_ID, "not-a-job-id"])
def test_events_socket_for_an_unknown_job_says_so(live: Live, job_id: str) -> None:
    events = events_until_closed(live.ws(job_id))
    assert events[0]["type"] == "error" and "doesn't exist" in events[0]["error"]


def test_a_socket_the_server_closes_carries_nothing_after_the_close_frame(live: Live, clip: bytes) -> None:
    """Under werkzeug the handler's end used to be followed by an HTTP response on the socket,
    which browsers read as a broken frame (close 1006 instead of 1000)."""
    job_id = queued(live, clip)
    finish_like_a_worker(live, job_id)
    host, port = live.url.removeprefix("http://").split(":")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(request.encode())
        received = b""
        while (chunk := raw.recv(65536)) and not received.endswith(CLOSE_FRAME_1000):
            received += chunk
        raw.sendall(MASKED_CLIENT_CLOSE_1000)  # our half of the closing handshake
        rest = b"".join(iter(lambda: raw.recv(65536), b""))
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    assert frames.endswith(CLOSE_FRAME_1000) and rest == b"", (frames[-40:], rest)


CLOSE_FRAME_1000 = b"\x88\x02\x03\xe8"
"""An unmasked close frame with code 1000 and no reason, as the server sends it."""
MASKED_CLIENT_CLOSE_1000 = b"\x88\x82\x00\x00\x00\x00\x03\xe8"
"""The client's close frame (clients mask; a zero mask keeps the payload as is)."""

"""web/api_events.py: WS /api/jobs/<id>/events sends the job's state, then relays its events until it
is final. Real WebSockets over the real werkzeug server; the worker's part is played through the real
stores."""

from __future__ import annotations

import json

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

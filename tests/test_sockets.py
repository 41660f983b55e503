"""Open sockets must not lock the API out (issue 10, item 5).

Real servers only: the werkzeug server in a thread (`start_web`) and the documented production
gunicorn command (web/__init__.py) as a subprocess, both on loopback against the private Redis.
Every event socket and /api/offline waiter of a web process shares one Redis subscription, so
hundreds of idle sockets leave the API's connection pool (and /health) alone; a waiter whose client
hung up stops waiting at once, and its job stays queued.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
import simple_websocket
from fixtures import (
    SPEECH_20S,
    RedisServer,
    ServiceProcess,
    events_until_closed,
    free_port,
    wait_until,
    ws_connect,
)

import web
from personaplex.audio import encode_wav, load
from personaplex.jobs import Job, JobStatus, JobStore
from web.server_thread import ServerThread

SOCKETS = 500
SOCKETS_PER_JOB = 5
API_DEADLINE_S = 1.0
"""Every API call made while the sockets are open must answer within this (the issue's bound)."""

OPENERS = 16
"""Client threads opening sockets at once (the server's listen backlog is 128)."""

GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


# -- helpers -------------------------------------------------------------------------------------


def _ws_url(base: str, job_id: str) -> str:
    return base.replace("http://", "ws://") + f"/api/jobs/{job_id}/events"


def open_socket(base: str, job_id: str) -> tuple[simple_websocket.Client, dict[str, Any]]:
    """An events socket and its first message (the job's state)."""
    ws = ws_connect(_ws_url(base, job_id))
    first = ws.receive(timeout=10)
    assert first is not None, f"no state message on the socket of job {job_id}"
    return ws, json.loads(first)


def open_sockets(base: str, job_ids: list[str]) -> list[tuple[simple_websocket.Client, dict[str, Any]]]:
    with ThreadPoolExecutor(OPENERS) as pool:
        return list(pool.map(lambda job_id: open_socket(base, job_id), job_ids))


def close_all(sockets: list[tuple[simple_websocket.Client, dict[str, Any]]]) -> None:
    for ws, _ in sockets:
        with contextlib.suppress(simple_websocket.ConnectionClosed):
            ws.close()


def queued_jobs(store: JobStore, count: int) -> list[Job]:
    return [store.create(Job()) for _ in range(count)]


def timed_get(url: str) -> tuple[int, float]:
    """(status, seconds) of one GET; a timeout counts as status 0 (it never answered in time)."""
    started = time.monotonic()
    try:
        status = requests.get(url, timeout=2 * API_DEADLINE_S).status_code
    except requests.Timeout:
        status = 0
    return status, time.monotonic() - started


def api_traffic(base: str, job_ids: list[str]) -> dict[str, list[tuple[int, float]]]:
    """30 job listings, 20 health probes and 20 job reads, 8 at a time: (status, seconds) by route."""
    calls = [("/api/jobs", base + "/api/jobs")] * 30 + [("/health", base + "/health")] * 20
    calls += [("/api/jobs/<id>", f"{base}/api/jobs/{job_id}") for job_id in job_ids[:20]]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda call: (call[0], timed_get(call[1])), calls))
    by_route: dict[str, list[tuple[int, float]]] = {}
    for route, result in results:
        by_route.setdefault(route, []).append(result)
    return by_route


def assert_answered_in_time(by_route: dict[str, list[tuple[int, float]]]) -> None:
    for route, results in by_route.items():
        statuses = [status for status, _ in results]
        slowest = max(seconds for _, seconds in results)
        assert statuses == [200] * len(results), f"{route}: {statuses}"
        assert slowest < API_DEADLINE_S, f"{route}: slowest call took {slowest:.2f} s"


def connected_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["connected_clients"])


def request_threads() -> int:
    """Live threads of the werkzeug servers in this process (one per open request or socket)."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def assert_final_stream(events: list[dict[str, Any]], status: str) -> None:
    """The stream ended on the job's final state: a final event, or a final state on connect."""
    assert events, "the socket closed without a message"
    last = events[-1]
    assert last["type"] == status or (last["type"] == "state" and last["status"] == status), events


@pytest.fixture(scope="module")
def clip() -> bytes:
    """Two seconds of real speech as a 16-bit WAV."""
    return encode_wav(load(SPEECH_20S)[: 2 * 24000], 24000, subtype="PCM_16")


# -- the development server (werkzeug, threaded) ----------------------------------------------------


def test_500_idle_event_sockets_leave_the_api_answering(
    start_web: Callable[..., ServerThread], job_store: JobStore, redis_client: redis.Redis
) -> None:
    server = start_web()
    jobs = queued_jobs(job_store, SOCKETS // SOCKETS_PER_JOB)
    job_ids = [job.id for job in jobs for _ in range(SOCKETS_PER_JOB)]
    sockets = open_sockets(server.url, job_ids)
    try:
        states = [(first["type"], first.get("status")) for _, first in sockets]
        assert states == [("state", "queued")] * SOCKETS, {s for s in states if s != ("state", "queued")}
        assert all(ws.connected for ws, _ in sockets)
        assert_answered_in_time(api_traffic(server.url, [job.id for job in jobs]))
        pool_size = server.app.config["PERSONAPLEX_SETTINGS"].redis_pool_size
        assert connected_clients(redis_client) <= pool_size + 5  # the sockets hold no connection
        # Fan-out at this scale: one job ends, and each of its sockets gets the final event and closes.
        assert requests.delete(f"{server.url}/api/jobs/{jobs[0].id}", timeout=5).status_code == 200
        for ws, _ in sockets[:SOCKETS_PER_JOB]:
            assert_final_stream(events_until_closed(ws, timeout=10), "cancelled")
        assert all(ws.connected for ws, _ in sockets[SOCKETS_PER_JOB:])
    finally:
        close_all(sockets)
    # Sockets whose clients went away end promptly (each held a server thread).
    wait_until(lambda: request_threads() == 0, 5, what="the server to let go of the closed sockets")


def test_an_offline_waiter_whose_client_hangs_up_frees_its_thread(
    start_web: Callable[..., ServerThread], job_store: JobStore, clip: bytes
) -> None:
    server = start_web(offline_timeout=60.0)
    clients = [post_offline(server.url, clip) for _ in range(10)]
    wait_until(lambda: job_store.queue_length() == 10, 10, what="the ten offline jobs to be queued")
    assert request_threads() == 10  # each waits in its own thread
    started = time.monotonic()
    for client in clients:
        client.close()  # the client hangs up while the server waits for the job
    wait_until(lambda: request_threads() == 0, 5, what="the waiters to notice their clients left")
    assert time.monotonic() - started < 3.0
    # Giving up the wait neither cancels nor loses the jobs: a worker still finds them queued.
    statuses = {job.status for job in job_store.list_recent()}
    assert statuses == {JobStatus.QUEUED} and job_store.queue_length() == 10


def post_offline(base: str, audio: bytes) -> socket.socket:
    """A raw POST /api/offline, sent whole, on a socket the caller closes to hang up."""
    prepared = requests.Request("POST", base + "/api/offline", files={"file": ("q.wav", audio)}).prepare()
    body = prepared.body if isinstance(prepared.body, bytes) else str(prepared.body).encode()
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"POST /api/offline HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {prepared.headers['Content-Type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head.encode() + body)
    return sock


def test_every_socket_gets_the_final_event_when_the_job_ends_while_they_open(
    start_web: Callable[..., ServerThread], job_store: JobStore
) -> None:
    """Sockets open while the job is cancelled: each subscribed before it read the record, so each
    sees either the final state on connect or the final event after, never neither."""
    server = start_web()
    job = job_store.create(Job())
    ws_url = _ws_url(server.url, job.id)

    def stream() -> list[dict[str, Any]]:
        return events_until_closed(ws_connect(ws_url), timeout=10)

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream) for _ in range(40)]
        time.sleep(0.1)  # some sockets are open by now, others still connecting
        job_store.request_cancel(job.id)
        results = [future.result() for future in streams]
    for events in results:
        assert_final_stream(events, "cancelled")
    assert any(events[0]["status"] == "queued" for events in results)  # some saw the event itself


def test_event_sockets_survive_a_redis_restart(
    start_web: Callable[..., ServerThread], job_store: JobStore, redis_server: RedisServer
) -> None:
    server = start_web()
    before = job_store.create(Job())
    ws, first = open_socket(server.url, before.id)
    assert first["status"] == "queued"
    redis_server.stop()  # no persistence: the job record is gone with it
    redis_server.start()
    # The socket learns of the outage: it re-reads the job once the subscription is back, and the job
    # Redis lost is reported rather than waited for in silence.
    events = events_until_closed(ws, timeout=15)
    assert events and events[-1]["type"] == "error", events
    # The one subscription is back: a socket opened now gets its job's final event.
    after = job_store.create(Job())
    ws, first = open_socket(server.url, after.id)
    assert first["status"] == "queued"
    job_store.request_cancel(after.id)
    assert_final_stream(events_until_closed(ws, timeout=10), "cancelled")


# -- the production command (gunicorn, as documented in web/__init__.py) ----------------------------


def production_command(port: int) -> list[str]:
    """The documented gunicorn command line, bound to a loopback port instead of 0.0.0.0:8998."""
    (line,) = [ln.strip() for ln in (web.__doc__ or "").splitlines() if ln.strip().startswith("gunicorn ")]
    args = shlex.split(line)
    args[args.index("-b") + 1] = f"127.0.0.1:{port}"
    return [GUNICORN, *args[1:]]


@pytest.fixture
def gunicorn_web(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[tuple[str, ServiceProcess]]:
    """(base URL, process) of the production command serving on the private Redis; stopped after."""
    port = free_port()
    env = {"REDIS_URL": redis_server.url, "PERSONAPLEX_DATA_DIR": str(tmp_path / "data")}
    process = ServiceProcess("gunicorn", production_command(port), env, tmp_path / "logs").start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{process.log()[-4000:]}")
        try:
            return requests.get(base + "/health", timeout=1).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # still booting (slow on a loaded host)
            return False

    try:
        wait_until(up, 30, interval=0.2, what="gunicorn to serve /health")
        yield base, process
    finally:
        process.stop(timeout=10)
        print(f"----- gunicorn log -----\n{process.log()[-4000:]}")


def test_the_production_command_holds_500_idle_sockets_and_keeps_answering(
    gunicorn_web: tuple[str, ServiceProcess], job_store: JobStore, redis_client: redis.Redis, clip: bytes
) -> None:
    base, _ = gunicorn_web
    jobs = queued_jobs(job_store, SOCKETS // SOCKETS_PER_JOB)
    sockets = open_sockets(base, [job.id for job in jobs for _ in range(SOCKETS_PER_JOB)])
    try:
        assert all(first["status"] == "queued" for _, first in sockets)
        assert_answered_in_time(api_traffic(base, [job.id for job in jobs]))
        # A submission goes all the way through the Celery producer under this worker class.
        submitted = requests.post(base + "/api/jobs", files={"file": ("q.wav", clip)}, timeout=5)
        assert submitted.status_code == 202, submitted.text
        assert connected_clients(redis_client) < 150  # two processes: pools, one subscriber each
        assert requests.delete(f"{base}/api/jobs/{jobs[0].id}", timeout=5).status_code == 200
        for ws, _ in sockets[:SOCKETS_PER_JOB]:
            assert_final_stream(events_until_closed(ws, timeout=10), "cancelled")
    finally:
        close_all(sockets)


def test_the_production_command_frees_offline_waits_whose_clients_hung_up(
    gunicorn_web: tuple[str, ServiceProcess], job_store: JobStore, clip: bytes
) -> None:
    base, process = gunicorn_web
    clients = [post_offline(base, clip) for _ in range(20)]
    wait_until(lambda: job_store.queue_length() == 20, 10, what="the twenty offline jobs to be queued")
    for client in clients:
        client.close()

    def hung_up() -> int:
        return process.log().count("hung up; the job stays queued")

    wait_until(lambda: hung_up() == 20, 5, what="every wait to notice its client left")
    assert job_store.queue_length() == 20  # the jobs go on


CONVERSATIONS = 128
"""Live conversations the production command must hold open at once (issue 13)."""


@pytest.mark.slow
def test_the_production_command_holds_128_live_conversations_and_keeps_answering(
    gunicorn_web: tuple[str, ServiceProcess],
    start_worker: Callable[..., Any],
    redis_client: redis.Redis,
    speech: np.ndarray,
) -> None:
    """128 conversations run at once (a worker with 128 live rows on the tiny model; 20 s each at
    most, and a frame budget for 128 such rows), each talking, while the API answers
    in time; then all hang up and nothing is left."""
    from chat_client import ChatClient

    base, _ = gunicorn_web
    worker = start_worker(
        "gpu0",
        PERSONAPLEX_MAX_LIVE=str(CONVERSATIONS),
        PERSONAPLEX_MAX_BATCH=str(CONVERSATIONS),
        PERSONAPLEX_MAX_LIVE_SECONDS="20",
        PERSONAPLEX_MAX_BATCH_FRAMES=str(CONVERSATIONS * 512),  # 250 frames + the prompt, rounded up
    )
    clients: list[ChatClient] = []
    talking = threading.Event()

    def talk() -> None:  # a frame a second from every connected client: none falls silent
        while not talking.wait(1.0):
            for client in list(clients):
                with contextlib.suppress(simple_websocket.ConnectionClosed):
                    client.send_pcm(speech[:1920])

    threading.Thread(target=talk, daemon=True).start()
    with ThreadPoolExecutor(OPENERS) as pool:
        for client in pool.map(
            lambda _: ChatClient(base, codec="pcm").connect(timeout=120), range(CONVERSATIONS)
        ):
            clients.append(client)
    try:
        assert_answered_in_time(api_traffic(base, []))
        for client in clients:
            client.wait_for_audio(1, timeout=60)
        status = requests.get(base + "/api/gpu/status", timeout=5).json()
        assert status["live_sessions"] == CONVERSATIONS == status["active_connections"]
        assert not any(client.closed.is_set() for client in clients)
    finally:
        talking.set()
        for client in clients:
            client.hang_up()
    wait_until(
        lambda: not redis_client.keys("personaplex:live:*"), 60, what="every conversation's keys to go"
    )
    assert "Traceback" not in worker.log()

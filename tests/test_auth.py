"""API keys and binds: safe by default, and more than one client.

- Key settings: the `name:key,...` format, and the key ring the app builds from the three settings.
- Binds: `python -m web` and gunicorn (the compose command) as real subprocesses: loopback by
  default, no open API on 0.0.0.0 unless PERSONAPLEX_ALLOW_OPEN=1 (and then a WARNING).
- Ownership over real HTTP: two client keys each see only their own jobs and batches (404 for the
  other's), an admin key sees all; the single legacy key is an admin, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import simple_websocket
import yaml
from fixtures import REPO_ROOT, RedisServer, free_port, speech_clip, wait_until, ws_connect

from personaplex.jobs import Job, JobStore, WorkerRegistry
from personaplex.settings import Settings, parse_named_keys
from web.auth import LEGACY_KEY_NAME, KeyRing
from web.bind import OpenBindError, check_app_server, check_bind, is_loopback
from web.server_thread import ServerThread

GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
KEYS = {"alice": "alice-key-1", "bob": "bob-key-2", "ops": "ops-key-3"}
OTHER_ID_ERROR = "doesn't exist"


# -- helpers ---------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any service setting, plus `extra`."""
    drop = ("HOST", "PORT", "REDIS_URL", "SERVER_SOFTWARE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONAPLEX_") and k not in drop}
    return {**env, "PYTHONPATH": str(REPO_ROOT), **extra}


def answers_health(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except (requests.ConnectionError, requests.Timeout):  # gunicorn listens before its worker has booted
        return False


class Served:
    """A server subprocess whose output goes to a log file; stopped (SIGTERM) on exit."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, port: int, timeout: float = 30.0) -> None:
        def up() -> bool:
            assert self.process.poll() is None, f"the server exited early:\n{self.log()}"
            return answers_health(port)

        wait_until(up, timeout, interval=0.2, what="the server's /health")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self._log.close()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], Served]]:
    started: list[Served] = []

    def start(args: list[str], env: dict[str, str]) -> Served:
        started.append(Served(args, env, tmp_path / f"server-{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def refused(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a server that must refuse to start: it exits by itself, long before the timeout."""
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def compose_web_command(bind: str | None = None) -> list[str]:
    """The web service's command from docker-compose.yml, optionally on another bind with one worker."""
    command = list(
        yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["web"]["command"]
    )
    if bind is not None:
        command[command.index("-b") + 1] = bind
        command[-1:-1] = ["-w", "1"]  # before the app: one worker is enough here
    return [GUNICORN, *command[1:]]


# -- the key settings ------------------------------------------------------------------------------


def test_named_keys_format() -> None:
    assert parse_named_keys("") is None and parse_named_keys(" , ") is None
    assert parse_named_keys("alice:k1, bob:k:with:colons ,") == (("alice", "k1"), ("bob", "k:with:colons"))
    env = {"PERSONAPLEX_API_KEYS": "a:1", "PERSONAPLEX_ADMIN_KEYS": "ops@host:2"}
    settings = Settings.from_env(env)
    assert settings.api_keys == (("a", "1"),) and settings.admin_keys == (("ops@host", "2"),)
    assert settings.has_keys and not Settings.from_env({}).has_keys


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("just-a-secret-value", "entry 1 is not name:key"),
        ("alice:k1,bob:", "entry 2 is not name:key"),
        ("al ice:k1", "entry 1: a name"),
        ("alice:k1,alice:k2", "'alice' is given twice"),
    ],
)
def test_malformed_keys_name_the_variable_and_never_the_secret(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="PERSONAPLEX_API_KEYS") as caught:
        Settings.from_env({"PERSONAPLEX_API_KEYS": text})
    assert problem in str(caught.value)
    for secret in ("just-a-secret-value", "k1", "k2"):
        assert secret not in str(caught.value)


def test_key_ring_roles_and_conflicts() -> None:
    settings = Settings.from_env(
        {
            "PERSONAPLEX_API_KEY": "legacy",
            "PERSONAPLEX_API_KEYS": "alice:ka",
            "PERSONAPLEX_ADMIN_KEYS": "ops:ko",
        }
    )
    ring = KeyRing.from_settings(settings)
    assert ring.identify("legacy").name == LEGACY_KEY_NAME and ring.identify("legacy").admin  # type: ignore[union-attr]
    assert ring.identify("ko").admin and not ring.identify("ka").admin  # type: ignore[union-attr]
    assert ring.identify("kA") is None and ring.identify("") is None
    assert not KeyRing.from_settings(Settings.from_env({}))
    with pytest.raises(ValueError, match="'admin' is used twice"):
        KeyRing.from_settings(
            Settings.from_env({"PERSONAPLEX_API_KEY": "x", "PERSONAPLEX_API_KEYS": "admin:y"})
        )
    shared = {"PERSONAPLEX_API_KEYS": "a:s3cr3t-shared", "PERSONAPLEX_ADMIN_KEYS": "b:s3cr3t-shared"}
    with pytest.raises(ValueError, match="same key") as caught:
        KeyRing.from_settings(Settings.from_env(shared))
    assert "s3cr3t" not in str(caught.value)


# -- binds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("", False), ("::", False), ("10.0.0.5", False), ("gpu-box", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_check_bind_refuses_open_beyond_loopback_unless_allowed() -> None:
    warnings: list[str] = []
    open_settings = Settings.from_env({})
    check_bind(["127.0.0.1", "::1"], open_settings, "test", warn=warnings.append)  # loopback: fine
    with pytest.raises(OpenBindError, match="Refusing to start test on 0.0.0.0 with no API key"):
        check_bind(["127.0.0.1", ""], open_settings, "test", warn=warnings.append)
    check_bind(["0.0.0.0"], Settings.from_env({"PERSONAPLEX_API_KEYS": "a:k"}), "test", warn=warnings.append)
    assert warnings == []
    check_bind(["0.0.0.0"], Settings.from_env({"PERSONAPLEX_ALLOW_OPEN": "1"}), "test", warn=warnings.append)
    assert len(warnings) == 1 and "OPEN API" in warnings[0]


def test_the_app_factory_under_gunicorn_without_its_config_refuses_an_open_api(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    from web.app import create_app

    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/23.0.0")
    monkeypatch.delitem(sys.modules, "web.gunicorn_conf", raising=False)
    config = {"redis_url": redis_server.url}
    with pytest.raises(OpenBindError, match="python:web.gunicorn_conf"):
        create_app(config, environ={})
    create_app(config, environ={"PERSONAPLEX_API_KEY": "k"})
    create_app(config, environ={"PERSONAPLEX_ALLOW_OPEN": "1"})
    import web.gunicorn_conf  # noqa: F401 - with the config loaded, its hook has checked the bind

    check_app_server(Settings.from_env({}))


def test_dev_server_binds_loopback_by_default(
    serve_process: Callable[..., Served], redis_server: RedisServer, tmp_path: Path
) -> None:
    assert Settings.from_env({}).host == "127.0.0.1"
    port = free_port()
    env = clean_env(REDIS_URL=redis_server.url, PORT=str(port), PERSONAPLEX_DATA_DIR=str(tmp_path))
    server = serve_process([sys.executable, "-m", "web"], env)
    server.wait_healthy(port)
    log = server.log()
    assert f"Running on http://127.0.0.1:{port}" in log and "all addresses" not in log
    assert "No API key: /api is open to this host only" in log and "OPEN API" not in log


def test_dev_server_refuses_0_0_0_0_without_a_key(tmp_path: Path) -> None:
    env = clean_env(HOST="0.0.0.0", PORT=str(free_port()), PERSONAPLEX_DATA_DIR=str(tmp_path))
    result = refused([sys.executable, "-m", "web"], env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Refusing to start python -m web on 0.0.0.0 with no API key" in result.stderr
    assert "PERSONAPLEX_ALLOW_OPEN=1" in result.stderr and "Traceback" not in result.stderr
    flag = refused([sys.executable, "-m", "web", "--host", "0.0.0.0"], {**env, "HOST": "127.0.0.1"})
    assert flag.returncode == 2 and "Refusing" in flag.stderr


def test_dev_server_serves_open_on_0_0_0_0_when_allowed_and_warns(
    serve_process: Callable[..., Served], redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    env = clean_env(
        HOST="0.0.0.0",
        PORT=str(port),
        PERSONAPLEX_ALLOW_OPEN="1",
        REDIS_URL=redis_server.url,
        PERSONAPLEX_DATA_DIR=str(tmp_path),
    )
    server = serve_process([sys.executable, "-m", "web"], env)
    server.wait_healthy(port)
    assert "WARNING web: OPEN API: python -m web serves /api on 0.0.0.0 with no API key" in server.log()


def test_gunicorn_with_the_compose_command_refuses_an_open_api(tmp_path: Path) -> None:
    result = refused(compose_web_command(), clean_env(PERSONAPLEX_DATA_DIR=str(tmp_path)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Refusing to start gunicorn on 0.0.0.0 with no API key" in result.stderr
    assert "Listening at" not in result.stderr  # refused before any socket was opened


def test_gunicorn_without_the_config_refuses_an_open_api_even_on_loopback(tmp_path: Path) -> None:
    args = [GUNICORN, "-w", "1", "-b", f"127.0.0.1:{free_port()}", "web:create_app()"]
    result = refused(args, clean_env(PERSONAPLEX_DATA_DIR=str(tmp_path)))
    assert result.returncode != 0
    assert "under gunicorn without its config" in result.stderr


def test_gunicorn_serves_open_when_allowed_and_warns(
    serve_process: Callable[..., Served], redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    env = clean_env(
        PERSONAPLEX_ALLOW_OPEN="1", REDIS_URL=redis_server.url, PERSONAPLEX_DATA_DIR=str(tmp_path)
    )
    server = serve_process(compose_web_command(f"0.0.0.0:{port}"), env)
    server.wait_healthy(port)
    assert "[WARNING] OPEN API: gunicorn serves /api on 0.0.0.0 with no API key" in server.log()


# -- ownership over HTTP ---------------------------------------------------------------------------


class Caller:
    """Requests to one server with one key."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, headers=self.headers, timeout=30, **kwargs)

    def submit(self, clip: bytes) -> str:
        response = self.request("POST", "/api/jobs", files={"file": ("clip.wav", clip)})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def submit_batch(self, clip: bytes) -> dict[str, Any]:
        files = [("files", ("a.wav", clip)), ("files", ("b.wav", clip))]
        response = self.request("POST", "/api/batches", files=files)
        assert response.status_code == 202, response.text
        return response.json()

    def listed(self) -> set[str]:
        response = self.request("GET", "/api/jobs")
        assert response.status_code == 200, response.text
        return {job["job_id"] for job in response.json()["jobs"]}

    def first_event(self, job_id: str) -> dict[str, Any]:
        ws_url = self.url.replace("http://", "ws://") + f"/api/jobs/{job_id}/events"
        ws = ws_connect(ws_url, self.headers)
        try:
            message = ws.receive(timeout=5)
        except simple_websocket.ConnectionClosed:  # the error came with the close: it is in the reason
            return {"type": "error", "error": ws.close_message, "code": ws.close_reason}
        with contextlib.suppress(simple_websocket.ConnectionClosed):  # the server may have closed first
            ws.close()
        return json.loads(message)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return speech_clip(1.0)


@pytest.fixture
def clients(start_web: Callable[..., ServerThread]) -> dict[str, Caller]:
    """A server with client keys alice and bob and admin key ops; a Caller for each and one with none."""
    server = start_web(
        api_keys=parse_named_keys(f"alice:{KEYS['alice']},bob:{KEYS['bob']}"),
        admin_keys=parse_named_keys(f"ops:{KEYS['ops']}"),
    )
    return {name: Caller(server.url, key) for name, key in {**KEYS, "nobody": None}.items()}


def assert_not_found(response: requests.Response) -> None:
    assert response.status_code == 404, (response.status_code, response.text)
    assert OTHER_ID_ERROR in response.json()["error"]


def test_each_client_sees_only_its_own_jobs_and_the_admin_sees_all(
    clients: dict[str, Caller], clip: bytes, redis_client: redis.Redis
) -> None:
    alice, bob, ops = clients["alice"], clients["bob"], clients["ops"]
    alices, bobs = alice.submit(clip), bob.submit(clip)
    store = JobStore(redis_client)
    assert store.get(alices).owner == "alice" and store.get(bobs).owner == "bob"  # type: ignore[union-attr]
    unowned = Job()  # made while the service had no keys
    store.create(unowned)

    assert alice.request("GET", f"/api/jobs/{alices}").json()["owner"] == "alice"
    for path in (f"/api/jobs/{bobs}", f"/api/jobs/{bobs}/audio", f"/api/jobs/{bobs}/text"):
        assert_not_found(alice.request("GET", path))
    assert_not_found(alice.request("GET", f"/api/jobs/{unowned.id}"))
    assert_not_found(alice.request("DELETE", f"/api/jobs/{bobs}"))
    assert store.get(bobs).status == "queued"  # type: ignore[union-attr]
    event = alice.first_event(bobs)
    assert event["type"] == "error" and OTHER_ID_ERROR in event["error"]
    assert alice.first_event(alices)["type"] == "state"

    assert alice.listed() == {alices} and bob.listed() == {bobs}
    assert ops.listed() == {alices, bobs, unowned.id}
    assert ops.request("GET", f"/api/jobs/{bobs}").json()["owner"] == "bob"
    assert ops.first_event(alices)["type"] == "state"
    assert ops.request("DELETE", f"/api/jobs/{alices}").status_code == 200  # admins may cancel any job
    assert bob.request("DELETE", f"/api/jobs/{bobs}").status_code == 200

    assert clients["nobody"].request("GET", "/api/jobs").status_code == 401
    assert requests.get(alice.url + "/api/jobs", headers={"Authorization": "Bearer alice"}).status_code == 401


def test_batches_belong_to_their_client(clients: dict[str, Caller], clip: bytes) -> None:
    alice, bob, ops = clients["alice"], clients["bob"], clients["ops"]
    batch = alice.submit_batch(clip)
    path = f"/api/batches/{batch['batch_id']}"
    assert alice.request("GET", path).status_code == 200
    assert ops.request("GET", path).json()["total"] == 2
    for method, where in (("GET", path), ("GET", path + "/archive"), ("DELETE", path)):
        assert_not_found(bob.request(method, where))
    assert bob.listed() == set() and alice.listed() == set(batch["jobs"].values())
    assert alice.request("DELETE", path).status_code == 200


def test_gpu_status_for_every_key_offload_for_admins(
    clients: dict[str, Caller], redis_client: redis.Redis
) -> None:
    record = {"model_loaded": True, "gpu": {}, "running_job": "a" * 32, "running_jobs": ["a" * 32],
              "progress": {"phase": "generate", "done": 1, "total": 2}, "active_connections": 1}  # fmt: skip
    WorkerRegistry(redis_client).beat("gpu0@test", record, ttl_s=30)
    (seen_by_client,) = clients["alice"].request("GET", "/api/gpu/status").json()["workers"]
    assert not {"running_job", "running_jobs", "progress"} & set(seen_by_client)
    assert seen_by_client["active_connections"] == 1
    (seen_by_admin,) = clients["ops"].request("GET", "/api/gpu/status").json()["workers"]
    assert seen_by_admin["running_job"] == "a" * 32
    WorkerRegistry(redis_client).forget("gpu0@test")
    forbidden = clients["alice"].request("POST", "/api/gpu/offload")
    assert forbidden.status_code == 403 and "admin key" in forbidden.json()["error"]
    assert clients["ops"].request("POST", "/api/gpu/offload").status_code == 200


def test_the_single_legacy_key_is_an_admin_as_before(
    start_web: Callable[..., ServerThread], clip: bytes, redis_client: redis.Redis
) -> None:
    server = start_web(api_key="legacy-key")
    legacy = Caller(server.url, "legacy-key")
    job_id = legacy.submit(clip)
    unowned = Job()
    JobStore(redis_client).create(unowned)
    assert legacy.request("GET", f"/api/jobs/{job_id}").json()["owner"] == LEGACY_KEY_NAME
    assert legacy.request("GET", f"/api/jobs/{unowned.id}").status_code == 200
    assert legacy.listed() == {job_id, unowned.id}
    assert legacy.request("POST", "/api/gpu/offload").status_code == 200
    assert Caller(server.url, "wrong").request("GET", "/api/jobs").status_code == 401


def test_without_keys_jobs_have_no_owner_and_everything_is_visible(
    start_web: Callable[..., ServerThread], clip: bytes
) -> None:
    caller = Caller(start_web().url, None)
    job_id = caller.submit(clip)
    assert caller.request("GET", f"/api/jobs/{job_id}").json()["owner"] is None
    assert caller.listed() == {job_id}
    assert caller.request("POST", "/api/gpu/offload").status_code == 200


def test_conflicting_keys_stop_the_app_at_start(redis_server: RedisServer) -> None:
    from web.app import create_app

    with pytest.raises(ValueError, match="same key"):
        create_app(
            {"redis_url": redis_server.url},
            environ={"PERSONAPLEX_API_KEY": "k", "PERSONAPLEX_API_KEYS": "a:k"},
        )

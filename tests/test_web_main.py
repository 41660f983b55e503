"""web/__main__.py: `python -m web` serves the app on $PORT (a real subprocess, real HTTP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
import requests
from fixtures import REPO_ROOT, RedisServer, free_port, wait_until


def test_python_dash_m_web_serves_on_port(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "PORT": str(port),
        "PERSONAPLEX_DATA_DIR": str(tmp_path),
    }
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "web", "--host", "127.0.0.1"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
    )
    try:

        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, 20, interval=0.2, what="python -m web")
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()

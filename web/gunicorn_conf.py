"""gunicorn's config for the web tier: `gunicorn -c python:web.gunicorn_conf -b HOST:PORT 'web:create_app()'`.

It is the one home of the production server's shape. gevent workers: every event socket,
/api/offline wait and (later) conversation is a greenlet, not a thread, so hundreds of idle sockets
cost a few kB each and never starve /health or the API (a gthread worker with 32 threads is full
at 32 sockets). Two worker processes, a thousand connections each. Flags on the command line win
(`-w 4`, `--worker-connections 2000`, or `-k gthread --threads 32` where gevent cannot be
installed, at the cost of one thread per open socket).

Its one hook, `on_starting`, runs in the master before any socket is opened: with no API key
configured it refuses a non-loopback bind unless PERSONAPLEX_ALLOW_OPEN=1 (web/bind.py), so a
production server never comes up open by accident.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from personaplex.settings import Settings
from web.bind import check_bind
from web.gunicorn_errors import install as install_json_errors

worker_class = "gevent"
workers = 2
worker_connections = 1000

install_json_errors()  # gunicorn's own 400/431 answers as JSON, in the master before workers fork


def bound_hosts(addresses: list[Any]) -> list[str]:
    """The hosts of gunicorn's TCP addresses; unix sockets and inherited fds are local, so skipped."""
    return [str(address[0]) for address in addresses if isinstance(address, tuple)]


def post_worker_init(worker: Any) -> None:
    """The app's own INFO lines (hung-up waits, lost subscriptions) in gunicorn's log, as its own
    lines look; gunicorn configures only its loggers, and its lines do not propagate to the root."""
    line = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=line, datefmt="%Y-%m-%d %H:%M:%S %z")
    end_conversations_on_sigterm(worker)


def end_conversations_on_sigterm(worker: Any) -> None:
    """A SIGTERM (restart, deploy) first ends the open live conversations, each telling its client
    why (0x05, close 1012) and hanging up its row, then stops the worker as gunicorn does: the
    conversations would otherwise hold it for the whole graceful timeout, then be cut."""
    from web.api_chat import OpenCalls

    stop = worker.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        OpenCalls.of(worker.wsgi).end_all()
        stop(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)


def on_starting(server: Any) -> None:
    """Refuse to start an open API beyond loopback; log a WARNING when it is open on purpose."""
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a RuntimeError is what gunicorn prints as one clear line
        raise RuntimeError(f"Bad configuration: {exc}") from None
    check_bind(bound_hosts(server.cfg.address), settings, "gunicorn", warn=server.log.warning)

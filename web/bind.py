"""No open API beyond this host by accident: the check both servers run before they listen.

With no API key configured, anyone who reaches /api can submit, read and cancel every job. That is
fine on loopback (a developer's own machine), so there it is allowed; on any other address the server
refuses to start unless PERSONAPLEX_ALLOW_OPEN=1 says it is meant, and then logs a WARNING.

- `python -m web` checks its --host / HOST before serving (web/__main__.py).
- gunicorn runs `on_starting` of web/gunicorn_conf.py (`-c python:web.gunicorn_conf`), which checks
  the addresses gunicorn will bind, before it opens a socket.
- Under gunicorn without that config the app cannot see the bind, so `check_app_server` (from the app
  factory) refuses to serve open at all unless PERSONAPLEX_ALLOW_OPEN=1.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Iterable

from personaplex.settings import Settings

log = logging.getLogger(__name__)

GUNICORN_CONF_MODULE = "web.gunicorn_conf"
"""Imported by gunicorn when started with `-c python:web.gunicorn_conf`; its hook checks the bind."""

HOW_TO_FIX = (
    "Set PERSONAPLEX_API_KEY (or PERSONAPLEX_API_KEYS / PERSONAPLEX_ADMIN_KEYS), bind 127.0.0.1, "
    "or set PERSONAPLEX_ALLOW_OPEN=1 to serve it open on purpose."
)


class OpenBindError(RuntimeError):
    """The server would serve /api without a key beyond loopback.

    A RuntimeError, so gunicorn prints it as `Error: ...` and exits 1 instead of a traceback.
    """


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1; False for every other address or host name.

    Another name might resolve to any interface, so it counts as exposed; `""`, `0.0.0.0` and `::`
    mean every interface.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(
    hosts: Iterable[str], settings: Settings, server: str, warn: Callable[[str], object] = log.warning
) -> None:
    """Raise OpenBindError if `server` would serve /api open on a non-loopback host of `hosts`.

    With PERSONAPLEX_ALLOW_OPEN=1 it starts, and `warn` gets a message saying the API is open.
    """
    exposed = [host or "0.0.0.0" for host in hosts if not is_loopback(host)]
    if settings.has_keys or not exposed:
        return
    where = ", ".join(exposed)
    if not settings.allow_open:
        raise OpenBindError(
            f"Refusing to start {server} on {where} with no API key: anyone who can reach it could "
            f"submit, read and cancel every job. {HOW_TO_FIX}"
        )
    warn(
        f"OPEN API: {server} serves /api on {where} with no API key (PERSONAPLEX_ALLOW_OPEN=1): anyone "
        "who can reach it can submit, read and cancel every job."
    )


def under_gunicorn() -> bool:
    """Whether this process is a gunicorn master or worker (its arbiter sets SERVER_SOFTWARE)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def check_app_server(settings: Settings) -> None:
    """The app factory's check, for gunicorn started without web/gunicorn_conf.py.

    Gunicorn does not tell the app its bind, so without that config's hook an open API is refused on
    every address (unless PERSONAPLEX_ALLOW_OPEN=1). Any other server (tests, `python -m web`) runs
    its own check on the address it knows.
    """
    if not under_gunicorn() or GUNICORN_CONF_MODULE in sys.modules or settings.has_keys:
        return
    if not settings.allow_open:
        raise OpenBindError(
            "Refusing to serve /api with no API key under gunicorn without its config, which is what "
            "checks the bind: start it with `-c python:web.gunicorn_conf`. " + HOW_TO_FIX
        )
    log.warning("OPEN API: /api is served with no API key under gunicorn (PERSONAPLEX_ALLOW_OPEN=1).")

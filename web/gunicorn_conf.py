"""gunicorn's config for the web tier: `gunicorn -c python:web.gunicorn_conf ... 'web:create_app()'`.

Its one hook, `on_starting`, runs in the master before any socket is opened: with no API key
configured it refuses a non-loopback bind unless PERSONAPLEX_ALLOW_OPEN=1 (web/bind.py), so a
production server never comes up open by accident. Everything else stays on the command line.
"""

from __future__ import annotations

from typing import Any

from personaplex.settings import Settings
from web.bind import check_bind
from web.gunicorn_errors import install as install_json_errors

install_json_errors()  # gunicorn's own 400/431 answers as JSON, in the master before workers fork


def bound_hosts(addresses: list[Any]) -> list[str]:
    """The hosts of gunicorn's TCP addresses; unix sockets and inherited fds are local, so skipped."""
    return [str(address[0]) for address in addresses if isinstance(address, tuple)]


def on_starting(server: Any) -> None:
    """Refuse to start an open API beyond loopback; log a WARNING when it is open on purpose."""
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a RuntimeError is what gunicorn prints as one clear line
        raise RuntimeError(f"Bad configuration: {exc}") from None
    check_bind(bound_hosts(server.cfg.address), settings, "gunicorn", warn=server.log.warning)

"""The Flask API: validation, enqueueing, job records, downloads, WebSocket events, OpenAPI.

Development: `python -m web` (HOST:PORT, default 127.0.0.1:8998). Production: gunicorn with the
config that holds the server's shape (gevent workers, so hundreds of idle WebSockets and
/api/offline waits cost no threads; web/gunicorn_conf.py) and whose hook refuses to serve /api with
no key on a non-loopback address (web/bind.py):

    gunicorn -c python:web.gunicorn_conf -b 0.0.0.0:8998 'web:create_app()'
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """`web.create_app`, imported on first use: gunicorn's master imports `web.gunicorn_conf` (so
    this package) before its gevent workers monkey-patch, and the app's imports (redis, ssl users)
    must happen after the patch, in the worker."""
    if name == "create_app":
        from web.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

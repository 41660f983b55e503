"""The Flask API: validation, enqueueing, job records, downloads, WebSocket events, OpenAPI.

Development: `python -m web` (HOST:PORT, default 127.0.0.1:8998). Production, with threads so
WebSockets and the bounded /api/offline wait do not block each other, and the config whose hook
refuses to serve /api with no key on a non-loopback address (web/bind.py):

    gunicorn -c python:web.gunicorn_conf -k gthread --threads 32 -w 2 -b 0.0.0.0:8998 'web:create_app()'
"""

from web.app import create_app

__all__ = ["create_app"]

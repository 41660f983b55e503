"""The Flask API: validation, enqueueing, job records, downloads, WebSocket events, OpenAPI.

Development: `python -m web` (port from PORT, default 8998). Production, with threads so WebSockets
and the bounded /api/offline wait do not block each other:

    gunicorn -k gthread --threads 32 -w 2 -b 0.0.0.0:8998 'web:create_app()'
"""

from web.app import create_app

__all__ = ["create_app"]

"""gunicorn's own error answers as JSON, like every error the app sends.

gunicorn answers some requests before the app sees them: a request line over `limit_request_line`
(4094 bytes: 400), headers over `limit_request_fields` or `limit_request_field_size` (431), a
malformed request (400). It writes those as an HTML page through `gunicorn.util.write_error`, its
one place for them (called from `Worker.handle_error`). `install()` swaps in `write_json_error`;
web/gunicorn_conf.py calls it in the master, before the workers fork, so every worker has it.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """What gunicorn.util.write_error writes, with a `{"error": ...}` body instead of HTML."""
    body = json.dumps({"error": f"{reason}: {mesg}." if mesg else f"{reason}."}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body)


def install() -> None:
    """Make gunicorn write its own errors as JSON (idempotent)."""
    util.write_error = write_json_error

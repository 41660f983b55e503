"""JSON errors for every status: `{"error": "...", ...}` with the right code and headers."""

from __future__ import annotations

import errno
import json
import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import WSGIRequestHandler

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by views to answer with a status, a message and optional extra fields or headers: the
    web tier's boundary adapter from errors to HTTP (personaplex/errors.py draws the tree)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def error_response(
    code: int,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """`{"error": message, **extra}` with status `code` and the given headers."""
    response = jsonify({"error": message, **(extra or {})})
    response.status_code = code
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _api_error(exc: ApiError) -> Response:
    return error_response(exc.code, exc.message, exc.headers, exc.extra)


def _http_error(exc: HTTPException) -> Response:
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return error_response(exc.code or 500, exc.description or exc.name, headers)


def _too_large(exc: RequestEntityTooLarge) -> Response:
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if not limit or (request.content_length or 0) <= limit:
        return _http_error(exc)  # a form field over MAX_FORM_MEMORY_SIZE, not the upload
    return error_response(
        413,
        f"The upload is larger than the limit of {limit / 1024 / 1024:g} MB (PERSONAPLEX_MAX_UPLOAD_MB).",
        extra={"limit_bytes": limit},
    )


def _redis_down(exc: Exception) -> Response:
    log.warning("Redis is unreachable: %s", exc)
    return error_response(503, f"Redis is unreachable ({exc}); try again shortly.", {"Retry-After": "5"})


STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""OSError numbers that mean "no room to store it": answered 507, not 500."""


def _os_error(exc: OSError) -> Response:
    if exc.errno not in STORAGE_FULL_ERRNOS:
        return _internal_error(exc)
    log.error("The data directory is full: %s", exc)
    return error_response(
        507,
        f"The data directory is full ({exc.strerror}): nothing was stored. "
        "Free space under PERSONAPLEX_DATA_DIR, or retry once expired jobs are cleaned up.",
    )


def _redis_full(exc: RedisOutOfMemoryError) -> Response:
    log.error("Redis is out of memory: %s", exc)
    return error_response(
        507,
        "Redis is out of memory (its maxmemory is reached) and refused the write. "
        "Free memory or raise maxmemory, or retry once expired jobs are cleaned up.",
    )


def _internal_error(exc: Exception) -> Response:
    log.exception("Unhandled error: %s", exc)
    return error_response(500, "Internal server error.")


def init_app(app: Flask) -> None:
    """Register the JSON error handlers on the app."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(RequestEntityTooLarge, _too_large)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisConnectionError, _redis_down)
    app.register_error_handler(RedisTimeoutError, _redis_down)
    app.register_error_handler(RedisOutOfMemoryError, _redis_full)
    app.register_error_handler(OSError, _os_error)
    app.register_error_handler(Exception, _internal_error)


class JsonErrorRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, with the errors the server sends itself as JSON.

    http.server answers some requests before any app sees them, with an HTML page: 414 for a request
    line over 64 KB, 431 for a header line over 64 KB or more than 100 headers, 400 for a malformed
    request line, 505 and 501. These come back as `{"error": ...}` like every other error. Pass it as
    `request_handler` to werkzeug's make_server or run_simple (web/server_thread.py, `python -m web`).
    """

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        short, _ = self.responses.get(code, ("Error", ""))
        detail = f"{message or short}{f': {explain}' if explain else ''}"
        text = _SERVER_ERRORS.get(code, "{detail}.").format(detail=detail)
        body = json.dumps({"error": text}).encode()
        self.log_error("code %d, message %s", code, message or short)
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


_SERVER_ERRORS = {
    414: "The request line (method, path and query) is longer than 65536 bytes; send the data in the body.",
    431: "The request headers are too large ({detail}): at most 100 headers of 65536 bytes each.",
}
"""Clearer messages than http.server's for the errors whose cause one sentence can name."""

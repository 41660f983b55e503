"""JSON errors for every status: `{"error": "...", ...}` with the right code and headers."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by views to answer with a status, a message and optional extra fields or headers."""

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
    app.register_error_handler(Exception, _internal_error)

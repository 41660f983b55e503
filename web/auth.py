"""API-key check for every /api route: `Authorization: Bearer <key>` when a key is configured.

Browsers cannot set headers on a WebSocket, so the events socket also accepts `?access_token=<key>`.
Request lines carry that query string into access logs, so the key is masked in the logs we own.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping

from flask import Flask, request

from web.errors import ApiError
from web.services import services

API_PREFIX = "/api/"

ACCESS_LOGGERS = ("werkzeug", "gunicorn.access")
"""Loggers that write request lines: the development server's and gunicorn's (with --access-logfile)."""


class MaskAccessToken(logging.Filter):
    """Replaces the value of any `access_token=` query parameter in a log record with `***`.

    The record keeps its shape (message template, then a tuple or, for gunicorn's access log, a
    mapping of arguments), so formatters that read the arguments still find them.
    """

    PATTERN = re.compile(r"(access_token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._mask(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {key: self._mask(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(self._mask(value) for value in record.args)
        return True

    def _mask(self, value: object) -> object:
        if isinstance(value, str) and "access_token=" in value:
            return self.PATTERN.sub(r"\1***", value)
        return value


MASK_ACCESS_TOKEN = MaskAccessToken()


def _presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.path.endswith("/events"):
        return request.args.get("access_token")
    return None


def _check_api_key() -> None:
    expected = services().settings.api_key
    if not expected or not (request.path + "/").startswith(API_PREFIX):
        return
    presented = _presented_key()
    if presented is None:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": 'Bearer realm="personaplex"'},
        )
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise ApiError(401, "Invalid API key.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def init_app(app: Flask) -> None:
    """Check the API key before every request to an /api route; keep keys out of access logs."""
    app.before_request(_check_api_key)
    for name in ACCESS_LOGGERS:
        logging.getLogger(name).addFilter(MASK_ACCESS_TOKEN)  # the same filter is added once

"""API-key check for every /api route: `Authorization: Bearer <key>` when a key is configured.

Browsers cannot set headers on a WebSocket, so the events socket also accepts `?access_token=<key>`.
"""

from __future__ import annotations

import hmac

from flask import Flask, request

from web.errors import ApiError
from web.services import services

API_PREFIX = "/api/"


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
    """Check the API key before every request to an /api route."""
    app.before_request(_check_api_key)

"""GET /docs: interactive API docs (Swagger UI) for /openapi.json, the way the legacy server had them.

Swagger UI's files come from the installed `swagger-ui-bundle` package (the connexion project's
packaging of it) and are served by this blueprint, so the page works offline and behind firewalls:
nothing is fetched from a CDN. Only the files the page needs are served, by name.
"""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, send_from_directory
from swagger_ui_bundle import swagger_ui_path

bp = Blueprint("docs", __name__)

ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"})
"""Swagger UI's files the page loads; anything else under /docs/ is a 404."""


@bp.get("/docs")
def docs_page() -> Response:
    return current_app.send_static_file("docs.html")


@bp.get("/docs/<name>")
def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        abort(404, f"No such file in the API docs: {name[:64]!r}.")
    return send_from_directory(swagger_ui_path, name, max_age=3600)

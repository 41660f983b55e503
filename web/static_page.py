"""GET /: a minimal upload page; GET /chat: a live conversation page (static HTML that calls the API
from the browser)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

bp = Blueprint("page", __name__)


@bp.get("/")
def index() -> Response:
    return current_app.send_static_file("index.html")


@bp.get("/chat")
def chat() -> Response:
    return current_app.send_static_file("chat.html")

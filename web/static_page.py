"""GET /: the web console (jobs, batches, fleet, conversation, voices); GET /chat: the live
conversation page. Static HTML and ES modules under web/static that call the API from the browser."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

bp = Blueprint("page", __name__)


@bp.get("/")
def index() -> Response:
    return current_app.send_static_file("index.html")


@bp.get("/chat")
def chat() -> Response:
    return current_app.send_static_file("chat.html")

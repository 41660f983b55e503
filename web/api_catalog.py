"""GET /api/prompts: example persona prompts (the voices are web/api_voices.py's)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from personaplex.catalog import DEFAULT_PROMPT, DEFAULT_SEED, PROMPTS
from web.schemas import PromptList, answer

bp = Blueprint("catalog", __name__, url_prefix="/api")


@bp.get("/prompts")
def list_prompts() -> Response:
    body = {
        "prompts": [p.to_dict() for p in PROMPTS],
        "default": DEFAULT_PROMPT,
        "default_seed": DEFAULT_SEED,
    }
    return jsonify(answer(PromptList, body))

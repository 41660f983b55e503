"""GET /api/voices and GET /api/prompts: the catalog of voices and example persona prompts."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from personaplex.catalog import DEFAULT_PROMPT, DEFAULT_SEED, DEFAULT_VOICE, PROMPTS, VOICES
from web.schemas import PromptList, VoiceList, answer

bp = Blueprint("catalog", __name__, url_prefix="/api")


@bp.get("/voices")
def list_voices() -> Response:
    body = {"voices": [voice.to_dict() for voice in VOICES], "default": DEFAULT_VOICE, "count": len(VOICES)}
    return jsonify(answer(VoiceList, body))


@bp.get("/prompts")
def list_prompts() -> Response:
    body = {
        "prompts": [p.to_dict() for p in PROMPTS],
        "default": DEFAULT_PROMPT,
        "default_seed": DEFAULT_SEED,
    }
    return jsonify(answer(PromptList, body))

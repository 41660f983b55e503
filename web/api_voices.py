"""The voices: the catalog the model ships with, and custom voices uploaded once and used by id.

GET /api/voices lists both; POST /api/voices checks a recording (personaplex.custom_voices) and
stores it with the speaker's consent; GET and DELETE /api/voices/<id> read and remove one. A custom
voice is usable by every key; only the key that uploaded it, or an admin key, may delete it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from personaplex.catalog import DEFAULT_VOICE, VOICES, normalize_voice_name
from personaplex.custom_voices import (
    CUSTOM_CATEGORY,
    CustomVoice,
    VoiceNameTaken,
    check_voice_id,
    check_voice_name,
    check_voice_recording,
    voice_id_for,
)
from personaplex.errors import AudioError
from personaplex.settings import TRUE_WORDS
from web import schemas
from web.auth import current_owner, current_principal
from web.errors import ApiError
from web.schemas import answer
from web.services import services

bp = Blueprint("voices", __name__, url_prefix="/api/voices")


def custom_voice_view(voice: CustomVoice) -> dict[str, Any]:
    """A custom voice as GET /api/voices lists it."""
    return {
        "id": voice.id,
        "name": voice.name,
        "category": CUSTOM_CATEGORY,
        "filename": voice.id,
        "custom": True,
        "created_at": voice.created_at,
        "duration_s": voice.duration_s,
    }


def _voice_detail(voice: CustomVoice) -> dict[str, Any]:
    consent: dict[str, Any] = {"at": voice.consent.at}
    if current_principal().can_see(voice.owner):
        consent["address"] = voice.consent.address
    return {**custom_voice_view(voice), "loudness_lufs": voice.loudness_lufs, "consent": consent}


@bp.get("")
def list_voices() -> Response:
    catalog = [{**voice.to_dict(), "custom": False} for voice in VOICES]
    custom = [custom_voice_view(voice) for voice in services().voices.list_voices()]
    body = {"voices": catalog + custom, "default": DEFAULT_VOICE, "count": len(catalog) + len(custom)}
    return jsonify(answer(schemas.VoiceList, body))


@bp.post("")
def create_voice() -> tuple[Response, int, dict[str, str]]:
    svc = services()
    name = _checked_name(request.form.get("name"))
    _check_consent(request.form.get("consent"))
    taken = svc.voices.get(voice_id_for(name))
    if taken is not None:
        raise _name_taken(VoiceNameTaken(name, taken.id))
    storage = request.files.get("file")
    if storage is None:
        raise ApiError(400, "No recording uploaded: send it as the multipart field 'file'.", field="file")
    try:
        recording = check_voice_recording(storage.read())
    except AudioError as exc:
        raise ApiError(400, str(exc), field="file") from exc
    try:
        voice = svc.voices.create(name, recording, address=request.remote_addr, owner=current_owner())
    except VoiceNameTaken as exc:
        raise _name_taken(exc) from exc
    location = f"/api/voices/{voice.id}"
    return jsonify(answer(schemas.CustomVoice, _voice_detail(voice))), 201, {"Location": location}


@bp.get("/<voice_id>")
def get_voice(voice_id: str) -> Response:
    catalog_id = normalize_voice_name(voice_id)
    if catalog_id is not None:
        voice = next(v for v in VOICES if v.id == catalog_id)
        return jsonify(answer(schemas.Voice, {**voice.to_dict(), "custom": False}))
    return jsonify(answer(schemas.CustomVoice, _voice_detail(_load_custom(voice_id))))


@bp.delete("/<voice_id>")
def delete_voice(voice_id: str) -> Response:
    if normalize_voice_name(voice_id) is not None:
        raise ApiError(
            403, f"{voice_id} ships with the model: only custom voices can be deleted.", field="voice_id"
        )
    voice = _load_custom(voice_id)
    if not current_principal().can_see(voice.owner):
        raise ApiError(
            403, f"{voice.id} was uploaded with another key: only that key or an admin key may delete it."
        )
    services().voices.delete(voice.id)
    return jsonify(answer(schemas.VoiceDeleted, {"voice_id": voice.id, "deleted": True}))


def _load_custom(voice_id: str) -> CustomVoice:
    voice_id = voice_id.strip().lower()  # as voice_prompt takes it: 'Custom-Anna' is custom-anna
    try:
        check_voice_id(voice_id)
    except ValueError as exc:
        raise ApiError(400, str(exc), field="voice_id") from exc
    voice = services().voices.get(voice_id)
    if voice is None:
        raise ApiError(
            404, f"No voice has the id {voice_id!r} (GET /api/voices lists them).", field="voice_id"
        )
    return voice


def _checked_name(raw: str | None) -> str:
    try:
        return check_voice_name(raw or "")
    except ValueError as exc:
        raise ApiError(400, str(exc), field="name") from exc


def _check_consent(raw: str | None) -> None:
    if (raw or "").strip().lower() not in TRUE_WORDS:
        raise ApiError(
            400,
            "consent is required: send consent=true to attest that the speaker agreed to this use of "
            "their voice (it is recorded with the time and your address).",
            field="consent",
        )


def _name_taken(exc: VoiceNameTaken) -> ApiError:
    return ApiError(409, str(exc), field="name", voice_id=exc.voice_id)

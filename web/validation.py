"""Checks on an uploaded job before anything is stored: the audio, its name and the parameters.

Every failure raises ApiError(400) with a message that says what to change.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pydantic import ValidationError
from werkzeug.datastructures import FileStorage, MultiDict

from personaplex.audio import AudioInfo, check_decodes, probe
from personaplex.catalog import voice_ids
from personaplex.custom_voices import is_custom_voice
from personaplex.errors import AudioError
from personaplex.params import GenerationParams
from web.errors import ApiError
from web.schemas import PARAM_FIELDS, GenerationForm, describe
from web.services import services

DEFAULT_INPUT_NAME = "input.wav"
MAX_INPUT_NAME_BYTES = 200
"""Longest input name kept (UTF-8 bytes, extension included): outputs add a suffix and ".json",
and file systems refuse names over 255 bytes, so every archive member still extracts."""
MAX_EXTENSION_BYTES = 16
"""A longer "extension" is part of the stem (it is cut, not kept whole)."""
_ASCII_KEPT = re.compile(r"[A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Upload:
    """A validated job submission: the audio bytes, what they hold, and the parameters."""

    data: bytes
    input_name: str
    info: AudioInfo
    params: GenerationParams


def parse_upload(
    files: MultiDict[str, FileStorage], form: MultiDict[str, str], max_audio_seconds: float | None
) -> Upload:
    """Validate a multipart submission (field `file` plus parameter fields)."""
    storage = files.get("file")
    if storage is None:
        raise ApiError(400, "No audio uploaded: send it as the multipart field 'file'.")
    data = storage.read()
    info = check_audio(data, max_audio_seconds)
    return Upload(
        data=data, input_name=safe_input_name(storage.filename), info=info, params=parse_params(form)
    )


def safe_input_name(filename: str | None) -> str:
    """The upload's name made safe for records and archive members; it is never used as a path.

    werkzeug's secure_filename, but keeping letters, marks and digits of every script: path
    separators and whitespace become "_", other ASCII punctuation, control and format characters
    (bidi overrides among them) are dropped, leading and trailing "." and "_" are stripped (so no
    name is hidden or collides with the archive's "_batch.json"), and the result is cut to
    MAX_INPUT_NAME_BYTES keeping its extension: "日本語.wav" stays "日本語.wav".
    """
    text = unicodedata.normalize("NFC", filename or "").replace("/", " ").replace("\\", " ")
    kept = "".join(c for c in "_".join(text.split()) if _kept(c)).strip("._")
    return _bounded(kept) or DEFAULT_INPUT_NAME


def _kept(char: str) -> bool:
    if char.isascii():
        return bool(_ASCII_KEPT.fullmatch(char))
    return unicodedata.category(char)[0] in "LMN"


def _bounded(name: str) -> str:
    """`name` cut to MAX_INPUT_NAME_BYTES of UTF-8 at a character boundary, its extension kept."""
    if len(name.encode()) <= MAX_INPUT_NAME_BYTES:
        return name
    stem, dot, extension = name.rpartition(".")
    suffix = dot + extension
    if not stem or len(suffix.encode()) > MAX_EXTENSION_BYTES:
        stem, suffix = name, ""
    room = MAX_INPUT_NAME_BYTES - len(suffix.encode())
    cut = stem.encode()[:room].decode(errors="ignore").rstrip("._")
    return cut + suffix if cut else ""


def check_audio(data: bytes, max_audio_seconds: float | None) -> AudioInfo:
    if not data:
        raise ApiError(400, "The uploaded file is empty.")
    try:
        info = probe(data, max_audio_seconds)
        check_decodes(data, max_seconds=max_audio_seconds)
        return info
    except AudioError as exc:
        raise ApiError(400, str(exc)) from exc


def parse_params(form: MultiDict[str, str]) -> GenerationParams:
    """GenerationParams from the form fields, validated by `GenerationForm`; other fields are ignored.

    A blank field takes its default, except text_prompt, where blank means no persona.
    """
    values = {}
    for name in PARAM_FIELDS:
        raw = form.get(name)
        if raw is not None and (name == "text_prompt" or raw.strip()):
            values[name] = raw if name == "text_prompt" else raw.strip()
    try:
        params = GenerationForm.model_validate(values).to_params()
    except ValidationError as exc:
        field, message = describe(exc)
        extra = {"valid_voices": known_voices()} if field == "voice_prompt" else {}
        raise ApiError(400, message, field=field, **extra) from exc
    _require_custom_voice(params.voice_prompt)
    return params


def known_voices() -> list[str]:
    """Every id voice_prompt takes now: the catalog's, then the custom voices'."""
    return voice_ids() + [voice.id for voice in services().voices.list_voices()]


def _require_custom_voice(voice_id: str) -> None:
    """400 for a custom voice id no voice has (one deleted after this check fails its job instead)."""
    if is_custom_voice(voice_id) and services().voices.get(voice_id) is None:
        raise ApiError(
            400,
            f"Unknown voice prompt {voice_id!r}: no custom voice has this id. See GET /api/voices.",
            field="voice_prompt",
            valid_voices=known_voices(),
        )

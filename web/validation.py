"""Checks on an uploaded job before anything is stored: the audio, its name and the parameters.

Every failure raises ApiError(400) with a message that says what to change.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Any

from werkzeug.datastructures import FileStorage, MultiDict

from personaplex.audio import AudioInfo, check_decodes, probe
from personaplex.catalog import DEFAULT_PROMPT, normalize_voice_name, voice_ids
from personaplex.errors import AudioError
from personaplex.params import GenerationParams
from personaplex.settings import FALSE_WORDS, TRUE_WORDS
from web.errors import ApiError

DEFAULT_INPUT_NAME = "input.wav"
MAX_INPUT_NAME_BYTES = 200
"""Longest input name kept (UTF-8 bytes, extension included): outputs add a suffix and ".json",
and file systems refuse names over 255 bytes, so every archive member still extracts."""
MAX_EXTENSION_BYTES = 16
"""A longer "extension" is part of the stem (it is cut, not kept whole)."""
_ASCII_KEPT = re.compile(r"[A-Za-z0-9_.-]")
MAX_TEXT_PROMPT_CHARS = 8000
"""Longest persona prompt accepted (characters)."""

_CASTS: dict[str, type] = {
    "seed": int,
    "greedy": bool,
    "temp_audio": float,
    "temp_text": float,
    "topk_audio": int,
    "topk_text": int,
}
PARAM_FIELDS = ("voice_prompt", "text_prompt", *_CASTS)
"""Every form field parse_params reads."""


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
    """Build GenerationParams from form fields; unknown fields are ignored."""
    values: dict[str, Any] = {"voice_prompt": parse_voice(form.get("voice_prompt"))}
    values["text_prompt"] = parse_text_prompt(form.get("text_prompt"))
    known = {f.name for f in fields(GenerationParams)}
    for name, cast in _CASTS.items():
        raw = form.get(name)
        if name in known and raw is not None and raw.strip() != "":
            values[name] = _cast(name, raw.strip(), cast)
    try:
        return GenerationParams(**values)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from exc


def parse_voice(raw: str | None) -> str:
    if raw is None or not raw.strip():
        return GenerationParams().voice_prompt
    voice = normalize_voice_name(raw)
    if voice is None:
        raise ApiError(
            400,
            f"Unknown voice prompt {raw[:64]!r}. See GET /api/voices.",
            valid_voices=voice_ids(),
        )
    return voice


def parse_text_prompt(raw: str | None) -> str:
    if raw is None:
        return DEFAULT_PROMPT
    if len(raw) > MAX_TEXT_PROMPT_CHARS:
        raise ApiError(400, f"text_prompt is {len(raw)} characters; the limit is {MAX_TEXT_PROMPT_CHARS}.")
    return raw.strip()


def _cast(name: str, raw: str, cast: type) -> Any:
    if cast is bool:
        lowered = raw.lower()
        if lowered in TRUE_WORDS | FALSE_WORDS:
            return lowered in TRUE_WORDS
        raise ApiError(400, f"{name} must be true or false, got {raw[:32]!r}.")
    try:
        return cast(raw)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise ApiError(400, f"{name} must be {kind}, got {raw[:32]!r}.") from None

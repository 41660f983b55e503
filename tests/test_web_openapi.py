"""web/openapi.py: GET /openapi.json documents every route of the app, and the voice catalog, through
Flask's test client; web/schemas.py: its models are the records and parameters the code has."""

from __future__ import annotations

from dataclasses import fields

import pytest
from web_helpers import AppClient
from werkzeug.datastructures import MultiDict

from personaplex import jobs
from personaplex.custom_voices import VOICE_ID_PATTERN
from personaplex.params import GenerationParams
from web import schemas
from web.errors import ApiError
from web.validation import parse_params


def test_openapi_documents_every_route(app_client: AppClient) -> None:
    document = app_client.get("/openapi.json").json
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    components = document["components"]["schemas"]
    form = paths["/api/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form == {"$ref": "#/components/schemas/JobUpload"}
    voice_field = components["JobUpload"]["properties"]["voice_prompt"]
    catalog, custom = voice_field["anyOf"]
    assert voice_field["default"] == "NATF2.pt" and "NATF2.pt" in catalog["enum"]
    assert custom == {"type": "string", "pattern": VOICE_ID_PATTERN}  # a custom voice's id (POST /api/voices)
    assert components["JobUpload"]["required"] == ["file"]
    assert components["Voice"]["properties"]["id"]["anyOf"] == voice_field["anyOf"]
    assert components["VoiceUpload"]["required"] == ["file", "name", "consent"]
    app = app_client.app
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "page.index", "page.chat") or rule.endpoint.startswith("docs."):
            continue  # HTML pages and their files, not API
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert path in paths, f"{rule.rule} is not in /openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], f"{method} {rule.rule} is not in /openapi.json"


def test_the_job_view_declares_every_field_of_the_job_record() -> None:
    record = {f.name for f in fields(jobs.Job)}
    assert set(schemas.Job.model_fields) == record | {"job_id", "urls"}


def test_the_form_defaults_are_the_generation_defaults() -> None:
    assert schemas.GenerationForm().to_params() == GenerationParams()
    assert parse_params(MultiDict()) == GenerationParams()


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"seed": "many"}, "seed must be an integer, got 'many'."),
        ({"seed": "-2"}, "seed must be at least -1, got '-2'."),
        ({"temp_text": "nan"}, "temp_text must be a finite number, got 'nan'."),
        ({"temp_audio": "11"}, "temp_audio must be at most 10.0, got '11'."),
        ({"greedy": "maybe"}, "greedy must be true or false, got 'maybe'."),
        ({"topk_audio": "0"}, "topk_audio must be at least 1, got '0'."),
        ({"text_prompt": "x" * 8001}, "text_prompt is too long: the limit is 8000 characters, got 8001."),
    ],
)
def test_a_bad_form_field_is_named_with_what_to_send(form: dict[str, str], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_params(MultiDict(form))
    assert caught.value.code == 400 and caught.value.message == message


def test_an_unknown_voice_lists_the_voices(app_client: AppClient) -> None:
    with app_client.app.app_context(), pytest.raises(ApiError) as caught:
        parse_params(MultiDict({"voice_prompt": "NOPE"}))
    assert caught.value.message == "Unknown voice prompt 'NOPE'. See GET /api/voices."
    assert "NATF2.pt" in caught.value.extra["valid_voices"]

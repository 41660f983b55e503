"""web/openapi.py: GET /openapi.json documents every route of the app, and the voice catalog, through
Flask's test client."""

from __future__ import annotations

from web_helpers import AppClient


def test_openapi_documents_every_route(app_client: AppClient) -> None:
    document = app_client.get("/openapi.json").json
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    voice_field = paths["/api/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    voice_field = voice_field["properties"]["voice_prompt"]
    assert voice_field["default"] == "NATF2.pt" and "NATF2.pt" in voice_field["enum"]
    voice_schema = document["components"]["schemas"]["Voice"]["properties"]["id"]
    assert voice_schema["enum"] == voice_field["enum"]
    app = app_client.app
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "page.index") or rule.endpoint.startswith("docs."):
            continue  # HTML pages and their files, not API
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert path in paths, f"{rule.rule} is not in /openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], f"{method} {rule.rule} is not in /openapi.json"

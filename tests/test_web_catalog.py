"""GET /api/voices (web/api_voices.py) and GET /api/prompts (web/api_catalog.py), through Flask's
test client; custom voices are tests/test_web_voices.py's."""

from __future__ import annotations

from web_helpers import AppClient


def test_voices_and_prompts(app_client: AppClient) -> None:
    voices = app_client.get("/api/voices").json
    assert voices["count"] == len(voices["voices"]) == 18
    assert voices["default"] == "NATF2.pt"
    assert {"id", "name", "category", "filename"} <= set(voices["voices"][0])
    # The legacy server's shape: clients compare ids with "NATF2.pt".
    ids = [voice["id"] for voice in voices["voices"]]
    assert all(i.endswith(".pt") for i in ids) and voices["default"] in ids
    assert voices["voices"][0] == {
        "id": "NATF0.pt",
        "name": "Natural Female 0",
        "category": "natural",
        "filename": "NATF0.pt",
        "custom": False,
    }
    assert voices["voices"][-1]["name"] == "Variety Male 4"
    prompts = app_client.get("/api/prompts").json
    assert prompts["prompts"] and prompts["default"].startswith("You are")

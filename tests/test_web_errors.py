"""web/errors.py and web/static_page.py: unknown routes and wrong methods answer JSON errors with the
right status; GET / serves the upload page. Through Flask's test client."""

from __future__ import annotations

from web_helpers import AppClient


def test_errors_are_json_with_the_right_status(app_client: AppClient) -> None:
    missing = app_client.get("/api/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json
    wrong_method = app_client.delete("/api/voices")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json
    assert "GET" in wrong_method.headers["Allow"]
    assert app_client.get("/").status_code == 200  # the upload page

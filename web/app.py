"""The application factory: defaults, then the environment, then test overrides."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from personaplex.settings import Settings
from web import auth, errors, services
from web.api_batches import bp as batches_bp
from web.api_catalog import bp as catalog_bp
from web.api_chat import bp as chat_bp
from web.api_docs import bp as docs_bp
from web.api_events import bp as events_bp
from web.api_gpu import bp as gpu_bp
from web.api_jobs import bp as jobs_bp
from web.api_offline import bp as offline_bp
from web.api_voices import bp as voices_bp
from web.bind import check_app_server
from web.health import bp as health_bp
from web.openapi import bp as openapi_bp
from web.static_page import bp as page_bp

BLUEPRINTS = (
    health_bp,
    openapi_bp,
    docs_bp,
    catalog_bp,
    voices_bp,
    gpu_bp,
    jobs_bp,
    batches_bp,
    events_bp,
    chat_bp,
    offline_bp,
    page_bp,
)

DEFAULTS: dict[str, Any] = {
    # A live conversation's client sends 80 ms of audio at a time (about 300 B of Opus, 3.8 kB of
    # PCM): a message over 256 kB is refused with close 1009.
    "SOCK_SERVER_OPTIONS": {"ping_interval": 25, "max_message_size": 256 * 1024},
}


def create_app(
    test_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Flask:
    """Build the Flask app.

    `test_config` keys in lower case override Settings fields (`redis_url`, `api_key`, ...);
    upper-case keys are Flask config. `environ` defaults to os.environ.
    """
    overrides = dict(test_config or {})
    settings = Settings.from_env(environ, **{k: v for k, v in overrides.items() if k.islower()})
    check_app_server(settings)  # under gunicorn without its config: no open API (web/bind.py)
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        PERSONAPLEX_SETTINGS=settings,
    )
    app.config.update({k: v for k, v in overrides.items() if k.isupper()})
    app.json.sort_keys = False  # type: ignore[attr-defined]
    services.init_app(app, settings)
    errors.init_app(app)
    auth.init_app(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return app

"""`python -m web`: the development server on HOST:PORT (default 127.0.0.1:8998), threaded for WebSockets.

It binds loopback unless told otherwise, and refuses another address while no API key is set
(PERSONAPLEX_ALLOW_OPEN=1 overrides that, with a WARNING): see web/bind.py.
"""

from __future__ import annotations

import argparse
import logging

from web.app import create_app
from web.bind import OpenBindError, check_bind, is_loopback
from web.errors import JsonErrorRequestHandler

log = logging.getLogger("web")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m web", description=__doc__)
    try:
        app = create_app()
    except ValueError as exc:  # a malformed setting: one line naming it, not a traceback
        parser.exit(2, f"python -m web: error: {exc}\n")
    settings = app.config["PERSONAPLEX_SETTINGS"]
    parser.add_argument(
        "--host",
        default=settings.host,
        help="interface to bind (default: HOST or 127.0.0.1; any other address needs an API key)",
    )
    parser.add_argument("--port", type=int, default=settings.port, help="port (default: PORT or 8998)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_bind([args.host], settings, "python -m web", warn=log.warning)
    except OpenBindError as exc:
        parser.exit(2, f"python -m web: error: {exc}\n")
    if not settings.has_keys and is_loopback(args.host):
        log.info("No API key: /api is open to this host only (%s).", args.host)
    app.run(
        host=args.host,
        port=args.port,
        threaded=True,
        use_reloader=False,
        request_handler=JsonErrorRequestHandler,  # the server's own 414/431 as JSON too
    )


if __name__ == "__main__":
    main()

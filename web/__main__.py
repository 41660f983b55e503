"""`python -m web`: the development server on PORT (default 8998), threaded for WebSockets."""

from __future__ import annotations

import argparse
import logging

from web.app import create_app


def main(argv: list[str] | None = None) -> None:
    app = create_app()
    settings = app.config["PERSONAPLEX_SETTINGS"]
    parser = argparse.ArgumentParser(prog="python -m web", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=settings.port, help="port (default: PORT or 8998)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()

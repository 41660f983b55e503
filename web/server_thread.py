"""Serve an app from a background thread on a free loopback port (tests, demos, embedding).

The real werkzeug server, threaded, so WebSockets and long requests run side by side.
"""

from __future__ import annotations

import threading

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from web.errors import JsonErrorRequestHandler

POLL_INTERVAL_S = 0.05
"""Seconds between the serving loop's checks for a shutdown request."""


class ServerThread:
    """`with ServerThread(app) as server: requests.get(server.url + "/health")`."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self._server: BaseWSGIServer = make_server(
            host, port, app, threaded=True, request_handler=JsonErrorRequestHandler
        )
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL_INTERVAL_S,), name="web-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; open live conversations are ended first (their clients told why)."""
        from web.api_chat import OpenCalls

        OpenCalls.of(self.app).end_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

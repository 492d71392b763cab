"""Loopback HTTP stand-ins for tests: a handler served by a threading server on a free port."""

from __future__ import annotations

import http.server
import threading


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that keeps the test's output clean."""

    def log_message(self, *args: object) -> None:
        pass


class StubServer:
    """``handler`` served on 127.0.0.1 in a daemon thread until :meth:`close`; ``url`` names it."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

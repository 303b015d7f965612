"""A JSON-over-HTTP server on 127.0.0.1 (random port, daemon threads) for tests of HTTP clients."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# (JSON body, or None for a GET; request headers) -> (HTTP status, a JSON-serialisable payload or raw bytes)
Handle = Callable[[Any, Any], tuple[int, Any]]


class JsonServer:
    """Answers every request with ``handle``; ``url`` is its OpenAI-style base URL (ending in /v1)."""

    def __init__(self, handle: Handle):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(*handle(None, self.headers))

            def do_POST(self) -> None:
                self._send(*handle(json.loads(self.rfile.read(int(self.headers["Content-Length"]))), self.headers))

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def model_list(name: str) -> dict[str, Any]:
    """The reply to GET /v1/models of a server with one model."""
    return {"object": "list", "data": [{"id": name, "object": "model"}]}

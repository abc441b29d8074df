"""A real HTTP server (stdlib ``http.server``, a free loopback port, its own thread) that
records the webhook POSTs it receives and answers with the status codes it is given."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    """``with WebhookReceiver() as hook:`` ... ``hook.url``, ``hook.wait_for(n)``."""

    def __init__(self, answers: list[int] | None = None, delay: float = 0.0) -> None:
        #: status codes to answer, in order; 200 once they run out
        self.answers = list(answers or [])
        #: seconds to wait before answering (a webhook that hangs)
        self.delay = delay
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.requests = 0
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(receiver.delay)
                with receiver._cond:
                    receiver.requests += 1
                    code = receiver.answers.pop(0) if receiver.answers else 200
                    if code < 300:
                        receiver.received.append(json.loads(body))
                        receiver.headers.append(dict(self.headers.items()))
                    receiver._cond.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The first ``n`` bodies accepted, waiting up to ``timeout`` seconds for them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.received)} webhook POSTs accepted in {timeout} s, "
                        f"expected {n} ({self.requests} requests in all)"
                    )
                self._cond.wait(left)
            return list(self.received[:n])

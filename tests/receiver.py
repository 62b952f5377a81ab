"""A real HTTP receiver on loopback for notifications: webhooks from the operator, Alertmanager's from Alertmanager.

A test peer, not a mock of our code: the operator (another process) reaches it over a socket exactly as it
would reach a team's endpoint. It records every POST with its headers and body, checks the kubetriage
signature when it knows the secret, and answers as the test scripts it: a list of status codes to give
first (then 200), and a gate that holds answers until the test opens it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    signed: bool | None  # the signature checked out (None: no secret to check with)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")


class Receiver:
    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self.answers: list[int] = []  # given in order to the next requests; then 200
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = threading.Event()  # set when a request is waiting at the closed gate
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if not owner.gate.is_set():
                    owner.arrived.set()
                    owner.gate.wait(60)
                with owner._lock:
                    status = owner.answers.pop(0) if owner.answers else 200
                    owner.deliveries.append(Delivery(self.path, headers, body, status, owner._signed(headers, body)))
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the client is gone (killed while waiting): what it sent is recorded

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _signed(self, headers: dict[str, str], body: bytes) -> bool | None:
        if self.secret is None:
            return None
        ts, sig = headers.get("x-kubetriage-timestamp", ""), headers.get("x-kubetriage-signature", "")
        want = "sha256=" + hmac.new(self.secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        return bool(ts) and hmac.compare_digest(want, sig)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def to(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path == path]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()

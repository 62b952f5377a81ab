"""A real HTTP(S) file server on loopback for the fetch and vision tests, recording every request.

``http.server`` in a thread: the code under test reaches it through sockets
and httpx exactly as it would reach a report host. Routes are set per test;
an unknown path gets a 404 and is still recorded, so "no request arrived" is
an assertion on what the server saw, not on what the client claims.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CHUNK = 16 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    """One canned answer: status, headers and body.

    Content-Length is sent unless ``chunked`` (then the client cannot refuse
    the body up front and must count while reading); ``delay`` seconds pass
    before the answer.
    """

    body: bytes = b""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    chunked: bool = False
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class LocalHTTPServer:
    """``with LocalHTTPServer() as server: server.route("/a.png", Route(...)); server.url("/a.png")``."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._ssl = ssl_context
        self._stopping = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with owner._lock:
                    owner.seen.append(Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                    # the exact path and query first, then the path alone (an API called with varying parameters)
                    route = owner.routes.get(self.path) or owner.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    route = Route(b"not found", 404, {"Content-Type": "text/plain"})
                if route.delay:
                    owner._stopping.wait(route.delay)
                try:
                    self.send_response(route.status)
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    if route.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Content-Length", str(len(route.body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if not route.chunked:
                        self.wfile.write(route.body)
                        return
                    for i in range(0, len(route.body), CHUNK):
                        piece = route.body[i : i + CHUNK]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client stopped reading at its cap or gave up: that is the behaviour under test

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def exempt(self) -> frozenset[tuple[str, int]]:
        """The one loopback socket address the fetcher may be told to allow in tests."""
        return frozenset({("127.0.0.1", self.port)})

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def route(self, path: str, route: Route) -> LocalHTTPServer:
        with self._lock:
            self.routes[path] = route
        return self

    def paths(self) -> list[str]:
        with self._lock:
            return [s.path for s in self.seen]

    def start(self) -> LocalHTTPServer:
        # A short poll keeps shutdown() (and so every test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="localhttp", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases handlers sleeping in a ``delay``
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

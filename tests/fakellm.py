"""A fake OpenAI-compatible chat-completions server: the test double of the remote LLM service.

It is a real HTTP/1.1 server on 127.0.0.1, so the analyzer's httpx client,
its timeouts and its connection handling are exercised exactly as against
OpenRouter. It runs its own event loop in its own thread: a test's loop may be
blocked or busy, and worker subprocesses started by a test call it through
``.url`` like any remote endpoint.

The HTTP layer is a small hand-written asyncio server rather than aiohttp,
because the faults it must produce (drop the connection before answering,
stream a body bigger than any client should read, answer garbage with a 200)
are awkward to force through a framework that tries to be correct.

Scripting: ``script()`` and the helpers (``reply``, ``verdict``, ``error``,
``rate_limited``, ``slow``, ``hang``, ``disconnect``, ``garbage``, ``huge``)
queue one answer per chat request, in order. When the queue is empty a rule
(``set_rule``: a callable or a keyword -> classification mapping) decides,
and then the default answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_REQUEST_BODY = 32 * 1024 * 1024
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted answer. With the defaults, a 200 chat completion whose message content is ``content``.

    ``body`` replaces the whole response body (status and headers still
    apply); ``hang`` never answers; ``disconnect`` drops the connection
    without a response; ``huge_bytes`` streams a chat completion whose
    content is that many bytes long, with a Content-Length unless ``chunked``
    (then the client cannot refuse it up front and must count while reading).
    ``delay`` is waited before any of these.
    """

    content: str | None = None
    status: int = 200
    body: bytes | str | Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    disconnect: bool = False
    huge_bytes: int = 0
    chunked: bool = False
    usage: Mapping[str, int] | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """One HTTP request as it reached the server."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


Rule = Callable[[dict[str, Any]], "Step | str | Mapping[str, Any] | None"]


def verdict_content(
    classification: str = "valid",
    reason: str = "fake LLM verdict",
    confidence: float = 0.9,
    title: str | None = None,
    next_steps: list[str] | None = None,
    **extra: Any,
) -> str:
    """The JSON text a well-behaved model answers; ``extra`` adds (or overrides) keys."""
    data: dict[str, Any] = {
        "classification": classification,
        "reason": reason,
        "confidence": confidence,
        "title": title,
        "next_steps": next_steps,
    }
    data.update(extra)
    return json.dumps(data)


def user_text(request: Mapping[str, Any]) -> str:
    """All user-message text of a chat request, where a rule looks for keywords."""
    parts: list[str] = []
    for message in request.get("messages") or []:
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "\n".join(parts)


def _error_body(message: str, kind: str, code: str | int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _BadRequest(Exception):
    pass


class FakeLLM:
    """Scriptable OpenAI-compatible server on 127.0.0.1 (``/v1/chat/completions``, ``/v1/models``).

    ``api_key``: when set, requests without ``Authorization: Bearer <api_key>``
    get a 401 that, like real providers, echoes the key it was given.
    ``reject_response_format``: answer 400 to any request carrying
    ``response_format``, as servers without structured outputs do.
    ``latency``: seconds added before every chat answer.
    """

    def __init__(
        self,
        *,
        default: Step | str | None = None,
        api_key: str | None = None,
        models: Iterable[str] = ("fake/triage-text", "fake/triage-vision"),
        reject_response_format: bool = False,
        latency: float = 0.0,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.api_key = api_key
        # A real node's pods reach host services on the node address only (devharness.node.NODE_IP).
        self.host = host
        self.models = tuple(models)
        self.reject_response_format = reject_response_format
        self.latency = latency
        self._default = self._as_step(default) if default is not None else Step(content=verdict_content())
        self._port_wanted = port
        self._lock = threading.Lock()
        self._queue: deque[Step] = deque()
        self._rule: Rule | None = None
        self._received: list[Received] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._port: int | None = None
        self._startup_error: BaseException | None = None

    # ----------------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeLLM is not running")
        return self._port

    @property
    def url(self) -> str:
        """The base URL a client configures, e.g. ``http://127.0.0.1:40123/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeLLM:
        """Start serving in a background thread; returns once the port is bound."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fakellm", daemon=True)
        self._thread.start()
        ready.wait(30)
        if self._startup_error is not None or self._port is None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"FakeLLM did not start: {self._startup_error!r}")
        return self

    def stop(self) -> None:
        """Close every connection (hung ones included) and stop the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._thread = None
        self._port = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeLLM:
        # start() blocks for the thread to bind; keep the caller's loop free meanwhile.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self._port_wanted, limit=CHUNK)
            )
            self._port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._startup_error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ----------------------------------------------------------------------- scripting

    @staticmethod
    def _as_step(step: Step | str | Mapping[str, Any]) -> Step:
        if isinstance(step, Step):
            return step
        if isinstance(step, str):
            return Step(content=step)
        return Step(content=verdict_content(**step))

    def script(self, *steps: Step | str) -> FakeLLM:
        """Queue answers for the next chat requests, in order; a str is the message content."""
        with self._lock:
            self._queue.extend(self._as_step(s) for s in steps)
        return self

    def reply(
        self,
        content: str | Mapping[str, Any],
        *,
        usage: Mapping[str, int] | None = None,
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
    ) -> FakeLLM:
        """Queue a 200 answer; a mapping is sent as its JSON text."""
        text = content if isinstance(content, str) else json.dumps(content)
        return self.script(Step(content=text, usage=usage, delay=delay, headers=dict(headers or {})))

    def verdict(
        self,
        classification: str = "valid",
        reason: str = "fake LLM verdict",
        confidence: float = 0.9,
        *,
        usage: Mapping[str, int] | None = None,
        **fields: Any,
    ) -> FakeLLM:
        """Queue a well-formed verdict answer."""
        return self.reply(verdict_content(classification, reason, confidence, **fields), usage=usage)

    def error(
        self,
        status: int,
        body: bytes | str | Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> FakeLLM:
        """Queue an HTTP error with an OpenAI-style error body unless one is given."""
        if body is None:
            body = _error_body(f"fake error {status}", "server_error" if status >= 500 else "invalid_request_error")
        return self.script(Step(status=status, body=body, headers=dict(headers or {}), delay=delay))

    def rate_limited(self, retry_after: str | None = "1") -> FakeLLM:
        """Queue a 429, with ``Retry-After`` when given (seconds or an HTTP date)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return self.error(429, _error_body("Rate limit reached", "rate_limit_error", 429), headers=headers)

    def slow(self, seconds: float, content: str | None = None) -> FakeLLM:
        """Queue an answer given only after ``seconds``."""
        return self.script(Step(content=content or self._default.content or verdict_content(), delay=seconds))

    def hang(self) -> FakeLLM:
        """Queue a request that is never answered (until the client gives up or the server stops)."""
        return self.script(Step(hang=True))

    def disconnect(self) -> FakeLLM:
        """Queue an abrupt connection close without any response."""
        return self.script(Step(disconnect=True))

    def garbage(self, body: bytes = b"<html><body>502 upstream \x00\xff\xfe garbage", status: int = 200) -> FakeLLM:
        """Queue a non-JSON body (with a JSON content type, as misbehaving proxies send)."""
        return self.script(Step(status=status, body=body))

    def huge(self, n_bytes: int = 4 * 1024 * 1024, *, chunked: bool = False) -> FakeLLM:
        """Queue a valid chat completion whose content is ``n_bytes`` long, streamed in pieces."""
        return self.script(Step(huge_bytes=n_bytes, chunked=chunked))

    def set_default(self, step: Step | str | Mapping[str, Any]) -> FakeLLM:
        """The answer when the queue is empty and no rule decides."""
        with self._lock:
            self._default = self._as_step(step)
        return self

    def set_rule(
        self,
        rule: Rule | Mapping[str, str] | None,
        *,
        fallback: str = "valid",
        confidence: float = 0.9,
    ) -> FakeLLM:
        """Decide answers from the request once the queue is empty.

        A callable gets the parsed request body and returns a Step, the content
        text, verdict fields as a mapping, or None to fall through to the
        default. A mapping ``{keyword: classification}`` answers with the
        classification of the first keyword found (case-insensitive) in the
        user messages, else ``fallback``. None removes the rule.
        """
        chosen: Rule | None
        if rule is None or callable(rule):
            chosen = rule
        else:
            keywords = [(k.lower(), v) for k, v in rule.items()]

            def keyword_rule(request: dict[str, Any]) -> str:
                text = user_text(request).lower()
                for keyword, classification in keywords:
                    if keyword in text:
                        return verdict_content(classification, f"fake rule: keyword {keyword!r}", confidence)
                return verdict_content(fallback, "fake rule: no keyword matched", confidence)

            chosen = keyword_rule
        with self._lock:
            self._rule = chosen
        return self

    def reset(self) -> FakeLLM:
        """Forget queued steps, the rule and the recorded requests."""
        with self._lock:
            self._queue.clear()
            self._rule = None
            self._received.clear()
        return self

    # ----------------------------------------------------------------------- observation

    @property
    def received(self) -> list[Received]:
        """Every HTTP request, any path, in arrival order."""
        with self._lock:
            return list(self._received)

    @property
    def requests(self) -> list[Any]:
        """The parsed JSON bodies of the chat-completion requests, in arrival order."""
        return [r.json for r in self.received if r.path.endswith("/chat/completions")]

    @property
    def pending(self) -> int:
        """Scripted steps not yet used."""
        with self._lock:
            return len(self._queue)

    # ----------------------------------------------------------------------- HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)  # type: ignore[arg-type]
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                keep_alive = await self._dispatch(request, reader, writer)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _BadRequest):
            return
        finally:
            self._connections.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _dispatch(
        self, request: tuple[Received, bool], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        received, keep_alive = request
        path = received.path.split("?", 1)[0].rstrip("/")
        with self._lock:
            self._received.append(received)
        if path.endswith("/models") and received.method == "GET":
            listing = [{"id": m, "object": "model", "owned_by": "fakellm"} for m in self.models]
            data = {"object": "list", "data": listing}
            return await _respond(writer, 200, json.dumps(data).encode(), {}, keep_alive)
        if not path.endswith("/chat/completions"):
            body = _error_body(f"no route {received.method} {path}", "invalid_request_error")
            return await _respond(writer, 404, json.dumps(body).encode(), {}, keep_alive)
        if received.method != "POST":
            body = _error_body("use POST", "invalid_request_error")
            return await _respond(writer, 405, json.dumps(body).encode(), {}, keep_alive)

        payload = received.json
        if self.api_key is not None:
            auth = received.headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                given = auth.removeprefix("Bearer ").strip() or "(none)"
                body = _error_body(f"Incorrect API key provided: {given}", "invalid_request_error", "invalid_api_key")
                return await _respond(writer, 401, json.dumps(body).encode(), {}, keep_alive)
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            body = _error_body("body must be a JSON object with messages", "invalid_request_error")
            return await _respond(writer, 400, json.dumps(body).encode(), {}, keep_alive)
        if self.reject_response_format and "response_format" in payload:
            body = _error_body(
                "response_format of type json_schema is not supported by this model",
                "invalid_request_error",
                param="response_format",
            )
            return await _respond(writer, 400, json.dumps(body).encode(), {}, keep_alive)

        step = self._next_step(payload)
        delay = self.latency + step.delay
        if delay > 0:
            await asyncio.sleep(delay)
        if step.hang:
            # Answer nothing; return once the client closes its side.
            while await reader.read(CHUNK):
                pass
            return False
        if step.disconnect:
            writer.transport.abort()
            return False
        headers = dict(step.headers)
        if step.huge_bytes:
            return await self._respond_huge(writer, payload, step, headers)
        if step.body is not None:
            raw = step.body
            if isinstance(raw, Mapping):
                raw = json.dumps(raw)
            if isinstance(raw, str):
                raw = raw.encode()
            return await _respond(writer, step.status, raw, headers, keep_alive)
        content = step.content if step.content is not None else verdict_content()
        completion = self._completion(payload, step, content)
        return await _respond(writer, step.status, json.dumps(completion).encode(), headers, keep_alive)

    def _next_step(self, payload: dict[str, Any]) -> Step:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            rule, default = self._rule, self._default
        if rule is not None:
            decided = rule(payload)
            if decided is not None:
                return self._as_step(decided)
        return default

    def _completion(self, payload: Mapping[str, Any], step: Step, content: str) -> dict[str, Any]:
        model = step.model or (payload.get("model") if isinstance(payload.get("model"), str) else None) or "fake"
        if step.usage is not None:
            usage = dict(step.usage)
        else:
            # About four characters a token, like the real tokenisers on English text.
            prompt = max(1, len(json.dumps(payload.get("messages"))) // 4)
            completion = max(1, len(content) // 4)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": usage,
        }

    async def _respond_huge(
        self, writer: asyncio.StreamWriter, payload: Mapping[str, Any], step: Step, headers: dict[str, str]
    ) -> bool:
        marker = "@@HUGE-CONTENT@@"
        template = json.dumps(self._completion(payload, step, marker)).split(marker)
        prefix, suffix = template[0].encode(), template[1].encode()
        total = len(prefix) + step.huge_bytes + len(suffix)
        head = _head(step.status, None if step.chunked else total, headers, keep_alive=False)

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if step.chunked else data

        filler = b"A" * CHUNK
        try:
            writer.write(head + frame(prefix))
            left = step.huge_bytes
            while left > 0:
                writer.write(frame(filler[: min(CHUNK, left)]))
                left -= CHUNK
                await writer.drain()
            writer.write(frame(suffix) + (b"0\r\n\r\n" if step.chunked else b""))
            await writer.drain()
        except ConnectionError:
            pass
        return False


def _head(status: int, length: int | None, headers: Mapping[str, str], keep_alive: bool) -> bytes:
    """Status line and headers; ``length=None`` means a chunked body."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines = [f"HTTP/1.1 {status} {phrase}", framing]
    lower = {k.lower() for k in headers}
    if "content-type" not in lower:
        lines.append("Content-Type: application/json")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, headers: Mapping[str, str], keep_alive: bool
) -> bool:
    try:
        writer.write(_head(status, len(body), headers, keep_alive) + body)
        await writer.drain()
    except ConnectionError:
        return False
    return keep_alive


async def _read_request(reader: asyncio.StreamReader) -> tuple[Received, bool] | None:
    """One HTTP/1.1 request, or None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise _BadRequest("truncated request head") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest("bad request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        length = int(headers.get("content-length", "0") or 0)
        if length < 0 or length > MAX_REQUEST_BODY:
            raise _BadRequest("request body too large")
        body = await reader.readexactly(length)
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return Received(method=method, path=target, headers=headers, body=body), keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            # trailers, up to the blank line
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(body)
        if len(body) + size > MAX_REQUEST_BODY:
            raise _BadRequest("request body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)

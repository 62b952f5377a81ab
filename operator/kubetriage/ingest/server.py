"""The ingest HTTP server: Alertmanager webhooks, script results and JUnit uploads become TriageJobs.

It runs inside the operator process on *every* replica, standby ones included:
it only creates (and, for resolved alerts, labels) TriageJobs through the
Kubernetes API, holds no state that must be single, and every write is
idempotent (deterministic names, 409 = already there). So a Service can spread
webhooks over all replicas and a failover of the active one loses no alert.
A separate Deployment would add an image, RBAC and a rollout to keep in step
for no isolation we need: its only dependency is the API server.

Boundary rules (the input is untrusted and often hostile):

- ``Authorization: Bearer <token>``, compared in constant time against every
  configured token (``KUBETRIAGE_INGEST_TOKEN``, and the per-team tokens of
  ``KUBETRIAGE_INGEST_TOKENS_FILE``); no token configured = everything 401.
- A token may write only to its namespaces; ``?namespace=`` picks one of them
  (default: the token's first), anything else is 403. Nothing is written
  before the whole request has been validated.
- Bodies over ``KUBETRIAGE_INGEST_MAX_BODY_BYTES`` get 413 (checked on
  Content-Length before reading, and while reading chunked or compressed bodies).
- A token bucket per token (and one shared by failed authentications) answers
  429 with ``Retry-After`` when exceeded. Buckets are per replica.
- A declared Content-Type the route cannot parse is 415, naming the types it takes (JSON routes:
  application/json, UTF-8; ``/v1/junit``: application/xml, text/xml, multipart/form-data). No Content-Type
  at all is parsed as the route's format: the CLI, and many scripts, send none.
- Malformed JSON/XML, non-UTF-8, JSON nested deeper than 32, DTDs/entities: 400.
  A request aiohttp itself cannot parse (a header over 8190 bytes, broken framing) is answered 400 by aiohttp
  and logged as one WARNING line, not an ERROR with a traceback per request.
  Wrong types, missing or oversized fields: 422 with ``field`` naming the
  input field. An unexpected exception is a 500 *and* a bug; bad input never is.
- Kubernetes API trouble (unreachable, 5xx, RBAC) is 503 with ``Retry-After``:
  the sender retries, which is safe because every write is idempotent.
- A job name already taken by a *different* input (see ``jobs.same_input``) is 409 naming both; it is never
  answered ``exists``, which would drop the row silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from pydantic import ValidationError

from kubetriage.api.keys import SUBMITTED_BY
from kubetriage.api.models import DNS_LABEL, DNS_SUBDOMAIN, HTTP_URL, MAX_NAME, MAX_URL
from kubetriage.infra import metrics
from kubetriage.infra.config import Settings
from kubetriage.infra.kube import Kube
from kubetriage.ingest import alertmanager, junit
from kubetriage.ingest.jobs import (
    IngestError,
    JobResult,
    ScriptResultIn,
    create_job,
    run_bounded,
    script_job,
    validation_error,
)

log = logging.getLogger("kubetriage.ingest.server")

MAX_JSON_DEPTH = 32
MAX_SCRIPT_RESULTS = 100  # per request, when a list is posted
RETRY_AFTER_API = 5
ROUTES = "POST /v1/alertmanager, POST /v1/script-results, POST /v1/junit, GET /healthz"


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Client:
    """An authenticated caller: a name for logs and rate limits, and where it may write (first = default)."""

    name: str
    namespaces: tuple[str, ...]


def _namespaces(value: Any, where: str) -> tuple[str, ...]:
    items = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(n, str) for n in items):
        raise ValueError(f"{where}: expected a non-empty list of namespaces")
    bad = [n for n in items if not re.match(DNS_LABEL, n) or len(n) > 63]
    if bad:
        raise ValueError(f"{where}: not a namespace name: {', '.join(map(repr, bad))}")
    return tuple(dict.fromkeys(items))


def load_tokens_file(path: str) -> dict[str, Client]:
    """``{token: [ns, ...]}`` or ``{token: {namespaces: [...], name: team}}``, as JSON or YAML.

    Raises ValueError naming the problem (never the token itself: the message is logged).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:  # its message quotes the offending line, which may hold a token
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid JSON or YAML{where}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of token -> namespaces")
    out: dict[str, Client] = {}
    for i, (token, value) in enumerate(data.items()):
        where = f"{path}: entry {i + 1}"
        if not isinstance(token, str) or len(token) < 16:
            raise ValueError(f"{where}: the token must be a string of at least 16 characters")
        name = f"token-{hashlib.sha256(token.encode()).hexdigest()[:8]}"
        if isinstance(value, dict):
            name = str(value.get("name") or name)[:64]
            value = value.get("namespaces")
        out[token] = Client(name, _namespaces(value, where))
    return out


class Tokens:
    """The configured tokens; the file is re-read when it changes (a rotated Secret), a broken one is ignored."""

    def __init__(self, settings: Settings) -> None:
        self.static: dict[str, Client] = {}
        if settings.ingest_token:
            self.static[settings.ingest_token] = Client("ingest-token", tuple(settings.ingest_namespaces))
        self.path = settings.ingest_tokens_file
        self._stamp: tuple[float, int] | None = None
        self._error = ""
        self._from_file: dict[str, Client] = {}
        self._digests: list[tuple[bytes, Client]] = []
        self._refresh()

    def _refresh(self) -> None:
        if self.path:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime, st.st_size)
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._from_file = load_tokens_file(self.path)
                    self._error = ""
                    log.info("ingest: %d token(s) loaded from %s", len(self._from_file), self.path)
            except (OSError, ValueError) as exc:
                if str(exc) != self._error:  # once per distinct problem, not once per request
                    self._error = str(exc)
                    log.error("ingest: tokens file %s unusable, keeping the previous tokens: %s", self.path, exc)
        tokens = {**self._from_file, **self.static}
        self._digests = [(hashlib.sha256(t.encode()).digest(), c) for t, c in tokens.items()]

    @property
    def configured(self) -> bool:
        return bool(self._digests)

    def authenticate(self, header: str | None) -> Client:
        """The client a bearer token belongs to, or IngestError 401."""
        if self.path:
            self._refresh()
        if not self._digests:
            raise IngestError(401, "ingest is not configured: set KUBETRIAGE_INGEST_TOKEN or "
                                   "KUBETRIAGE_INGEST_TOKENS_FILE on the operator", headers=_challenge())
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise IngestError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                              headers=_challenge())
        presented = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found: Client | None = None
        for digest, client in self._digests:  # no early exit: the time taken does not depend on which one matched
            if hmac.compare_digest(presented, digest):
                found = client
        if found is None:
            raise IngestError(401, "invalid bearer token", headers=_challenge("invalid_token"))
        return found


def _challenge(error: str = "") -> dict[str, str]:
    value = 'Bearer realm="kubetriage"' + (f', error="{error}"' if error else "")
    return {"WWW-Authenticate": value}


# --------------------------------------------------------------------------- rate limits


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when allowed; otherwise the seconds until one request would be."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per client name (bounded: names come from configuration, plus one for failed auth)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, TokenBucket] = {}

    def check(self, key: str) -> None:
        if self.rate <= 0:
            return
        bucket = self.buckets.setdefault(key, TokenBucket(self.rate, self.burst))
        wait = bucket.take()
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise IngestError(429, f"rate limit of {self.rate:g} requests/s (burst {self.burst}) exceeded; "
                                   f"retry in {retry}s", headers={"Retry-After": str(retry)})


# --------------------------------------------------------------------------- body parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_depth(data: Any) -> int:
    """Nesting depth, iteratively (the input may be deep enough to break recursion)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise IngestError(400, "empty body: expected a JSON document")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(400, f"body is not valid UTF-8 (byte {exc.start}): send JSON as UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise IngestError(400, f"JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python converts
        raise IngestError(400, f"malformed JSON: {str(exc)[:200]}") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise IngestError(400, f"JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    return data


@dataclass(frozen=True)
class BodyTypes:
    """The media types a route parses: exact ones, and a structured syntax suffix (``application/x+json``)."""

    types: tuple[str, ...]
    suffix: str
    hint: str  # how to send it right, for the 415 message

    def check(self, request: web.Request) -> None:
        """415 for a declared type this route cannot parse; nothing declared is fine (parsed as this route's format)."""
        declared = request.headers.get(hdrs.CONTENT_TYPE, "").strip()
        if not declared:
            return
        media = request.content_type  # lowercased, without parameters
        accepted = ", ".join(self.types)
        if media in self.types or (media.startswith("application/") and media.endswith(self.suffix)):
            charset = (request.charset or "utf-8").lower().replace("_", "-")
            if self.suffix == "+json" and charset not in ("utf-8", "utf8"):
                raise IngestError(415, f"Content-Type {declared[:100]!r}: JSON is read as UTF-8 only; send it as "
                                       "UTF-8 with 'Content-Type: application/json' (or charset=utf-8)",
                                  headers={"Accept": accepted})
            return
        raise IngestError(415, f"Content-Type {media[:100]!r} is not accepted by {request.path}: it takes "
                               f"{accepted} (or no Content-Type); {self.hint}", headers={"Accept": accepted})


JSON_BODY = BodyTypes(("application/json",), "+json",
                      "with curl, add -H 'Content-Type: application/json' (-d alone sends a form type)")
JUNIT_BODY = BodyTypes(("application/xml", "text/xml", "multipart/form-data"), "+xml",
                       "with curl, add -H 'Content-Type: application/xml' to --data-binary, or use -F file=@report.xml")


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log for ingest: one WARNING line for a request aiohttp cannot parse.

    aiohttp answers such a request (a header line over 8190 bytes, a broken request line or framing) with 400
    itself, before any handler runs, and logs an ERROR with a full traceback for each one: any client could fill
    the operator's log that way, and it reads like a bug in kubetriage. It is the client's mistake, so it is
    logged once, as a WARNING, without the offending bytes (an over-long Authorization header holds a token).
    Every other aiohttp message passes through unchanged.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if not isinstance(exc, HttpProcessingError):
            self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)
            return
        text = str(exc.message or "").strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        reason = re.split(r":?\s*b['\"]", first, maxsplit=1)[0].strip()[:160]  # up to where it quotes the bytes
        where = str(msg % args) if args else str(msg)  # aiohttp's "Error handling request from <address>"
        log.warning("ingest: malformed HTTP request refused with %d (%s): %s", exc.code, where, reason)


# --------------------------------------------------------------------------- the server


@dataclass
class Target:
    """Where a request's jobs go and how they are scheduled (query parameters, validated)."""

    client: Client
    namespace: str
    pool: str | None
    priority_class: str | None


def _query(request: web.Request, name: str, pattern: str | None = None, max_len: int = MAX_NAME) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > max_len or (pattern and not re.match(pattern, value)):
        raise IngestError(422, f"query parameter {name}={value[:100]!r} is not valid"
                               + (f" (must match {pattern})" if pattern else f" (longer than {max_len})"), name)
    return value


class IngestServer:
    """The aiohttp application: one handler per route, all errors turned into JSON with the right status."""

    def __init__(self, settings: Settings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.tokens = Tokens(settings)
        self.limiter = RateLimiter(settings.ingest_rate_per_second, settings.ingest_burst)
        self.priorities = settings.alert_priorities
        self.app = web.Application(client_max_size=settings.ingest_max_body_bytes, middlewares=[self._errors])
        self.app.router.add_post("/v1/alertmanager", self.alertmanager, name="alertmanager")
        self.app.router.add_post("/v1/script-results", self.script_results, name="script-results")
        self.app.router.add_post("/v1/junit", self.junit, name="junit")
        self.app.router.add_get("/healthz", self.healthz, name="healthz")
        if not self.tokens.configured:
            log.warning("ingest: no token configured (KUBETRIAGE_INGEST_TOKEN / KUBETRIAGE_INGEST_TOKENS_FILE): "
                        "every request will be refused with 401")

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        route = request.match_info.route.name or "unknown"
        try:
            resp = await handler(request)
        except IngestError as exc:
            log.info("ingest %s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
            resp = web.json_response(exc.body(), status=exc.status, headers=exc.headers)
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # broken gzip, chunking or multipart framing
            detail = " ".join(str(getattr(exc, "message", "") or exc.__cause__ or exc).split())[:200]
            log.info("ingest %s %s -> 400: malformed body: %s", request.method, request.path, detail)
            resp = web.json_response({"error": f"malformed request body (encoding, chunking or multipart): {detail}",
                                      "status": 400}, status=400)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {
                404: f"no such endpoint; this server has {ROUTES}",
                405: f"method {request.method} not allowed here; this server has {ROUTES}",
                413: f"request body larger than {self.settings.ingest_max_body_bytes} bytes",
            }.get(exc.status, exc.reason)
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            resp = web.json_response({"error": message, "status": exc.status}, status=exc.status, headers=headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("ingest %s %s: unexpected error", request.method, request.path)
            resp = web.json_response({"error": "internal error in kubetriage ingest (logged on the operator)",
                                      "status": 500}, status=500)
        metrics.INGEST_REQUESTS.labels(route, str(resp.status)).inc()
        return resp

    def _target(self, request: web.Request) -> Target:
        """Authenticate, rate-limit, and resolve the namespace: all before reading the body."""
        try:
            client = self.tokens.authenticate(request.headers.get("Authorization"))
        except IngestError:
            self.limiter.check("\0unauthenticated")  # brute force meets 429 before it meets many 401s
            raise
        self.limiter.check(client.name)
        namespace = request.query.get("namespace") or client.namespaces[0]
        if namespace not in client.namespaces:
            raise IngestError(403, f"namespace {namespace[:100]!r} is not allowed for this token; "
                                   f"allowed: {', '.join(client.namespaces)}", "namespace")
        return Target(client, namespace, _query(request, "pool", DNS_LABEL, 63),
                      _query(request, "priority_class", DNS_SUBDOMAIN))

    def _declared_size_ok(self, request: web.Request) -> int:
        """Refuse an announced oversize body before reading a byte of it; returns the limit."""
        limit = self.settings.ingest_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise IngestError(413, f"request body of {request.content_length} bytes is larger than the "
                                   f"limit of {limit} (KUBETRIAGE_INGEST_MAX_BODY_BYTES)")
        return limit

    async def _body(self, request: web.Request) -> bytes:
        limit = self._declared_size_ok(request)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise IngestError(413, f"request body larger than the limit of {limit} bytes "
                                   "(KUBETRIAGE_INGEST_MAX_BODY_BYTES)") from None

    def _respond(self, route: str, target: Target, results: list[JobResult],
                 extra: dict[str, Any] | None = None) -> web.Response:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.result] = counts.get(r.result, 0) + 1
            metrics.INGEST_JOBS.labels(route, r.result).inc()
        body: dict[str, Any] = {"namespace": target.namespace, **counts, **(extra or {}),
                                "jobs": [r.public() for r in results]}
        headers: dict[str, str] = {}
        failed = [r for r in results if r.result == "failed"]
        if any(r.retryable for r in failed):
            status = 503
            headers["Retry-After"] = str(RETRY_AFTER_API)
            body["error"] = next(r.detail for r in failed if r.retryable) + " (safe to retry: writes are idempotent)"
        elif failed:
            invalid = [r for r in failed if not r.conflict]
            status = 422 if invalid else 409  # a name collision is not the client's bad field
            body["error"] = (invalid or failed)[0].detail
            if invalid:
                body["field"] = invalid[0].blame
        else:
            status = 201 if counts.get("created") else 200
        body["status"] = status
        log.info("ingest %s from %s into %s -> %d %s", route, target.client.name, target.namespace, status,
                 " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no jobs")
        return web.json_response(body, status=status, headers=headers)

    # ------------------------------------------------------------ routes

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "configured": self.tokens.configured})

    async def alertmanager(self, request: web.Request) -> web.Response:
        target = self._target(request)
        JSON_BODY.check(request)
        payload = alertmanager.parse_payload(parse_json(await self._body(request)))
        built = []
        for i, alert in enumerate(payload.alerts):
            try:
                name, body = alertmanager.alert_job(alert, payload, self.priorities, pool=target.pool,
                                                    priority_class=target.priority_class,
                                                    submitted_by=target.client.name)
            except IngestError as exc:
                exc.field = f"alerts[{i}].{exc.field}" if exc.field else f"alerts[{i}]"
                exc.message = f"alerts[{i}]: {exc.message}"
                raise
            built.append((alert, name, body))
        if payload.truncatedAlerts:
            log.warning("ingest: Alertmanager truncated %d alert(s) of group %s (receiver max_alerts); "
                        "they cannot be triaged", payload.truncatedAlerts, payload.groupKey[:200])
        results = await run_bounded([
            lambda a=a, n=n, b=b: alertmanager.apply_alert(self.kube, target.namespace, a, n, b)
            for a, n, b in built
        ])
        return self._respond("alertmanager", target, results, {"truncatedAlerts": payload.truncatedAlerts})

    async def script_results(self, request: web.Request) -> web.Response:
        target = self._target(request)
        JSON_BODY.check(request)
        data = parse_json(await self._body(request))
        items = data if isinstance(data, list) else [data]
        if isinstance(data, list) and not 1 <= len(data) <= MAX_SCRIPT_RESULTS:
            raise IngestError(422, f"expected 1 to {MAX_SCRIPT_RESULTS} script results in the list, "
                                   f"got {len(data)}", "body")
        built: list[tuple[str, dict[str, Any]] | JobResult] = []
        for i, raw in enumerate(items):
            prefix = f"[{i}]" if isinstance(data, list) else ""
            if not isinstance(raw, dict):
                raise IngestError(422, f"{prefix or 'body'}: expected a JSON object with script_name and success",
                                  prefix or "body")
            try:
                item = ScriptResultIn.model_validate(raw)
            except ValidationError as exc:
                raise validation_error(exc, prefix) from None
            name, body = script_job(item, priority_class=target.priority_class, pool=target.pool)
            body["metadata"]["annotations"][SUBMITTED_BY] = target.client.name
            if item.success and not item.analyze:
                built.append(JobResult(name, "skipped", "the run succeeded; set analyze: true to triage it anyway"))
            else:
                built.append((name, body))
        results = await run_bounded([
            (lambda r=b: _done(r)) if isinstance(b, JobResult)
            else (lambda n=b[1]: create_job(self.kube, target.namespace, n))
            for b in built
        ])
        return self._respond("script-results", target, results)

    async def junit(self, request: web.Request) -> web.Response:
        target = self._target(request)
        opts = junit.UploadOptions(
            run=_query(request, "run", max_len=128) or "",
            script=_query(request, "script") or "",
            report_url=_query(request, "report_url", HTTP_URL, MAX_URL),
            attachments_url=_query(request, "attachments_url", HTTP_URL, MAX_URL - 256),
            commit=_query(request, "commit", max_len=64),
            priority_class=target.priority_class,
            pool=target.pool,
            submitted_by=target.client.name,
        )
        JUNIT_BODY.check(request)
        if request.content_type == "multipart/form-data":
            data = await self._upload(request)
        else:
            data = await self._body(request)
        if not data.strip():
            raise IngestError(400, "empty body: expected a JUnit XML report")
        jobs, summary = junit.report_jobs(data, opts)
        results = await run_bounded([
            lambda n=name, b=body: create_job(self.kube, target.namespace, b) for name, body, _ in jobs
        ])
        for result, (_, _, case) in zip(results, jobs, strict=True):
            result.extra["testCase"] = f"{case.classname}::{case.name}" if case.classname else case.name
        return self._respond("junit", target, results, {"summary": summary})

    async def _upload(self, request: web.Request) -> bytes:
        """The report from ``curl -F file=@junit.xml`` (the first file field if none is called ``file``)."""
        limit = self._declared_size_ok(request)
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise IngestError(413, f"upload larger than the limit of {limit} bytes") from None
        except ValueError as exc:
            raise IngestError(400, f"malformed multipart body: {exc}") from None
        files = [v for k, v in form.items() if isinstance(v, web.FileField) and k == "file"]
        files += [v for v in form.values() if isinstance(v, web.FileField)]
        if not files:
            raise IngestError(422, "multipart upload without a file: send the report as the 'file' field", "file")
        return files[0].file.read()


async def _done(result: JobResult) -> JobResult:
    return result


async def start_ingest(settings: Settings, kube: Kube, host: str | None = None) -> web.AppRunner | None:
    """Serve ingest on ``settings.ingest_port`` (all interfaces unless ``host``); None when the port is 0.

    A port that cannot be bound is logged, not fatal: the operator's own work
    (admission, scheduling, recording) must not stop because ingest cannot start.
    """
    if settings.ingest_port == 0:
        return None
    server = IngestServer(settings, kube)
    runner = web.AppRunner(server.app, access_log=None, handle_signals=False, shutdown_timeout=5,
                           logger=ProtocolLog(server_logger, {}))
    await runner.setup()
    site = web.TCPSite(runner, host, settings.ingest_port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("ingest: cannot listen on port %d: %s; alerts and script results will not be accepted",
                  settings.ingest_port, exc)
        await runner.cleanup()
        return None
    log.info("ingest listening on %s:%d (%s)", host or "*", settings.ingest_port, ROUTES)
    return runner


async def stop_ingest(runner: web.AppRunner | None) -> None:
    if runner is not None:
        await runner.cleanup()

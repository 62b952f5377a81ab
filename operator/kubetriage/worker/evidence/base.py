"""Evidence gatherers: one small interface, the HTTP client they share, and the runner that bounds them.

A gatherer asks one read-only monitoring API about one job and returns one ``Evidence``: a compact
summary, never raw data. The runner (``EvidenceRunner``) runs the pool's gatherers side by side before
the analyzers, each request under ``timeout`` seconds and all of them together under ``budget`` seconds,
and keeps a successful answer for ``cache_seconds`` per (namespace, source type, fingerprint), so an
alert storm of one fingerprint asks Prometheus once, not once per job. A gatherer that fails, or runs
out of budget, becomes ``Evidence(source, error=...)``: a verdict must say what it could not check.

``EndpointClient`` is how a gatherer talks HTTP: every request's URL passes the shared outbound-URL
policy at connect time (``kubetriage.analyzers.fetch.pin``: resolve, vet every address, connect to the
vetted one), answers are read under a byte cap, redirects are not followed and proxies from the
environment are ignored. Credentials (bearer or basic) and the CA come from the pool's Secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx

from kubetriage.analyzers.fetch import LookupFailed, Resolver, pin
from kubetriage.api import fingerprint
from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.evidence import Evidence
from kubetriage.api.urlpolicy import URLPolicy, URLRefused, describe
from kubetriage.infra import metrics

log = logging.getLogger("kubetriage.worker.evidence")

USER_AGENT = "kubetriage-evidence/0.1"
MAX_CACHE_ENTRIES = 2048
MAX_DETAIL = 200  # characters of a server's error message quoted in an evidence error


class GatherFailed(Exception):
    """A gatherer could not get its evidence; ``reason`` is for the verdict, ``kind`` a metric label."""

    def __init__(self, reason: str, kind: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One monitoring API as a worker reaches it (the pool's ``spec.evidence.<source>``)."""

    name: str  # "Prometheus", "Alertmanager": for messages
    field: str  # the pool field that configures it, for messages: "spec.evidence.prometheus"
    url: str
    policy: URLPolicy
    bearer_token: str = dataclasses.field(default="", repr=False)
    username: str = dataclasses.field(default="", repr=False)
    password: str = dataclasses.field(default="", repr=False)
    ca_pem: str = dataclasses.field(default="", repr=False)
    insecure_skip_verify: bool = False


def _tls(endpoint: Endpoint) -> ssl.SSLContext:
    if endpoint.insecure_skip_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cadata=endpoint.ca_pem) if endpoint.ca_pem.strip() \
            else ssl.create_default_context()
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{endpoint.field}.tls: the CA bundle is not PEM certificates ({exc}); fix the Secret "
                         "or ConfigMap it names") from None


class EndpointClient:
    """GET JSON from one endpoint, within the URL policy, a timeout and a byte cap."""

    def __init__(self, endpoint: Endpoint, timeout: float, *, resolver: Resolver | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._resolver = resolver
        self._base = endpoint.url.rstrip("/")
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        auth: httpx.BasicAuth | None = None
        if endpoint.bearer_token:
            headers["Authorization"] = f"Bearer {endpoint.bearer_token.strip()}"
        elif endpoint.username or endpoint.password:
            auth = httpx.BasicAuth(endpoint.username, endpoint.password)
        # trust_env=False: an HTTP(S)_PROXY from the environment would resolve the name itself and undo the pin
        self._client = httpx.AsyncClient(headers=headers, auth=auth, verify=_tls(endpoint), trust_env=False,
                                         follow_redirects=False, timeout=httpx.Timeout(timeout))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get_json(self, path: str, params: Sequence[tuple[str, str]], max_bytes: int) -> Any:
        """The decoded JSON answer of ``GET base+path?params``; ``GatherFailed`` saying why not."""
        ep = self.endpoint
        url = f"{self._base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self._base}{path}"
        try:
            pinned = await pin(url, ep.policy, resolver=self._resolver)
        except URLRefused as refused:
            hint = {"private": f"; for an in-cluster {ep.name} set {ep.field}.allowPrivateEndpoints: true",
                    "http": f"; for plain http set {ep.field}.allowHTTP: true"}.get(refused.opt_in or "", "")
            raise GatherFailed(f"{ep.name} URL {describe(ep.url)} refused by the outbound-URL policy, nothing "
                               f"sent: {refused.reason}{hint}", "refused") from None
        except LookupFailed as exc:
            raise GatherFailed(f"{ep.name} unreachable: {exc}", "unreachable") from None
        try:
            async with self._client.stream("GET", pinned.url, headers=pinned.headers,
                                           extensions=pinned.extensions) as response:
                body = await _read_capped(response, max_bytes, ep.name)
        except httpx.TimeoutException:
            raise GatherFailed(f"{ep.name} did not answer within {self.timeout:g}s", "timeout") from None
        except httpx.HTTPError as exc:
            raise GatherFailed(f"{ep.name} unreachable at {describe(ep.url)}: {type(exc).__name__}: "
                               f"{str(exc)[:MAX_DETAIL]}", "unreachable") from None
        if response.status_code != 200:
            raise _http_failure(ep, response.status_code, body)
        try:
            return json.loads(body)
        except ValueError:
            raise GatherFailed(f"{ep.name} answered something that is not JSON", "invalid") from None


async def _read_capped(response: httpx.Response, max_bytes: int, name: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise GatherFailed(f"{name}'s answer is {int(declared)} bytes, over the {max_bytes}-byte cap; not read",
                           "too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:  # stop reading: the rest never reaches memory
            raise GatherFailed(f"{name}'s answer exceeds the {max_bytes}-byte cap; not read", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _http_failure(ep: Endpoint, status: int, body: bytes) -> GatherFailed:
    detail = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(body[:65536])
        detail = str(data.get("error") or data.get("message") or "")
    detail = " ".join(detail.split())[:MAX_DETAIL]
    if status in (401, 403):
        return GatherFailed(f"{ep.name} answered {status}: check the credentials Secret named by {ep.field} "
                            "(bearerTokenSecretRef or basicAuth)", "http_error")
    if 300 <= status < 400:
        return GatherFailed(f"{ep.name} answered a redirect ({status}); redirects are not followed: set "
                            f"{ep.field}.url to the final address", "http_error")
    return GatherFailed(f"{ep.name} answered {status}" + (f": {detail}" if detail else ""), "http_error")


class Gatherer(Protocol):
    """One evidence source. ``gather`` returns None when it has nothing to say about this job."""

    source: str

    def key(self, request: AnalysisRequest) -> str:
        """What besides the job's fingerprint its answer depends on (cache key); "" for nothing."""
        ...

    async def gather(self, request: AnalysisRequest, now: float) -> Evidence | None: ...

    async def aclose(self) -> None: ...


def job_fingerprint(request: AnalysisRequest) -> str:
    """The fingerprint derived from the job's content, never the caller's ``source.fingerprint`` (a free
    claim: it must not let one alert's evidence be served to another)."""
    spec: dict[str, Any] = {"source": {"type": request.source.type}}
    if request.alert is not None:
        spec["alert"] = request.alert.wire()
    if request.script_result is not None:
        spec["scriptResult"] = request.script_result.wire()
    return fingerprint.derive(spec)


class EvidenceRunner:
    """Runs the pool's gatherers for one job: concurrently, bounded in time, cached briefly."""

    def __init__(self, gatherers: Sequence[Gatherer], *, budget: float, cache_seconds: float, pool: str) -> None:
        self.gatherers = list(gatherers)
        self.budget = budget
        self.cache_seconds = cache_seconds
        self.pool = pool
        self._cache: OrderedDict[tuple[str, ...], tuple[float, Evidence]] = OrderedDict()
        self._inflight: dict[tuple[str, ...], asyncio.Future[Evidence | None]] = {}

    async def aclose(self) -> None:
        for g in self.gatherers:
            await g.aclose()

    async def gather(self, request: AnalysisRequest) -> list[Evidence]:
        """Evidence from every gatherer that applies, in gatherer order; failures included, as errors.

        The budget never takes more than half the job's analysis deadline: the analyzers need the rest.
        """
        if not self.gatherers:
            return []
        budget = min(self.budget, request.deadline_seconds / 2)
        fp = job_fingerprint(request)
        tasks = [asyncio.ensure_future(self._one(g, request, fp)) for g in self.gatherers]
        _, pending = await asyncio.wait(tasks, timeout=budget)
        out: list[Evidence] = []
        for g, task in zip(self.gatherers, tasks, strict=True):
            if task in pending:
                task.cancel()
                metrics.EVIDENCE.labels(self.pool, g.source, "budget").inc()
                out.append(Evidence(source=g.source, error=f"no answer within the {budget:g}s evidence budget"))
                continue
            found = task.result()
            if found is not None:
                out.append(found)
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return out

    async def _one(self, g: Gatherer, request: AnalysisRequest, fp: str) -> Evidence | None:
        key = (request.namespace, str(request.source.type), fp, g.source, g.key(request))
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            metrics.EVIDENCE.labels(self.pool, g.source, "cached").inc()
            return hit[1]
        running = self._inflight.get(key)
        if running is not None:  # the same question is being asked right now: wait for its answer
            return await asyncio.shield(running)
        future: asyncio.Future[Evidence | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            found = await self._ask(g, request)  # never raises but CancelledError: failures are evidence
        except asyncio.CancelledError:
            # this job's budget ran out; a job waiting on the same question gets no answer either
            future.set_result(Evidence(source=g.source, error="no answer within the evidence budget"))
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(found)
        if found is not None and found.error is None and self.cache_seconds > 0:
            self._cache[key] = (time.monotonic() + self.cache_seconds, found)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return found

    async def _ask(self, g: Gatherer, request: AnalysisRequest) -> Evidence | None:
        t0 = time.monotonic()
        try:
            found = await g.gather(request, time.time())
        except GatherFailed as exc:
            metrics.EVIDENCE.labels(self.pool, g.source, exc.kind).inc()
            log.info("%s/%s: %s evidence unavailable: %s", request.namespace, request.name, g.source, exc.reason)
            return Evidence(source=g.source, error=exc.reason[:512])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a gatherer bug must cost its evidence, never the verdict
            metrics.EVIDENCE.labels(self.pool, g.source, "error").inc()
            log.exception("%s evidence for %s/%s failed", g.source, request.namespace, request.name)
            return Evidence(source=g.source, error=f"gatherer failed: {type(exc).__name__}"[:512])
        finally:
            metrics.EVIDENCE_SECONDS.labels(self.pool, g.source).observe(time.monotonic() - t0)
        metrics.EVIDENCE.labels(self.pool, g.source, "ok" if found is not None else "skipped").inc()
        return found


def label_set(request: AnalysisRequest) -> dict[str, str]:
    """The alert's labels as Alertmanager has them: its labels plus ``alertname``."""
    assert request.alert is not None
    labels: Mapping[str, str] = request.alert.labels or {}
    return {**labels, "alertname": request.alert.name}

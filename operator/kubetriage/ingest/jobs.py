"""What ingest and the CLI share: request models, job names, truncation, and idempotent job creation.

Both paths into the cluster (the HTTP ingest server and ``kubetriage submit``
without ``--url``) build TriageJobs with these functions, so a job submitted
either way gets the same deterministic name, and a re-send is a no-op either way.

Input rule, applied by every mapping: *identity* fields (names, ids, labels,
URLs) are validated and a bad one is refused with 422 naming the field;
*free-text evidence* (error messages, logs, annotation text, system-out) is
cut to the CRD limits, because losing a failure because its stack trace was
long would be worse than a shorter stack trace. Logs keep their tail: that is
where the error is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from kubetriage.api.keys import INGEST_KEY, INGEST_LABEL, VERDICT
from kubetriage.api.models import (
    API_VERSION,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    FINGERPRINT,
    HTTP_URL,
    MAX_ERROR,
    MAX_HISTORY,
    MAX_LOGS,
    MAX_NAME,
    MAX_SCREENSHOTS,
    MAX_URL,
    AttemptRecord,
    Screenshot,
    ScriptResult,
    Source,
    SourceType,
    TriageJobSpec,
)

if TYPE_CHECKING:
    from kubetriage.infra.kube import Kube


MAX_JOB_NAME = 63  # a DNS label, though TriageJob names may be longer: short names read well in kubectl
CREATE_CONCURRENCY = 8


class IngestError(Exception):
    """A request ingest refuses; ``status`` is the HTTP code, ``field`` the offending input field (422)."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.details = details or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "status": self.status}
        if self.field is not None:
            out["field"] = self.field
        if self.details:
            out["errors"] = self.details
        return out


def field_path(loc: Iterable[int | str], prefix: str = "") -> str:
    """pydantic's loc tuple as the path a user can find in their payload: ``alerts[0].labels``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(exc: ValidationError, prefix: str = "") -> IngestError:
    """422 naming the first bad field; all of them (up to 10) in ``errors``."""
    errors = exc.errors(include_url=False, include_input=False)
    details = [{"field": field_path(e["loc"], prefix), "message": e["msg"].removeprefix("Value error, ")}
               for e in errors[:10]]
    first = details[0]
    return IngestError(422, f"{first['field']}: {first['message']}", first["field"], details=details)


# --------------------------------------------------------------------------- names and text


def slug(text: str, max_len: int, fallback: str = "x") -> str:
    """Lowercase alphanumerics and single dashes: a piece of a DNS-1123 name."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or fallback


def short_hash(*parts: str, length: int = 8) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:length]


def label_value(text: str) -> str:
    """A valid label value (63 chars of ``[A-Za-z0-9._-]``, alphanumeric at both ends) for lookups by selector."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", s)


def truncate(text: str | None, limit: int, keep: Literal["head", "tail"] = "head") -> str | None:
    """Free text cut to ``limit`` characters, saying so in the text (the analyzer should know it saw part)."""
    if text is None or len(text) <= limit:
        return text
    room = limit - 80  # the marker is shorter than 80 characters
    marker = f"\n…[{len(text) - room} characters cut by kubetriage ingest]…\n"
    return text[:room] + marker if keep == "head" else marker + text[-room:]


def ingest_key(*parts: Any) -> str:
    """The identity a job name is derived from, as a sha256 for the ``kubetriage.io/ingest-key`` annotation.

    Names are short and partly lossy (lowercased, slugged, hashed), so two different inputs can meet on one
    name; this full hash of the exact input is what tells a re-send (same key) from a collision (another key).
    """
    text = json.dumps(parts, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def job_body(name: str, spec: TriageJobSpec, labels: dict[str, str],
             annotations: dict[str, str] | None = None, *, key: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "TriageJob",
        "metadata": {"name": name, "labels": labels, "annotations": {**(annotations or {}), INGEST_KEY: key}},
        "spec": spec.wire(),
    }


# --------------------------------------------------------------------------- creation


@dataclass
class JobResult:
    """What happened to one job of a request; ``result`` is created, exists, resolved, skipped or failed."""

    name: str
    result: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    retryable: bool = False
    blame: str = "body"  # the input field to blame when this failure is the client's (422)
    conflict: bool = False  # the name is taken by a different input (409)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "result": self.result}
        if self.detail:
            out["detail"] = self.detail
        out.update(self.extra)
        return out


def api_failure(name: str, exc: Exception, namespace: str) -> JobResult:
    """An API answer as the client should see it: their fault (422) or ours / transient (503, retry)."""
    from kubetriage.infra.kube import ApiError  # here, not at the top: the CLI imports this module and starts fast
    if isinstance(exc, ApiError):
        if exc.status == 404 and "namespaces" in exc.message:
            return JobResult(name, "failed", f"namespace {namespace!r} does not exist", blame="namespace")
        if exc.status in (400, 422):
            return JobResult(name, "failed", f"the API server refused the job: {exc.message[:500]}")
        return JobResult(name, "failed", f"Kubernetes API error {exc.status}: {exc.message[:300]}", retryable=True)
    return JobResult(name, "failed", f"Kubernetes API unreachable: {type(exc).__name__}: {exc}"[:400],
                     retryable=True)


def describe(job: dict[str, Any]) -> str:
    """What a TriageJob is about, in a few words, for a message that names two jobs."""
    spec = job.get("spec") or {}
    source = spec.get("source") or {}
    if spec.get("alert"):
        alert = spec["alert"]
        labels = ",".join(f"{k}={v}" for k, v in sorted((alert.get("labels") or {}).items()))
        return f"alert {alert.get('name')!r} {{{labels[:300]}}} starting {alert.get('startsAt')}"
    sr = spec.get("scriptResult") or {}
    what = f"script result id {source['id']!r}" if source.get("id") is not None else "script result"
    test = f", test {sr['testCase'][:200]!r}" if sr.get("testCase") else ""
    return f"{what} of script {str(sr.get('scriptName'))[:200]!r}{test}"


def same_input(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether an existing job with our name came from the same input (a re-send) or a different one (a collision)."""
    key = (theirs.get("metadata") or {}).get("annotations", {}).get(INGEST_KEY)
    if key:
        return bool(key == ours["metadata"]["annotations"].get(INGEST_KEY))
    # a job without the key (made by kubectl, or by a kubetriage before the key existed): compare what the
    # spec says about its origin; where it says nothing that tells them apart, it is taken for a re-send
    mine, spec = ours["spec"], theirs.get("spec") or {}
    if (mine.get("source") or {}).get("type") != (spec.get("source") or {}).get("type"):
        return False
    if "alert" in mine:
        return bool((mine["alert"].get("labels") or {}) == ((spec.get("alert") or {}).get("labels") or {}))
    return bool((mine.get("source") or {}).get("id") == (spec.get("source") or {}).get("id"))


def collision(name: str, namespace: str, ours: dict[str, Any], theirs: dict[str, Any]) -> JobResult:
    return JobResult(name, "failed", f"name collision: TriageJob {name} already exists for {describe(theirs)}, "
                                     f"so {describe(ours)} was not created (nothing was overwritten). Once that job "
                                     f"has its verdict, 'kubectl delete triagejob {name} -n {namespace}' frees the "
                                     "name and sending this one again creates it. Between two jobs made by this "
                                     "version it is a kubetriage bug: please report it",
                     conflict=True)


async def create_job(kube: Kube, namespace: str, body: dict[str, Any]) -> JobResult:
    """POST the job; on 409 AlreadyExists, ``exists`` for a re-send of the same input, a collision otherwise."""
    from kubetriage.infra.kube import ApiError, triagejob_path

    name = body["metadata"]["name"]
    # A human verdict is a person's word (kubetriage verdict set): nothing ingested carries one, whatever built it.
    meta = body["metadata"]
    meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(VERDICT)}
    for _ in range(2):  # twice: the job we collided with may be deleted before we read it
        try:
            await kube.create(triagejob_path(namespace), body)
            return JobResult(name, "created")
        except ApiError as exc:
            if exc.status != 409:
                return api_failure(name, exc, namespace)
        except (OSError, TimeoutError) as exc:  # a Kube that lets transport errors through
            return api_failure(name, exc, namespace)
        try:
            existing = await kube.get(triagejob_path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                continue
            return api_failure(name, exc, namespace)
        except (OSError, TimeoutError) as exc:
            return api_failure(name, exc, namespace)
        if same_input(body, existing):
            return JobResult(name, "exists")
        return collision(name, namespace, body, existing)
    return JobResult(name, "failed", "the job was created and deleted by someone else while we created it; "
                                     "safe to retry", retryable=True)


async def run_bounded(calls: list[Callable[[], Awaitable[JobResult]]]) -> list[JobResult]:
    """Run the per-job API calls a few at a time: a big upload is quick without flooding the API server."""
    sem = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one(call: Callable[[], Awaitable[JobResult]]) -> JobResult:
        async with sem:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


# --------------------------------------------------------------------------- script results


DATA_URI = re.compile(r"^data:(image/(?:png|jpeg|webp|gif));base64,(.*)$", re.S)


def _id_text(value: Any) -> Any:
    """Row ids arrive as numbers or strings; a bool is neither (``True`` must not become row 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _screenshot_items(value: Any) -> Any:
    """Screenshots as the runner sends them: URL strings, ``data:image/...;base64,`` URIs, or objects."""
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            out.append(item)
            continue
        m = DATA_URI.match(item)
        if m:
            out.append({"name": f"screenshot-{i + 1}", "data": m.group(2), "mediaType": m.group(1)})
        elif re.match(HTTP_URL, item):
            out.append({"url": item})
        else:
            raise ValueError(f"screenshots[{i}]: expected an http(s) URL, a data:image/...;base64, URI or an object")
    return out


class ScriptResultIn(BaseModel):
    """A script/test result as the original system's ``script_results`` row and its runner post it.

    Unknown fields are ignored so the runner can post its row as is (created_at,
    checked, ...); the fields below are checked with their real types (a string
    where a bool belongs is a 422, not a guess).
    """

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    id: Annotated[Annotated[str, Field(min_length=1, max_length=128)] | None, BeforeValidator(_id_text)] = None
    script_name: str = Field(min_length=1, max_length=MAX_NAME)
    success: StrictBool
    error_msg: str | None = None
    html_report_r2_url: str | None = Field(None, max_length=MAX_URL, pattern=HTTP_URL)
    screenshots: Annotated[list[Screenshot] | None, BeforeValidator(_screenshot_items)] = Field(
        None, max_length=MAX_SCREENSHOTS)
    logs: str | None = None
    logs_excerpt: str | None = None
    duration: float | None = Field(None, ge=0, le=7 * 24 * 3600)
    attempt: int | None = Field(None, ge=1, le=1000)
    test_case: str | None = Field(None, max_length=MAX_NAME * 2)
    commit: str | None = Field(None, max_length=64)
    history: list[AttemptRecord] | None = Field(None, max_length=MAX_HISTORY)
    fingerprint: str | None = Field(None, max_length=128, pattern=FINGERPRINT)
    priority_class: str | None = Field(None, max_length=MAX_NAME, pattern=DNS_SUBDOMAIN)
    pool: str | None = Field(None, max_length=63, pattern=DNS_LABEL)
    analyze: StrictBool = Field(False, description="Triage a successful run too (default: failures only).")


def script_job(item: ScriptResultIn, *, priority_class: str | None = None,
               pool: str | None = None) -> tuple[str, dict[str, Any]]:
    """The TriageJob for one script result: ``sr-<script>-<id>``, or a hash of the payload without an id.

    Only an id that is already a DNS label piece without dashes is used as it is: lowercasing ``AbC1`` would
    meet ``abc1``, and a dash would blur where the script ends (``checkout`` + ``e2e-1`` against
    ``checkout-e2e`` + ``1``). Any other id gets a hash of its exact text. Ids that were used as they are before
    keep their names, so re-sends across an upgrade stay no-ops.
    """
    if item.id is None:
        # no row id: the same payload posted twice is the same run
        payload = json.dumps(item.model_dump(mode="json"), sort_keys=True)
        suffix = short_hash(payload, length=12)
        key = ingest_key("script-result", payload)
    else:
        key = ingest_key("script-result", item.script_name, item.id)
        if re.fullmatch(r"[a-z0-9]{1,24}", item.id):
            suffix = item.id
        elif re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,22}[A-Za-z0-9])?", item.id):  # readable, and exact
            suffix = f"{slug(item.id, 14)}-{short_hash(item.id, length=10)}"
        else:
            suffix = short_hash(item.id, length=12)
    name = f"sr-{slug(item.script_name, MAX_JOB_NAME - 4 - len(suffix), 'script')}-{suffix}"
    logs = item.logs_excerpt if item.logs_excerpt is not None else item.logs
    try:
        spec = TriageJobSpec(
            source=Source(type=SourceType.SCRIPT_RESULT, id=None if item.id is None else str(item.id),
                          fingerprint=item.fingerprint),
            priority_class_name=priority_class or item.priority_class,
            pool=pool or item.pool,
            script_result=ScriptResult(
                script_name=item.script_name,
                success=item.success,
                test_case=item.test_case,
                error_message=truncate(item.error_msg, MAX_ERROR),
                logs_excerpt=truncate(logs, MAX_LOGS, keep="tail"),
                report_url=item.html_report_r2_url,
                screenshots=item.screenshots or None,
                duration_seconds=item.duration,
                attempt=item.attempt,
                commit=item.commit,
                history=item.history,
            ),
        )
    except ValidationError as exc:
        raise validation_error(exc, "spec") from None
    return name, job_body(name, spec, {INGEST_LABEL: "script-result"}, key=key)

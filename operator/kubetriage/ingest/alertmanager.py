"""Alertmanager webhook (payload version 4) -> one TriageJob per alert.

Names are deterministic: ``am-<alertname>-<fingerprint>-<hash of startsAt>``.
Alertmanager re-sends a group's notification on every ``group_interval`` change
and every ``repeat_interval``, and retries failed deliveries; all of those map
to the same name and hit 409 AlreadyExists, which is success (``exists``). A new
firing episode after a resolve has a new ``startsAt``, hence a new job.

Resolved alerts: the spec is immutable by design, so a ``resolved`` notification
marks the existing job's *metadata* — label ``kubetriage.io/alert-status=resolved``
and annotation ``kubetriage.io/resolved-at=<endsAt>`` — whatever its phase (the
marker is informational once analysis has started; before that the operator
hands it to the analyzers as evidence: an alert that resolved by itself within
minutes is a flapping/false-positive signal, not proof, so the job is still
analysed). A resolved alert whose firing notification never reached us (ingest
was down, or the alert was shorter than ``group_wait``) is created with
``alert.status: resolved`` and analysed with that evidence.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetriage.api.keys import (
    ALERT_FINGERPRINT_LABEL,
    ALERT_STATUS_LABEL,
    GROUP_KEY,
    INGEST_LABEL,
    RESOLVED_AT,
    SUBMITTED_BY,
)
from kubetriage.api.models import (
    HTTP_URL,
    MAX_ANNOTATION_VALUE,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    MAX_SHORT,
    MAX_URL,
    Alert,
    AlertStatus,
    Phase,
    Source,
    SourceType,
    TriageJobSpec,
)
from kubetriage.api.timeutil import rfc3339
from kubetriage.ingest.jobs import (
    IngestError,
    JobResult,
    api_failure,
    collision,
    create_job,
    ingest_key,
    job_body,
    same_input,
    short_hash,
    slug,
    truncate,
    validation_error,
)

if TYPE_CHECKING:
    from kubetriage.infra.kube import Kube

MAX_ALERTS = 1000  # per notification; Alertmanager's max_alerts is unlimited by default, the body cap bounds it anyway

LabelKey = Annotated[str, Field(min_length=1, max_length=MAX_SHORT)]
WebhookLabels = Annotated[
    dict[LabelKey, Annotated[str, Field(max_length=MAX_LABEL_VALUE)]], Field(max_length=MAX_LABELS)]
# annotation text is evidence, cut to size later; only its key count and keys are identity
WebhookAnnotations = Annotated[dict[LabelKey, str], Field(max_length=MAX_LABELS)]


class WebhookAlert(BaseModel):
    """One alert of a notification. Unknown fields are ignored: new ones appear under the same version.

    Fields keep Alertmanager's camelCase names so a 422 names the field as the sender wrote it.
    """

    model_config = ConfigDict(extra="ignore")

    status: AlertStatus
    labels: WebhookLabels
    annotations: WebhookAnnotations = Field(default_factory=dict)
    startsAt: dt.datetime
    endsAt: dt.datetime | None = None
    generatorURL: str = Field("", max_length=MAX_URL)
    fingerprint: str = Field("", max_length=64)  # not used: recomputed from the labels (see fingerprint_of)


class WebhookPayload(BaseModel):
    """Alertmanager's webhook body; ``status`` and the group fields are informational here."""

    model_config = ConfigDict(extra="ignore")

    version: Literal["4"] = "4"
    status: AlertStatus | None = None
    receiver: str = Field("", max_length=MAX_NAME)
    groupKey: str = Field("", max_length=8192)
    truncatedAlerts: int = Field(0, ge=0)
    externalURL: str = Field("", max_length=MAX_URL)
    alerts: list[WebhookAlert] = Field(max_length=MAX_ALERTS)


def parse_payload(data: Any) -> WebhookPayload:
    try:
        return WebhookPayload.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


FNV64_OFFSET, FNV64_PRIME, U64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fingerprint_of(alert: WebhookAlert) -> str:
    """The alert's fingerprint, computed from its labels the way Alertmanager computes it.

    That is Prometheus's ``LabelSet.Fingerprint``: FNV-1a 64 over the sorted names and values, each followed by
    the byte 0xff, as 16 hex digits. So for a real Alertmanager this equals the ``fingerprint`` it sends, and job
    names stay what they were; but the sender's value is not trusted: two alerts that claim one fingerprint
    with different labels (a hand-made payload) must not meet on one job name, where one of them would be lost.
    Pure Python costs about 0.3 s per MiB of labels, which the body size cap bounds.
    """
    h = FNV64_OFFSET
    for key in sorted(alert.labels):  # code point order = UTF-8 byte order, which is how Go sorts them
        for byte in key.encode("utf-8", "surrogatepass") + b"\xff" + alert.labels[key].encode(
                "utf-8", "surrogatepass") + b"\xff":
            h = ((h ^ byte) * FNV64_PRIME) & U64
    return f"{h:016x}"


def episode_key(alert: WebhookAlert) -> str:
    """The ingest key of one firing episode of one alert: its exact labels and start (not its changing annotations)."""
    return ingest_key("alert", sorted(alert.labels.items()), rfc3339(alert.startsAt))


def job_name(alert: WebhookAlert) -> str:
    """``am-<alertname>-<fingerprint>-<startsAt hash>``: one name per firing episode of one alert."""
    starts = rfc3339(alert.startsAt)
    return f"am-{slug(alert.labels.get('alertname', ''), 30, 'alert')}-{fingerprint_of(alert)}-{short_hash(starts)}"


def alert_job(alert: WebhookAlert, payload: WebhookPayload | None, priorities: dict[str, str], *,
              priority_class: str | None = None, pool: str | None = None,
              submitted_by: str | None = None) -> tuple[str, dict[str, Any]]:
    """The TriageJob for one webhook alert (labels and annotations mapped into ``spec.alert``)."""
    name = job_name(alert)
    labels = alert.labels
    if len(labels.get("alertname", "")) > MAX_NAME:
        raise IngestError(422, f"labels.alertname: longer than {MAX_NAME} characters", "labels.alertname")
    severity = labels.get("severity")
    resolved = alert.status == AlertStatus.RESOLVED
    generator = alert.generatorURL if re.match(HTTP_URL, alert.generatorURL) else None
    try:
        spec = TriageJobSpec(
            source=Source(type=SourceType.ALERT),
            priority_class_name=priority_class or (priorities.get(severity) if severity else None),
            pool=pool,
            alert=Alert(
                name=labels.get("alertname") or "unnamed",
                status=alert.status,
                severity=severity[:64] if severity else None,
                labels=dict(labels),
                annotations={k: truncate(v, MAX_ANNOTATION_VALUE) or "" for k, v in alert.annotations.items()},
                starts_at=alert.startsAt,
                ends_at=alert.endsAt if resolved else None,
                host=(labels.get("host") or labels.get("instance") or "")[:MAX_NAME] or None,
                device=(labels.get("device") or "")[:MAX_NAME] or None,
                generator_url=generator,
            ),
        )
    except ValidationError as exc:
        raise validation_error(exc, "spec") from None
    meta_labels = {
        INGEST_LABEL: "alertmanager",
        ALERT_STATUS_LABEL: alert.status.value,
        ALERT_FINGERPRINT_LABEL: fingerprint_of(alert),
    }
    annotations: dict[str, str] = {}
    if payload is not None and payload.groupKey:
        annotations[GROUP_KEY] = payload.groupKey[:1024]
    if resolved:
        annotations[RESOLVED_AT] = resolved_at(alert)
    if submitted_by:
        annotations[SUBMITTED_BY] = submitted_by
    return name, job_body(name, spec, meta_labels, annotations, key=episode_key(alert))


def resolved_at(alert: WebhookAlert) -> str:
    """When Alertmanager says the alert ended (its ``endsAt``), else now."""
    ends = alert.endsAt
    if ends is None or ends.year < 2000:  # Go's zero time "0001-01-01T00:00:00Z"
        ends = dt.datetime.now(dt.UTC)
    return rfc3339(ends, compact=True)  # people read this annotation; the operator parses either form


async def apply_alert(kube: Kube, namespace: str, alert: WebhookAlert, name: str,
                      body: dict[str, Any]) -> JobResult:
    """Create a firing alert's job; mark (or create) a resolved one. Idempotent: safe for every re-send."""
    from kubetriage.infra.kube import ApiError, triagejob_path  # lazily: the CLI imports this module and starts fast

    if alert.status == AlertStatus.FIRING:
        return await create_job(kube, namespace, body)
    path = triagejob_path(namespace, name)
    try:
        current = await kube.get(path)
    except ApiError as exc:
        if exc.status != 404:
            return api_failure(name, exc, namespace)
        created = await create_job(kube, namespace, body)
        if created.result != "exists":  # created, or failed
            created.extra["alertStatus"] = "resolved"
            return created
        current = await kube.get(path)  # raced with the firing notification: mark the job it created
    except (OSError, TimeoutError) as exc:  # a Kube that lets transport errors through
        return api_failure(name, exc, namespace)
    if not same_input(body, current):  # never mark another alert's job resolved
        return collision(name, namespace, body, current)
    meta = current.get("metadata") or {}
    phase = (current.get("status") or {}).get("phase") or ""
    started = phase not in ("", Phase.PENDING.value, Phase.QUEUED.value)
    extra = {"alertStatus": "resolved", "phase": phase, "started": started}
    when = body["metadata"]["annotations"].get(RESOLVED_AT) or resolved_at(alert)
    if (meta.get("labels") or {}).get(ALERT_STATUS_LABEL) == "resolved" and RESOLVED_AT in (
            meta.get("annotations") or {}):
        return JobResult(name, "exists", extra=extra)
    patch = {"metadata": {"labels": {ALERT_STATUS_LABEL: "resolved"}, "annotations": {RESOLVED_AT: when}}}
    try:
        await kube.merge_patch(path, patch)
    except (ApiError, OSError, TimeoutError) as exc:
        return api_failure(name, exc, namespace)
    return JobResult(name, "resolved", extra=extra)

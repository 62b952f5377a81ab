"""Planning: the ``status.actions`` entries a verdict gets, written in the same status write as the verdict.

Recording (an analyzer's verdict) and overrides (a human's) call ``for_verdict`` / ``for_human_verdict``
before their one status write, so a job no policy acts on costs no write more, and a job a policy acts
on carries its plan durably from the moment its verdict exists: ``Pending`` entries are what the
executor then does (after a crash too), ``Shadow`` and ``Skipped`` ones are final. ``announce`` adds the
Event and metrics of entries that are final at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from kubetriage.api import policy as pol
from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import ActionResult, JobAction, TriageJobSpec, TriagePoolSpec, Verdict
from kubetriage.api.timeutil import now
from kubetriage.controller.actions.policies import ensure_loaded
from kubetriage.controller.runtime import Runtime
from kubetriage.infra import metrics
from kubetriage.infra.kube import ApiError

log = logging.getLogger("kubetriage.controller.actions")


def identity_labels(rt: Runtime, pool_key: str | None) -> tuple[str, ...] | None:
    """The job's pool's identity labels (what names an alert's target); None: the default set."""
    pool = rt.pools.get(pool_key or "")
    if pool is None:
        return None
    with contextlib.suppress(ValidationError):
        labels = TriagePoolSpec.model_validate(pool.spec).analyzer.identity_labels
        return tuple(labels) if labels else None
    return None


async def for_verdict(rt: Runtime, namespace: str, uid: str, payload: str | None, verdict: Verdict,
                      pool_key: str | None, existing: Sequence[JobAction] = ()) -> list[JobAction]:
    """New entries for an analyzer's verdict on a job queued with ``payload`` (its redacted request)."""
    await ensure_loaded(rt)
    policies = rt.policies.for_namespace(namespace)
    if not policies or not payload:
        return []
    try:
        request = AnalysisRequest.model_validate_json(payload)
    except ValidationError:
        return []
    return pol.plan(policies, request, verdict, uid=uid, now=now(), rules=rt.rules.for_namespace(namespace),
                    identity_labels=identity_labels(rt, pool_key), existing=existing)


async def for_human_verdict(rt: Runtime, body: dict[str, Any], verdict: Verdict) -> list[JobAction] | None:
    """The job's whole ``status.actions`` with the human verdict's entries added; None when nothing is new."""
    await ensure_loaded(rt)
    meta, status = body["metadata"], body.get("status") or {}
    policies = rt.policies.for_namespace(meta["namespace"])
    if not policies:
        return None
    try:
        spec = TriageJobSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None
    request = rt.redactor(status.get("pool")).request(AnalysisRequest(
        uid=meta["uid"], name=meta["name"], namespace=meta["namespace"], source=spec.source, alert=spec.alert,
        script_result=spec.script_result))
    existing = pol.parse_actions(status.get("actions"))
    new = pol.plan(policies, request, verdict, uid=meta["uid"], now=now(),
                   rules=rt.rules.for_namespace(meta["namespace"]),
                   identity_labels=identity_labels(rt, status.get("pool")), existing=existing)
    return pol.merge(existing, new) if new else None


def mode_of(rt: Runtime, namespace: str, entry: JobAction) -> str:
    found = rt.policies.get(namespace, entry.policy)
    return str(found.spec.mode) if found else "unknown"


async def announce(rt: Runtime, obj: dict[str, Any], entries: Sequence[JobAction]) -> None:
    """Metrics for every entry final at planning (Shadow, Skipped), and one Event saying what they are."""
    ns = obj["metadata"]["namespace"]
    final = [e for e in entries if e.result in (ActionResult.SHADOW.value, ActionResult.SKIPPED.value)]
    for e in final:
        metrics.ACTIONS.labels(e.action, mode_of(rt, ns, e), e.result).inc()
    if not final:
        return
    shadow = any(e.result == ActionResult.SHADOW.value for e in final)
    text = "; ".join(f"{e.policy}: {e.message}" for e in final)
    with contextlib.suppress(ApiError):
        await rt.kube.event(obj, "PolicyShadow" if shadow else "ActionSkipped", text)

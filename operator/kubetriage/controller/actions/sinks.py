"""The one interface every action sink implements, and what a sink gets to work with.

A sink does one thing for one ``status.actions`` entry (create or renew a silence, lift one, post a
notification) and says how it went: ``Done`` (the message, and for a silence its id and end), or it raises
``ActionFailed`` (``retry`` when a later try may work) or ``ActionSkipped`` (it must not be done at all).
The executor (``controller.actions.executor``) owns retries, status writes, Events and metrics, so a sink
is only the protocol of its peer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol

from kubetriage.api.contract import TeamRule
from kubetriage.api.models import JobAction, TriagePoolSpec, Verdict
from kubetriage.api.policy import Policy
from kubetriage.api.redact import Redactor
from kubetriage.infra.config import Settings


class ActionSkipped(Exception):
    """The action must not be done (a neverDiscard rule guards the job now); the message says why."""


@dataclass(frozen=True)
class Context:
    settings: Settings
    job: dict[str, Any]  # the TriageJob as just read from the API server
    entry: JobAction
    policy: Policy | None  # None: deleted since the entry was planned (only lifting a silence goes on)
    verdict: Verdict | None
    pool: TriagePoolSpec | None  # the job's pool, for its identity labels and its Alertmanager
    rules: list[TeamRule]  # the TriageRules of the job's namespace as the operator knows them now
    redact: Redactor
    now: dt.datetime

    @property
    def namespace(self) -> str:
        return str(self.job["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.job["metadata"]["name"])


@dataclass(frozen=True)
class Done:
    message: str
    silence_id: str | None = None
    silence_until: dt.datetime | None = None


class Sink(Protocol):
    action: str

    async def run(self, ctx: Context) -> Done: ...


def notification_payload(ctx: Context) -> dict[str, Any]:
    """What a webhook receives (and a Slack message is written from): the verdict and what it is about.

    Free text is redacted with the pool's patterns, as everywhere the verdict leaves the operator.
    """
    meta, spec, st = ctx.job["metadata"], ctx.job.get("spec") or {}, ctx.job.get("status") or {}
    source = spec.get("source") or {}
    v = ctx.verdict
    out: dict[str, Any] = {
        "type": "kubetriage.verdict",
        "idempotencyKey": ctx.entry.key,
        "policy": ctx.policy.name if ctx.policy else ctx.entry.policy,
        "job": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
        "verdict": None if v is None else {
            "classification": v.classification, "discard": v.discard, "confidence": v.confidence,
            "reason": ctx.redact(v.reason), "analyzer": v.analyzer, "checkType": v.check_type,
        },
        "source": {"type": source.get("type"), "id": source.get("id"), "fingerprint": st.get("fingerprint")},
        "completedAt": st.get("completedAt"),
    }
    alert, script = spec.get("alert"), spec.get("scriptResult")
    if alert:
        labels = {k: ctx.redact(str(val)) for k, val in (alert.get("labels") or {}).items()}
        out["alert"] = {"name": alert.get("name"), "severity": labels.get("severity") or alert.get("severity"),
                        "status": alert.get("status", "firing"), "labels": labels}
    if script:
        out["script"] = {"name": script.get("scriptName"), "testCase": script.get("testCase"),
                         "commit": script.get("commit")}
    return out


def subject(payload: dict[str, Any]) -> str:
    """One line naming what the verdict is about, for chat messages."""
    if "alert" in payload:
        a = payload["alert"]
        return f"alert {a['name']}" + (f" ({a['severity']})" if a.get("severity") else "")
    if "script" in payload:
        s = payload["script"]
        return f"test {s['name']}" + (f" / {s['testCase']}" if s.get("testCase") else "")
    return "job"

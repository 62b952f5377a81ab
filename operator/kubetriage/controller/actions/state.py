"""What the operator keeps in memory about TriagePolicies and their actions (held by ``Runtime``).

Everything here can be rebuilt from the API server: the policies from their watch, the work from the jobs'
``status.actions`` (kopf lists every job at start, and each event is looked at), the silences held from the
same entries. So a restart or a standby taking over loses nothing but retry counters and timers: an action
still ``Pending`` is tried again, with the same idempotency key.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetriage.api.models import TriagePolicySpec
from kubetriage.api.policy import Policy


class PolicyCache:
    """The TriagePolicies of each namespace. A policy only ever acts on jobs of its own namespace."""

    def __init__(self) -> None:
        self._by_ns: dict[str, dict[str, Policy]] = {}
        self.written: dict[str, int | None] = {}  # policy uid -> generation whose condition this replica wrote
        self.loaded = False
        self.lock = asyncio.Lock()

    def observe(self, body: dict[str, Any]) -> Policy | str:
        """Cache the policy as it is now; the reason it cannot be used when it does not validate."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            spec = TriagePolicySpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:  # the CRD validates the same schema: only a CRD newer than this operator
            self.forget(ns, name)
            first = exc.errors()[0]
            return f"spec.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        policy = Policy(ns, name, spec)
        self._by_ns.setdefault(ns, {})[name] = policy
        return policy

    def forget(self, namespace: str, name: str, uid: str | None = None) -> None:
        found = self._by_ns.get(namespace)
        if found is not None:
            found.pop(name, None)
            if not found:
                del self._by_ns[namespace]
        if uid is not None:
            self.written.pop(uid, None)

    def for_namespace(self, namespace: str) -> list[Policy]:
        return sorted((self._by_ns.get(namespace) or {}).values(), key=lambda p: p.name)

    def get(self, namespace: str, name: str) -> Policy | None:
        return (self._by_ns.get(namespace) or {}).get(name)

    def silences_in(self, namespace: str) -> bool:
        return any(p.spec.silence is not None for p in (self._by_ns.get(namespace) or {}).values())


Target = tuple[tuple[str, str], ...]  # an alert's silence matchers without severity (``SilenceSpec.target``)


@dataclass
class Due:
    """A job with action work (a Pending entry, or a silence to lift), and when to look at it next."""

    namespace: str
    name: str
    not_before: float = 0.0  # event-loop time


@dataclass(frozen=True)
class Orphan:
    """A silence whose job a user deleted: it is lifted, and the result goes to an Event and the metrics."""

    namespace: str
    name: str
    uid: str
    policy: str
    pool: str | None
    silence_id: str


@dataclass
class ActionState:
    due: dict[str, Due] = field(default_factory=dict)  # job uid ->
    inflight: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)  # uids with an event while in flight
    # (job uid, entry identity) -> tries made; in memory only: after a restart the count starts again, and the
    # idempotency key makes the extra try harmless to the receiver
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    # silence id -> uids of live jobs whose status says they hold it (a renewal: several jobs, one silence)
    holders: dict[str, set[str]] = field(default_factory=dict)
    held_by: dict[str, str] = field(default_factory=dict)  # job uid -> the silence id it holds
    jobs: dict[str, tuple[str, str]] = field(default_factory=dict)  # uid of a holder -> (namespace, name)
    # silence id -> (namespace, alert target without severity, severity rank, when made (epoch s))
    silence_target: dict[str, tuple[str, Target, int, float]] = field(default_factory=dict)
    # (namespace, alert target) -> severity rank -> (newest creation time of such a job (epoch s), severity)
    targets: dict[tuple[str, Target], dict[int, tuple[float, str]]] = field(default_factory=dict)
    orphans: dict[str, Orphan] = field(default_factory=dict)  # silence id ->
    orphan_due: dict[str, float] = field(default_factory=dict)  # silence id -> event-loop time of the next try
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def mark_due(self, uid: str, namespace: str, name: str) -> None:
        """The job has work (an event showed it): look at it soon. A job waiting for a retry keeps its time; one
        being worked on now is looked at again when that is done (the event may show a change made meanwhile)."""
        if uid in self.inflight:
            self.dirty.add(uid)
        elif uid not in self.due:
            self.due[uid] = Due(namespace, name)
            self.wake.set()

    def retry_at(self, uid: str, namespace: str, name: str, not_before: float) -> None:
        self.due[uid] = Due(namespace, name, not_before)
        self.dirty.discard(uid)
        self.wake.set()

    def done(self, uid: str, namespace: str, name: str) -> None:
        """Work on the job ended; if an event came meanwhile (and no retry is set), look again now."""
        self.inflight.discard(uid)
        if uid in self.dirty:
            self.dirty.discard(uid)
            self.mark_due(uid, namespace, name)

    def forget_job(self, uid: str) -> str | None:
        """The job is gone; returns the silence it held when no other live job holds it too."""
        self.due.pop(uid, None)
        self.dirty.discard(uid)
        self.jobs.pop(uid, None)
        for key in [k for k in self.attempts if k[0] == uid]:
            del self.attempts[key]
        silence = self.held_by.pop(uid, None)
        if silence is None:
            return None
        uids = self.holders.get(silence, set())
        uids.discard(uid)
        if uids:
            return None
        self.holders.pop(silence, None)
        return silence

    def hold(self, uid: str, silence_id: str | None) -> None:
        previous = self.held_by.get(uid)
        if previous == silence_id:
            return
        if previous is not None:
            self.holders.get(previous, set()).discard(uid)
            if not self.holders.get(previous):
                self.holders.pop(previous, None)
        if silence_id is None:
            self.held_by.pop(uid, None)
            self.jobs.pop(uid, None)
        else:
            self.held_by[uid] = silence_id
            self.holders.setdefault(silence_id, set()).add(uid)

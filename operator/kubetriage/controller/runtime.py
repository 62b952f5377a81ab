"""Process-wide state of the operator: clients and the small caches handlers consult.

One ``Runtime`` is built at startup and put in kopf's memo; handlers stay thin
and call one module per operation with it (admission, recording, pools).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from kubetriage.api import redact
from kubetriage.api.contract import MAX_RULES, TeamRule
from kubetriage.api.models import API_VERSION, TriageRuleSpec
from kubetriage.api.redact import Redactor
from kubetriage.api.regex import regex_problem
from kubetriage.controller.actions.state import ActionState, PolicyCache
from kubetriage.controller.ttl import TTLState
from kubetriage.infra.config import Settings
from kubetriage.infra.kube import ApiError, Kube
from kubetriage.infra.queue import Queue
from kubetriage.infra.sinks import Sink, VerdictRecord, open_sink

log = logging.getLogger("kubetriage")


@dataclass
class PoolInfo:
    namespace: str
    name: str
    uid: str
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RuleCheck:
    """What the operator made of one TriageRule: usable or not, and why (its ``Accepted`` condition)."""

    ok: bool
    reason: str
    message: str


class RuleCache:
    """The usable TriageRules of each namespace, as admission hands them to a job's worker.

    Keyed by namespace so that a rule can only reach jobs of its own namespace. A rule that does not
    validate, or whose expression does not compile, is not kept: it would match nothing in the analyzer
    anyway, and its status says why.
    """

    def __init__(self) -> None:
        self._by_ns: dict[str, dict[str, TeamRule]] = {}
        # rule uid -> the generation whose Accepted condition this replica wrote (status echoes write nothing)
        self.written: dict[str, int | None] = {}
        self._capped: dict[str, int] = {}

    def observe(self, body: dict[str, Any]) -> RuleCheck:
        """Take the rule as it is now into the cache (or drop it when unusable); say what was made of it."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            spec = TriageRuleSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:  # the CRD validates the same schema: only a CRD newer than this operator
            self.forget(ns, name)
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return RuleCheck(False, "InvalidSpec", f"spec.{where}: {first['msg']}. This operator cannot use the "
                             "rule; fix the field, or upgrade the operator to the version of the installed CRD")
        if spec.match.error_regex is not None and (problem := regex_problem(spec.match.error_regex)):
            self.forget(ns, name)
            return RuleCheck(False, "InvalidRegex", f"{problem}. Fix spec.match.errorRegex; until then this rule "
                             "applies to no TriageJob")
        self._by_ns.setdefault(ns, {})[name] = TeamRule(name=name, spec=spec)
        return RuleCheck(True, "Valid", f"applies to TriageJobs in namespace {ns} admitted from now on")

    def forget(self, namespace: str, name: str, uid: str | None = None) -> None:
        rules = self._by_ns.get(namespace)
        if rules is not None:
            rules.pop(name, None)
            if not rules:
                del self._by_ns[namespace]
        if uid is not None:
            self.written.pop(uid, None)

    def for_namespace(self, namespace: str) -> list[TeamRule]:
        """The rules a job of ``namespace`` gets: only that namespace's, at most MAX_RULES.

        neverDiscard guards first, then by name: over the cap, what is left out is never a guard while a
        classification rule is kept, and the same rules are left out for every job.
        """
        rules = sorted((self._by_ns.get(namespace) or {}).values(),
                       key=lambda r: (not r.spec.action.never_discard, r.name))
        if len(rules) > MAX_RULES and self._capped.get(namespace) != len(rules):
            self._capped[namespace] = len(rules)
            log.warning("namespace %s has %d usable TriageRules; jobs get the first %d (neverDiscard rules first, "
                        "then by name): merge rules to stay under the limit", namespace, len(rules), MAX_RULES)
        return rules[:MAX_RULES]


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    redis: aioredis.Redis
    queue: Queue
    sink: Sink
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    priority_classes: dict[str, int] = field(default_factory=dict)
    pools: dict[str, PoolInfo] = field(default_factory=dict)
    # pool key -> generation whose limits are in Redis (so a status echo does not rewrite them)
    pool_generations: dict[str, int | None] = field(default_factory=dict)
    rules: RuleCache = field(default_factory=RuleCache)
    # TriagePolicies and what their actions are doing (controller.actions), and the TTL schedule (controller.ttl)
    policies: PolicyCache = field(default_factory=PolicyCache)
    actions: ActionState = field(default_factory=ActionState)
    ttl: TTLState = field(default_factory=TTLState)
    # uid -> (namespace, name) of jobs waiting for a PriorityClass or TriagePool to appear
    waiting: dict[str, tuple[str, str]] = field(default_factory=dict)
    # uid -> phase of every job seen, to skip work on already-terminal jobs cheaply
    phases: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    running_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    # uid -> the attempt of the last claim seen in the event stream, until the job finishes: a job Redis lost
    # after a claim is analysed again, and that run counts as an attempt (``admission._enqueue``)
    claimed: dict[str, int] = field(default_factory=dict)
    # uid -> the timer of the next try of a failed admission (``admission.admit_or_retry``), and how many
    # such tries may run at once
    admission_retries: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    admission_retry_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(16))
    # uid -> admissions of it under way (an event's, a retry's, also one waiting for a retry slot): the resync
    # leaves these jobs alone
    admitting: dict[str, int] = field(default_factory=dict)
    db_backlog: dict[str, VerdictRecord] = field(default_factory=dict)
    caches_loaded: bool = False
    cache_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rebuild_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def create(cls, settings: Settings) -> Runtime:
        # A blocking pool: under a burst a command waits (bounded) for a free connection instead of failing at
        # once with "Too many connections"; one that still fails is retried by admission (admit_or_retry).
        connections = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections,
            timeout=settings.redis_pool_timeout_seconds, health_check_interval=10)
        client = aioredis.Redis.from_pool(connections)
        sink = open_sink(settings.database_url)
        rt = cls(settings=settings, kube=Kube(), redis=client, queue=Queue(client, settings.redis_prefix), sink=sink)
        try:
            await sink.setup()
        except Exception as exc:  # the database may come later; verdicts queue for it meanwhile
            log.warning("database not ready at startup (%s); verdicts will be recorded when it is", exc)
        return rt

    async def close(self) -> None:
        for handle in self.running_timers.values():
            handle.cancel()
        for handle in self.admission_retries.values():
            handle.cancel()
        await self.kube.close()
        await self.redis.aclose()
        await self.sink.close()

    async def load_caches(self) -> None:
        """List PriorityClasses, TriagePools and TriageRules once, so the first admissions do not race the watches.

        Rules especially: a job admitted before its namespace's rules were seen would be analysed without them.
        """
        if self.caches_loaded:
            return
        async with self.cache_lock:
            if self.caches_loaded:
                return
            pcs = await self.kube.get("/apis/scheduling.k8s.io/v1/priorityclasses")
            for item in pcs.get("items", []):
                self.priority_classes[item["metadata"]["name"]] = int(item.get("value", 0))
            namespaces = self.settings.watched_namespaces
            if namespaces:
                paths = [f"/apis/{API_VERSION}/namespaces/{ns}/triagepools"
                         for ns in dict.fromkeys([*namespaces, self.settings.pool_namespace]) if ns]
            else:
                paths = [f"/apis/{API_VERSION}/triagepools"]
            for path in paths:
                for item in (await self.kube.get(path)).get("items", []):
                    self.observe_pool(item)
            await self._load_rules(namespaces)
            self.caches_loaded = True

    async def _load_rules(self, namespaces: list[str]) -> None:
        """The rules of the namespaces whose jobs this operator admits (a rule applies only in its own)."""
        paths = ([f"/apis/{API_VERSION}/namespaces/{ns}/triagerules" for ns in namespaces] if namespaces
                 else [f"/apis/{API_VERSION}/triagerules"])
        for path in paths:
            try:
                items = (await self.kube.get(path)).get("items", [])
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # No TriageRule CRD (Helm never upgrades CRDs): there are no rules, and jobs still need admitting.
                log.warning("TriageRules not served by the API server (%s); jobs are analysed without team "
                            "rules until the CRD is applied: kubectl apply --server-side -f crds/", exc)
                return
            for item in items:
                self.rules.observe(item)

    def observe_pool(self, body: dict[str, Any]) -> PoolInfo:
        meta = body["metadata"]
        info = PoolInfo(meta["namespace"], meta["name"], meta.get("uid", ""), dict(body.get("spec") or {}))
        self.pools[info.key] = info
        return info

    async def push_pool_config(self, pool: PoolInfo) -> None:
        """The pool's rate limit, where the workers' claim script reads it."""
        from kubetriage.api.models import TriagePoolSpec

        rl = TriagePoolSpec.model_validate(pool.spec).rate_limit
        await self.queue.set_pool_config(pool.key, rl.jobs_per_second if rl else None, rl.burst if rl else None)

    def pool_unready(self, pool: PoolInfo) -> str | None:
        """Why the pool cannot run workers yet, for its status and its jobs' (None: it can).

        A worker pod naming a PriorityClass that does not exist is refused by the API server, so the pool's
        Deployment would never get a pod: it is not created until the class exists.
        """
        name = pool.spec.get("priorityClassName")
        if name and name not in self.priority_classes:
            return (f"PriorityClass {name!r} (the pool's spec.priorityClassName) does not exist: create it, or set "
                    "spec.priorityClassName to an existing class")
        return None

    def find_pool(self, job_namespace: str, name: str) -> PoolInfo | None:
        """The job's own namespace first, then the operator's pool namespace."""
        for ns in (job_namespace, self.settings.pool_namespace):
            if ns and f"{ns}/{name}" in self.pools:
                return self.pools[f"{ns}/{name}"]
        return None

    def redactor(self, pool_key: str | None) -> Redactor:
        """What a pool's jobs are redacted with: the built-in secret patterns plus the pool's own
        (``spec.analyzer.redactPatterns``); the built-ins alone for a pool this replica does not know."""
        pool = self.pools.get(pool_key or "")
        patterns = ((pool.spec.get("analyzer") or {}).get("redactPatterns") or []) if pool else []
        return redact.redactor(p for p in patterns if isinstance(p, str))

    async def ensure_peering_objects(self) -> None:
        """kopf's peering needs its object to exist; without it every replica would think it is alone."""
        from kubetriage.infra.kube import ApiError

        name = self.settings.peering
        targets = [(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings", "KopfPeering", ns)
                   for ns in self.settings.watched_namespaces]
        if not targets:
            targets = [("/apis/kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", None)]
        for path, kind, ns in targets:
            meta: dict[str, Any] = {"name": name, **({"namespace": ns} if ns else {})}
            try:
                await self.kube.create(path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": meta})
            except ApiError as exc:
                if exc.status not in (409, 403):  # exists already, or created by the chart and not ours to make
                    raise

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

from kubetriage.api.models import API_VERSION
from kubetriage.infra.config import Settings
from kubetriage.infra.kube import Kube
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
    # uid -> (namespace, name) of jobs waiting for a PriorityClass or TriagePool to appear
    waiting: dict[str, tuple[str, str]] = field(default_factory=dict)
    # uid -> phase of every job seen, to skip work on already-terminal jobs cheaply
    phases: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    running_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    db_backlog: dict[str, VerdictRecord] = field(default_factory=dict)
    caches_loaded: bool = False
    cache_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rebuild_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def create(cls, settings: Settings) -> Runtime:
        client = aioredis.from_url(settings.redis_url, max_connections=256, health_check_interval=10)
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
        await self.kube.close()
        await self.redis.aclose()
        await self.sink.close()

    async def load_caches(self) -> None:
        """List PriorityClasses and TriagePools once, so the first admissions do not race the watches."""
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
            self.caches_loaded = True

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

    def find_pool(self, job_namespace: str, name: str) -> PoolInfo | None:
        """The job's own namespace first, then the operator's pool namespace."""
        for ns in (job_namespace, self.settings.pool_namespace):
            if ns and f"{ns}/{name}" in self.pools:
                return self.pools[f"{ns}/{name}"]
        return None

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

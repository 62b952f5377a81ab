"""The ingest server of a test: the real aiohttp server in this process, writing to the real API server.

No operator is needed to test the HTTP boundary: ingest only creates
TriageJobs. Each environment gets its own namespaces and tokens, so tests
cannot see each other's jobs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from devharness import devenv
from kubetriage.infra.config import Settings
from kubetriage.infra.kube import ApiError, Kube, triagejob_path
from kubetriage.ingest.server import start_ingest, stop_ingest


class IngestEnv:
    """Namespaces ``ns`` (the main token's default), ``ns2`` (also allowed), ``team_ns`` (the file token's)."""

    def __init__(self, cluster: devenv.ControlPlane, root: Path, kube: Kube | None = None, **settings: Any) -> None:
        self.cluster = cluster
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:6]
        self.ns, self.ns2, self.team_ns = f"in-{tag}", f"in2-{tag}", f"team-{tag}"
        self.missing_ns = f"gone-{tag}"  # allowed for the token, but never created
        self.token = "tok-" + secrets.token_hex(16)
        self.team_token = "team-" + secrets.token_hex(16)
        self.tokens_file = root / "tokens.yaml"
        self.tokens_file.write_text(json.dumps({self.team_token: {"name": "team-a", "namespaces": [self.team_ns]}}))
        self.port = devenv.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(**{
            "ingest_port": self.port,
            "ingest_token": self.token,
            "ingest_namespace": self.ns,
            "ingest_allowed_namespaces": f"{self.ns2},{self.missing_ns}",
            "ingest_tokens_file": str(self.tokens_file),
            **settings,
        })
        self.kube = Kube()
        self.server_kube = kube or self.kube
        self.runner: web.AppRunner | None = None
        self.http = httpx.AsyncClient(base_url=self.url, timeout=30)

    async def __aenter__(self) -> IngestEnv:
        for ns in (self.ns, self.ns2, self.team_ns):
            self.cluster.kubectl("create", "namespace", ns)
        self.runner = await start_ingest(self.settings, self.server_kube, host="127.0.0.1")
        assert self.runner is not None, "ingest did not start"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop_ingest(self.runner)
        await self.http.aclose()
        for ns in (self.ns, self.ns2, self.team_ns):
            self.cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        if self.server_kube is not self.kube:
            await self.server_kube.close()
        await self.kube.close()

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def post(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {**self.auth(token), **kw.pop("headers", {})}
        return await self.http.post(path, headers=headers, **kw)

    async def jobs(self, ns: str | None = None) -> list[dict[str, Any]]:
        for _ in range(50):
            try:
                return (await self.kube.get(triagejob_path(ns or self.ns)))["items"]
            except ApiError as exc:  # 429 "storage is (re)initializing" right after a CRD is (re)applied
                if exc.status not in (429, 503):
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("the API server kept answering 429/503")

    async def job(self, name: str, ns: str | None = None) -> dict[str, Any]:
        return await self.kube.get(triagejob_path(ns or self.ns, name))

    async def healthy(self) -> bool:
        resp = await self.http.get("/healthz")
        return resp.status_code == 200 and resp.json()["status"] == "ok"


def webhook(*alerts: dict[str, Any], status: str = "firing", receiver: str = "kubetriage") -> dict[str, Any]:
    """An Alertmanager v4 webhook body, as Alertmanager 0.25 sends it."""
    return {
        "receiver": receiver, "status": status, "alerts": list(alerts), "groupLabels": {"alertname": "x"},
        "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "version": "4",
        "groupKey": '{}:{alertname="x"}', "truncatedAlerts": 0,
    }


def am_alert(name: str = "HighLatency", status: str = "firing", fingerprint: str = "0123456789abcdef",
             starts: str = "2026-01-05T10:00:00.123Z", ends: str = "0001-01-01T00:00:00Z",
             **labels: str) -> dict[str, Any]:
    return {
        "status": status, "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} is firing"}, "startsAt": starts, "endsAt": ends,
        "generatorURL": "http://prometheus:9090/graph?g0.expr=up", "fingerprint": fingerprint,
    }

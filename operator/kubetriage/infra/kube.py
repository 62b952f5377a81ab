"""A small async Kubernetes REST client on aiohttp, using kopf's own login.

kopf already parses kubeconfigs and in-cluster service accounts; reusing its
``ConnectionInfo`` means the operator's writes authenticate exactly like its
watches do, without a second, heavier client library in memory. aiohttp is
kopf's own HTTP stack; it costs about half the CPU per request of httpx here,
which matters at thousands of status writes a minute (measured with py-spy
during ``make bench``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json as _json
import os
import ssl
import tempfile
from typing import Any

import aiohttp
import kopf

from kubetriage.api.models import API_VERSION
from kubetriage.infra.kubeconfig import KubeLoginError, Login


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    """The TLS context for the API server (aiohttp takes ``False`` to skip verification)."""
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=os.fspath(info.ca_path))
    elif info.ca_data:
        ctx.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    cert, key = info.certificate_path, info.private_key_path
    with tempfile.TemporaryDirectory() as tmp:
        if info.certificate_data:
            cert = os.path.join(tmp, "tls.crt")
            with open(cert, "wb") as f:
                f.write(base64.b64decode(_as_bytes(info.certificate_data)))
        if info.private_key_data:
            key = os.path.join(tmp, "tls.key")
            fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(_as_bytes(info.private_key_data)))
        if cert:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    return ctx


def connection_info() -> kopf.ConnectionInfo:
    """In-cluster service account first, then $KUBECONFIG / ~/.kube/config."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials: set KUBECONFIG or run in a pod with a service account")
    return info


class KubeLoginFailed(ApiError):
    """No credentials could be had (an exec plugin failed, a token file is gone), or they were refused twice."""

    def __init__(self, message: str) -> None:
        super().__init__(401, message, "Unauthorized")


class Kube:
    """The handful of REST verbs the operator and CLI need; paths are built by the caller's helpers.

    With a ``login`` (the CLI's kubeconfig, see :mod:`kubetriage.infra.kubeconfig`) the credentials are fetched
    before the first request, again when they expire, and once more after a 401, when the request is retried
    once. The operator passes none: it uses kopf's login, as its watches do.
    """

    def __init__(self, info: kopf.ConnectionInfo | None = None, timeout: float = 30.0,
                 login: Login | None = None) -> None:
        self._login = login
        info = info or (login.base if login is not None else connection_info())
        self.default_namespace = info.default_namespace or "default"
        self.server = info.server.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._stale_sessions: list[aiohttp.ClientSession] = []
        self._ssl: ssl.SSLContext | bool | None = None
        self._tls: tuple[Any, ...] = ()
        self._info = info
        self._use(info)

    def _use(self, info: kopf.ConnectionInfo) -> None:
        """Take these credentials for the next requests; new TLS client material needs a new session."""
        tls = (info.certificate_path, info.certificate_data, info.private_key_path, info.private_key_data)
        if self._ssl is None or tls != self._tls:
            self._ssl = _ssl_context(info)
            self._tls = tls
            if self._session is not None:
                # closed in close(), not now: requests still in flight on it must finish
                self._stale_sessions.append(self._session)
                self._session = None
        self._authorization = f"{info.scheme or 'Bearer'} {info.token}" if info.token else None
        # a token wins over basic auth, as in kubectl (aiohttp refuses both on one request)
        self._auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username and not info.token \
            else None
        self._info = info

    @property
    def session(self) -> aiohttp.ClientSession:
        # created lazily: an aiohttp session must be born inside the running event loop
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Accept": "application/json"}, timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                json_serialize=lambda obj: _json.dumps(obj, separators=(",", ":")),
            )
        return self._session

    async def close(self) -> None:
        for session in [*self._stale_sessions, self._session]:
            if session is not None:
                await session.close()
        self._stale_sessions.clear()

    async def _credentials(self, refused: kopf.ConnectionInfo | None = None) -> kopf.ConnectionInfo:
        assert self._login is not None
        try:
            info = await self._login.credentials(refused=refused)
        except KubeLoginError as exc:
            raise KubeLoginFailed(str(exc)) from None
        if info is not self._info:
            self._use(info)
        return info

    async def _send(self, method: str, path: str, params: dict[str, str] | None, json: Any,
                    headers: dict[str, str] | None) -> tuple[int, bytes]:
        if self._authorization:
            headers = {"Authorization": self._authorization, **(headers or {})}
        try:
            async with self.session.request(method, self.server + path, params=params, json=json,
                                            headers=headers, auth=self._auth) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # one error type for callers: an unreachable API server is a retryable 503
            raise ApiError(503, f"API server {self.server} unreachable: {exc!r}", "ServiceUnavailable") from exc

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                      json: Any = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
        clean = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (params or {}).items()} or None
        used = await self._credentials() if self._login is not None else self._info
        status, body = await self._send(method, path, clean, json, headers)
        if status == 401 and self._login is not None and self._login.renewable:
            # a revoked, rotated or early-expired credential: log in again once (the exec plugin runs again,
            # the token file is re-read) and retry once; our requests carry JSON, so they can be sent again
            await self._credentials(refused=used)
            status, body = await self._send(method, path, clean, json, headers)
            if status == 401:
                raise KubeLoginFailed(f"the API server {self.server} refused the credentials of "
                                      f"{self._login.source}, also after logging in again; log in anew (for "
                                      "a cloud cluster, with its CLI) or ask for a valid token")
        elif status == 401 and self._login is not None:
            raise KubeLoginFailed(f"the API server {self.server} refused the credentials of {self._login.source} "
                                  "(401 Unauthorized); they are fixed in the kubeconfig: replace them")
        if status >= 400:
            try:
                detail = _json.loads(body)
            except ValueError:
                raise ApiError(status, body[:500].decode(errors="replace")) from None
            raise ApiError(status, detail.get("message", body[:500].decode(errors="replace")), detail.get("reason", ""))
        return _json.loads(body) if body else {}

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        return await self.request("GET", path, params=params or None)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, json=body)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "PATCH", path, json=patch, headers={"Content-Type": "application/merge-patch+json"}
        )

    async def apply(self, path: str, body: dict[str, Any], manager: str = "kubetriage") -> dict[str, Any]:
        """Server-side apply: declare the whole object we own; no read-modify-write races."""
        return await self.request(
            "PATCH", path, json=body, params={"fieldManager": manager, "force": "true"},
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    async def delete(self, path: str) -> dict[str, Any]:
        return await self.request("DELETE", path)

    async def event(
        self,
        obj: dict[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str = "kubetriage",
    ) -> None:
        """A core/v1 Event about ``obj``; written once per terminal transition."""
        meta = obj["metadata"]
        ns = meta.get("namespace") or self.default_namespace
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.create(f"/api/v1/namespaces/{ns}/events", {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", API_VERSION),
                "kind": obj.get("kind", "TriageJob"),
                "name": meta["name"],
                "namespace": ns,
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        })


def _path(plural: str, namespace: str, name: str | None, status: bool) -> str:
    path = f"/apis/{API_VERSION}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
        if status:
            path += "/status"
    return path


def triagejob_path(namespace: str, name: str | None = None, status: bool = False) -> str:
    return _path("triagejobs", namespace, name, status)


def triagepool_path(namespace: str, name: str | None = None, status: bool = False) -> str:
    return _path("triagepools", namespace, name, status)


def triagerule_path(namespace: str, name: str | None = None, status: bool = False) -> str:
    return _path("triagerules", namespace, name, status)


def triagepolicy_path(namespace: str, name: str | None = None, status: bool = False) -> str:
    return _path("triagepolicies", namespace, name, status)


def deployment_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    return f"{path}/{name}" if name else path

"""How the ``kubetriage`` user commands log in: kubeconfig files the way kubectl reads them, exec plugins included.

kopf's own kubeconfig reader (which the operator keeps using) takes only fixed credentials, so the
kubeconfigs that EKS, GKE and AKS write, whose user runs a credential plugin (``aws eks get-token``,
``gke-gcloud-auth-plugin``, ``kubelogin``), could not be used. This module reads:

- fixed credentials (client certificate, bearer token, basic auth) and ``tokenFile``;
- ``exec`` credential plugins (``client.authentication.k8s.io/v1`` and ``v1beta1``): the command runs with its
  args and env, its ``ExecCredential`` answer gives a token or a client certificate, and is kept until its
  ``expirationTimestamp``;
- with no kubeconfig, the pod's service account.

A :class:`Login` can be asked again: ``Kube`` does so when the credential expires and once after a 401, so a
revoked or rotated token is replaced by running the plugin (or re-reading the token file) again.

The official ``kubernetes`` package could do the parsing, but installing it switches kopf's login for the
operator to that package (kopf prefers it whenever it is importable) and pulls in a second HTTP stack; it
would not retry after a 401 either. The exec protocol is small and documented, so it is implemented here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import kopf
import yaml

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeLoginError(Exception):
    """The credentials could not be obtained; the message says what to fix."""


@dataclasses.dataclass
class ExecPlugin:
    """A kubeconfig user's ``exec`` section: a command that prints an ExecCredential."""

    user: str
    command: str
    args: list[str]
    env: dict[str, str]
    api_version: str
    interactive_mode: str = "IfAvailable"
    install_hint: str = ""
    cluster: dict[str, Any] | None = None  # sent in KUBERNETES_EXEC_INFO when provideClusterInfo is true
    runs: int = 0

    @classmethod
    def from_kubeconfig(cls, user: str, spec: dict[str, Any], base_dir: Path,
                        cluster: dict[str, Any]) -> ExecPlugin:
        where = f"kubeconfig user {user!r}: exec"
        api_version = spec.get("apiVersion") or ""
        if api_version not in EXEC_API_VERSIONS:
            raise KubeLoginError(f"{where} apiVersion {api_version!r} is not supported; use "
                                 f"{EXEC_API_VERSIONS[0]} (or {EXEC_API_VERSIONS[1]})")
        command = str(spec.get("command") or "")
        if not command:
            raise KubeLoginError(f"{where} has no command")
        # as kubectl does: a relative path with a separator is relative to the kubeconfig's folder;
        # a bare name is looked up on PATH
        if os.sep in command and not os.path.isabs(command):
            command = str(base_dir / command)
        env = {}
        for item in spec.get("env") or []:
            if not isinstance(item, dict) or "name" not in item:
                raise KubeLoginError(f"{where}.env entries need a name and a value, got {item!r}")
            env[str(item["name"])] = str(item.get("value", ""))
        mode = spec.get("interactiveMode") or "IfAvailable"
        if mode not in ("Never", "IfAvailable", "Always"):
            raise KubeLoginError(f"{where}.interactiveMode {mode!r} must be Never, IfAvailable or Always")
        return cls(user=user, command=command, args=[str(a) for a in spec.get("args") or []], env=env,
                   api_version=api_version, interactive_mode=mode, install_hint=spec.get("installHint") or "",
                   cluster=cluster if spec.get("provideClusterInfo") else None)

    def _exec_info(self, interactive: bool) -> str:
        spec: dict[str, Any] = {"interactive": interactive}
        if self.cluster is not None:
            spec["cluster"] = self.cluster
        return json.dumps({"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec})

    async def run(self) -> dict[str, Any]:
        """Run the plugin once; its ExecCredential ``status``. The plugin's stderr goes to the user, as with kubectl."""
        tty = sys.stdin is not None and sys.stdin.isatty()
        if self.interactive_mode == "Always" and not tty:
            raise KubeLoginError(f"exec plugin {self.command!r} (kubeconfig user {self.user!r}) needs a terminal "
                                 "(interactiveMode: Always); run the command in one")
        interactive = tty and self.interactive_mode != "Never"
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": self._exec_info(interactive)}
        self.runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                self.command, *self.args, env=env, stdout=asyncio.subprocess.PIPE,
                stdin=None if interactive else asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
        except FileNotFoundError:
            hint = f": {self.install_hint.strip()}" if self.install_hint.strip() else "; install it or fix the path"
            raise KubeLoginError(f"exec plugin {self.command!r} (kubeconfig user {self.user!r}) not found{hint}") \
                from None
        except PermissionError:
            raise KubeLoginError(f"exec plugin {self.command!r} (kubeconfig user {self.user!r}) is not executable; "
                                 f"chmod +x it") from None
        if proc.returncode != 0:
            raise KubeLoginError(f"exec plugin {self.command!r} (kubeconfig user {self.user!r}) failed with exit "
                                 f"code {proc.returncode}; its own message, if any, is above")
        return self._parse(out)

    def _parse(self, out: bytes) -> dict[str, Any]:
        what = f"exec plugin {self.command!r} (kubeconfig user {self.user!r})"
        try:
            cred = json.loads(out)
        except ValueError:
            raise KubeLoginError(f"{what} did not print an ExecCredential as JSON: {out[:200]!r}") from None
        if not isinstance(cred, dict) or cred.get("kind") != "ExecCredential":
            raise KubeLoginError(f"{what} printed JSON that is not an ExecCredential: {out[:200]!r}")
        if cred.get("apiVersion") != self.api_version:
            raise KubeLoginError(f"{what} answered with apiVersion {cred.get('apiVersion')!r}, the kubeconfig asks "
                                 f"for {self.api_version!r}; make them the same")
        status = cred.get("status")
        if not isinstance(status, dict):
            raise KubeLoginError(f"{what} printed an ExecCredential without a status")
        has_cert = bool(status.get("clientCertificateData")) and bool(status.get("clientKeyData"))
        if not status.get("token") and not has_cert:
            raise KubeLoginError(f"{what} printed neither status.token nor status.clientCertificateData and "
                                 "status.clientKeyData")
        if bool(status.get("clientCertificateData")) != bool(status.get("clientKeyData")):
            raise KubeLoginError(f"{what} printed only one of clientCertificateData and clientKeyData")
        expiry = status.get("expirationTimestamp")
        if expiry:
            try:
                status["expirationTimestamp"] = _utc(dt.datetime.fromisoformat(str(expiry)))
            except ValueError:
                raise KubeLoginError(f"{what} printed expirationTimestamp {expiry!r}, which is not RFC 3339") from None
        return status


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _expired(info: kopf.ConnectionInfo) -> bool:
    return info.expiration is not None and _utc(info.expiration) <= dt.datetime.now(dt.UTC)


class Login:
    """Where the credentials come from, and the latest ones; ask again after expiry or a 401."""

    def __init__(self, base: kopf.ConnectionInfo, source: str, token_file: str | None = None,
                 plugin: ExecPlugin | None = None) -> None:
        self.base = base  # server, TLS, default namespace and the fixed credentials
        self.source = source  # for messages: which file, context and user
        self.token_file = token_file
        self.plugin = plugin
        self._current: kopf.ConnectionInfo | None = None
        self._lock = asyncio.Lock()

    @property
    def renewable(self) -> bool:
        """Whether logging in again can give other credentials (a fixed token stays the same)."""
        return self.token_file is not None or self.plugin is not None

    async def credentials(self, *, refused: kopf.ConnectionInfo | None = None) -> kopf.ConnectionInfo:
        """The credentials to use now: the cached ones, unless they expired or are ``refused`` (got a 401).

        Concurrent requests that were all refused with the same credentials log in again only once.
        """
        async with self._lock:
            current = self._current
            if current is not None and current is not refused and not _expired(current):
                return current
            if current is not None and not self.renewable:
                return current
            self._current = await self._login()
            return self._current

    def _read_token(self, path: str) -> str:
        # a few hundred bytes from a local file: not worth a thread
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise KubeLoginError(f"cannot read the token file of {self.source}: {exc}") from None

    async def _login(self) -> kopf.ConnectionInfo:
        info = self.base
        if self.token_file:
            info = dataclasses.replace(info, token=self._read_token(self.token_file))
        if self.plugin is not None:
            status = await self.plugin.run()
            changes: dict[str, Any] = {"expiration": status.get("expirationTimestamp")}
            if status.get("token"):
                changes.update(token=str(status["token"]), scheme=None, username=None, password=None)
            if status.get("clientCertificateData"):
                # ConnectionInfo carries certificate data base64-encoded, as a kubeconfig does
                changes.update(
                    certificate_path=None, private_key_path=None,
                    certificate_data=base64.b64encode(str(status["clientCertificateData"]).encode()).decode(),
                    private_key_data=base64.b64encode(str(status["clientKeyData"]).encode()).decode())
            info = dataclasses.replace(info, **changes)
        return info


def _named(config: dict[str, Any], key: str, item_key: str, into: dict[str, tuple[dict[str, Any], Path]],
           base_dir: Path) -> None:
    for item in config.get(key) or []:
        if isinstance(item, dict) and item.get("name") not in into:
            into[item["name"]] = (item.get(item_key) or {}, base_dir)


def _resolve(path: str | None, base_dir: Path) -> str | None:
    """Relative file references in a kubeconfig are relative to that file, as kubectl reads them."""
    if not path:
        return None
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else str(base_dir / path)


def kubeconfig_paths() -> list[Path]:
    raw = os.environ.get("KUBECONFIG", "")
    if raw.strip():
        return [Path(os.path.expanduser(p.strip())) for p in raw.split(os.pathsep) if p.strip()]
    default = Path(os.path.expanduser("~/.kube/config"))
    return [default] if default.exists() else []


def from_kubeconfig(paths: list[Path]) -> Login:
    """The current context of the merged kubeconfig files (the first file that sets a value wins)."""
    current: str | None = None
    contexts: dict[str, tuple[dict[str, Any], Path]] = {}
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    found = []
    for path in paths:
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue  # kubectl skips missing files in a KUBECONFIG list
        except (OSError, yaml.YAMLError) as exc:
            raise KubeLoginError(f"cannot read kubeconfig {path}: {exc}") from None
        if not isinstance(config, dict):
            raise KubeLoginError(f"kubeconfig {path} is not a kubeconfig (a YAML mapping)")
        found.append(path)
        base_dir = path.resolve().parent
        current = current or config.get("current-context")
        _named(config, "contexts", "context", contexts, base_dir)
        _named(config, "clusters", "cluster", clusters, base_dir)
        _named(config, "users", "user", users, base_dir)
    names = os.pathsep.join(str(p) for p in paths)
    if not found:
        raise KubeLoginError(f"no kubeconfig at {names}")
    if not current:
        raise KubeLoginError(f"kubeconfig {names} sets no current-context; run kubectl config use-context NAME")
    if current not in contexts:
        raise KubeLoginError(f"kubeconfig {names}: current-context {current!r} is not among its contexts")
    context = contexts[current][0]
    if context.get("cluster") not in clusters:
        raise KubeLoginError(f"kubeconfig {names}: context {current!r} names cluster {context.get('cluster')!r}, "
                             "which it does not define")
    cluster, cluster_dir = clusters[context["cluster"]]
    user_name = context.get("user") or ""
    user, user_dir = users.get(user_name, ({}, cluster_dir))
    if user_name and user_name not in users:
        raise KubeLoginError(f"kubeconfig {names}: context {current!r} names user {user_name!r}, "
                             "which it does not define")
    if not cluster.get("server"):
        raise KubeLoginError(f"kubeconfig {names}: cluster {context['cluster']!r} has no server")
    source = f"kubeconfig {names} (context {current!r}, user {user_name!r})"
    ca_path = _resolve(cluster.get("certificate-authority"), cluster_dir)
    provider = (user.get("auth-provider") or {}).get("config") or {}
    base = kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=None if cluster.get("certificate-authority-data") else ca_path,
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        certificate_path=None if user.get("client-certificate-data") else
        _resolve(user.get("client-certificate"), user_dir),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=None if user.get("client-key-data") else _resolve(user.get("client-key"), user_dir),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        token=user.get("token") or provider.get("id-token") or provider.get("access-token"),
        default_namespace=context.get("namespace"),
    )
    plugin = None
    if user.get("exec"):
        plugin = ExecPlugin.from_kubeconfig(user_name, user["exec"], user_dir, _cluster_info(cluster, ca_path))
    token_file = None if user.get("token") else _resolve(user.get("tokenFile"), user_dir)
    return Login(base, source, token_file=token_file, plugin=plugin)


def _cluster_info(cluster: dict[str, Any], ca_path: str | None) -> dict[str, Any]:
    """The cluster as an exec plugin is told it (ExecCredential spec.cluster), CA inlined as kubectl does."""
    ca = cluster.get("certificate-authority-data")
    if not ca and ca_path:
        try:
            ca = base64.b64encode(Path(ca_path).read_bytes()).decode()
        except OSError as exc:
            raise KubeLoginError(f"cannot read certificate-authority {ca_path}: {exc}") from None
    info: dict[str, Any] = {"server": cluster["server"]}
    for key in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url", "disable-compression"):
        if cluster.get(key):
            info[key] = cluster[key]
    if ca:
        info["certificate-authority-data"] = ca
    for ext in cluster.get("extensions") or []:
        if isinstance(ext, dict) and ext.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = ext.get("extension")
    return info


def in_cluster() -> Login | None:
    """The pod's service account; its token file is re-read on renewal because the kubelet rotates it."""
    token = SA_DIR / "token"
    if not token.exists():
        return None
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    server = "https://kubernetes.default.svc"
    if host:
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    ns_file = SA_DIR / "namespace"
    base = kopf.ConnectionInfo(server=server, ca_path=str(SA_DIR / "ca.crt"),
                               default_namespace=ns_file.read_text().strip() if ns_file.exists() else None)
    return Login(base, f"the service account token {token}", token_file=str(token))


def cli_login() -> Login:
    """As kubectl: $KUBECONFIG or ~/.kube/config when there is one, else the pod's service account."""
    paths = kubeconfig_paths()
    if paths:
        return from_kubeconfig(paths)
    login = in_cluster()
    if login is None:
        raise KubeLoginError("no Kubernetes credentials: set KUBECONFIG (or create ~/.kube/config), or run in a "
                             "pod with a service account")
    return login

"""Real servers on loopback for tests and ``make demo``: kube-apiserver + etcd, Redis, PostgreSQL.

Nothing here is a mock: each class starts the real program on free loopback
ports in a private temp folder, waits until it answers, and stops it (and every
process it spawned) on ``stop()``. Every process started carries the
``KUBETRIAGE_HARNESS`` environment marker, so leftovers of a session can be
found in ``/proc`` even when they were started by a child.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HARNESS_ENV = "KUBETRIAGE_HARNESS"
REPO_ROOT = Path(__file__).resolve().parent.parent


class DevEnvError(RuntimeError):
    """A local server could not be started; the message says what to install or check."""


def log(msg: str) -> None:
    print(f"[devenv] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def harness_id() -> str:
    """One id per top-level session; children inherit it through the environment."""
    if HARNESS_ENV not in os.environ:
        os.environ[HARNESS_ENV] = f"{os.getpid()}-{int(time.time())}"
    return os.environ[HARNESS_ENV]


def own_harness_id(name: str) -> str:
    """A marker for the processes this program starts, nested under an inherited one (``parent/name-pid``).

    ``make demo`` stops whatever carries its own marker when it ends; nesting keeps that sweep away from the
    processes of whoever started it (a test session), while that session's check for leftovers still sees
    the demo's (see :func:`leftover_processes`).
    """
    parent = os.environ.get(HARNESS_ENV)
    own = f"{name}-{os.getpid()}-{int(time.time())}"
    os.environ[HARNESS_ENV] = f"{parent}/{own}" if parent else own
    return os.environ[HARNESS_ENV]


def leftover_processes(marker: str) -> list[tuple[int, str]]:
    """Processes (other than us) whose environment carries the harness marker, or one nested under it."""
    prefix = f"{HARNESS_ENV}=".encode()
    exact, nested = prefix + marker.encode(), prefix + marker.encode() + b"/"
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if not any(var == exact or var.startswith(nested) for var in (entry / "environ").read_bytes().split(b"\0")):
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue  # zombie: already dead, only waiting for its parent
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(entry.name), cmd.strip()))
    return found


def stop_marked(marker: str, grace: float = 10.0) -> list[tuple[int, str]]:
    """SIGTERM every process carrying ``marker``, SIGKILL those still alive after ``grace`` seconds; who was found.

    The last line of defence of a program that promises to stop everything it started: it also reaches
    processes that left their process group (a child that called setsid) or whose parent already died.
    """
    found = leftover_processes(marker)
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while leftover_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _ in leftover_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


@dataclass
class Proc:
    """A started server process in its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, not a shutdown."""
        self.stop(timeout=5, sig=signal.SIGKILL)


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
) -> Proc:
    harness_id()
    full_env = {**os.environ, **(env or {})}
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "ab")
    preexec = None
    if user is not None:
        import pwd

        pw = pwd.getpwnam(user)

        def preexec() -> None:  # runs in the child before exec
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

        full_env["HOME"] = pw.pw_dir
    popen = subprocess.Popen(
        list(argv),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=str(cwd) if cwd else None,
        start_new_session=True,
        preexec_fn=preexec,
    )
    out.close()
    proc = Proc(name, popen, log_path)
    _LIVE.append(proc)
    return proc


_LIVE: list[Proc] = []


@atexit.register
def _kill_live() -> None:
    """Last line of defence (Ctrl-C, a crashed fixture): nothing we started outlives us."""
    for proc in reversed(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(timeout=3)


def wait_until(check, what: str, proc: Proc | None = None, timeout: float = 60.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise DevEnvError(f"{what}: {proc.name} exited with {proc.popen.returncode}\n{proc.tail()}")
        try:
            if check():
                return
        except Exception as exc:  # the server is not up yet; any error means "not yet"
            last = exc
        time.sleep(interval)
    tail = proc.tail() if proc else ""
    raise DevEnvError(f"{what}: not ready after {timeout:.0f}s (last error: {last})\n{tail}")


def need_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DevEnvError(f"{name} not found: install the Debian package '{package}' (apt-get install {package})")
    return path


# --------------------------------------------------------------------------- control plane


def control_plane_binaries() -> Path:
    """The folder with kube-apiserver, etcd and kubectl (built once and cached when needed)."""
    script = REPO_ROOT / "hack" / "control-plane.sh"
    result = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise DevEnvError("building the control plane failed; see the [control-plane] lines above")
    return Path(result.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """CA, serving cert (127.0.0.1/localhost), admin client cert, service-account key pair."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "30", "-subj", "/CN=kubetriage-local-ca", cwd=d)
    (d / "san.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n[ext]\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=kube-apiserver", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "30", "-extfile", "san.cnf", "-extensions", "ext", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "admin.key", "-out", "admin.csr",
             "-subj", "/O=system:masters/CN=admin", cwd=d)
    _openssl("x509", "-req", "-in", "admin.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "admin.crt", "-days", "30", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def _local_ip() -> str:
    """A non-loopback address for --advertise-address (the apiserver insists on one)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))
        ip = s.getsockname()[0]
        if not ip.startswith("127."):
            return ip
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for ip in out:
        if "." in ip and not ip.startswith("127."):
            return ip
    return "10.0.0.1"


@dataclass
class ControlPlane:
    """kube-apiserver + etcd on loopback with RBAC and service-account tokens, envtest style."""

    root: Path
    bin_dir: Path = field(default_factory=control_plane_binaries)
    procs: list[Proc] = field(default_factory=list)
    server: str = ""
    kubeconfig: Path = Path()
    extra_apiserver_args: list[str] = field(default_factory=list)

    @property
    def kubectl_bin(self) -> str:
        return str(self.bin_dir / "kubectl")

    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        pki = self.root / "pki"
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _make_pki(pki)
        etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
        etcd = spawn("etcd", [
            str(self.bin_dir / "etcd"),
            "--data-dir", str(self.root / "etcd"),
            "--name", "kubetriage",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"kubetriage=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync=true",
            "--log-level", "warn",
        ], logs)
        self.procs.append(etcd)
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{etcd_client}/health", timeout=1).status == 200,
                   "etcd", etcd, timeout=30)
        self.server = f"https://127.0.0.1:{api_port}"
        apiserver = spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1",
            f"--advertise-address={_local_ip()}",
            f"--secure-port={api_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.server}/",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--disable-admission-plugins=ServiceAccount",
            # on by default since 1.30; named so the chart's verdict policy is enforced whatever the defaults
            "--enable-admission-plugins=ValidatingAdmissionPolicy",
            "--enable-priority-and-fairness=false",
            f"--audit-log-path={logs / 'audit.log'}",
            f"--audit-policy-file={self._audit_policy()}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
            "--v=0",
            *self.extra_apiserver_args,
        ], logs)
        self.procs.append(apiserver)
        self.kubeconfig = self.root / "kubeconfig"
        self.kubeconfig.write_text(self._kubeconfig(pki))
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:
                return r.status == 200

        wait_until(ready, "kube-apiserver", apiserver, timeout=120, interval=0.25)
        log(f"control plane up at {self.server} in {time.monotonic() - t0:.1f}s (kubeconfig {self.kubeconfig})")
        return self

    def _audit_policy(self) -> Path:
        """Log writes (not reads) at Metadata level: lets benchmarks count API writes per object."""
        path = self.root / "audit-policy.yaml"
        path.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n"
            "- level: Metadata\n  verbs: [create, update, patch, delete, deletecollection]\n"
            "- level: None\n"
        )
        return path

    def _kubeconfig(self, pki: Path) -> str:
        def b64(name: str) -> str:
            return base64.b64encode((pki / name).read_bytes()).decode()

        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: kubetriage\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.server}\n"
            f"    certificate-authority-data: {b64('ca.crt')}\n"
            f"users:\n- name: admin\n  user:\n    client-certificate-data: {b64('admin.crt')}\n"
            f"    client-key-data: {b64('admin.key')}\n"
            "contexts:\n- name: kubetriage\n  context:\n    cluster: local\n    user: admin\n    namespace: default\n"
        )

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's)."""
        ca = base64.b64encode((self.root / "pki" / "ca.crt").read_bytes()).decode()
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: sa\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.server}\n    certificate-authority-data: {ca}\n"
            f"users:\n- name: sa\n  user:\n    token: {token}\n"
            "contexts:\n- name: sa\n  context:\n    cluster: local\n    user: sa\n    namespace: default\n"
        )
        return path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=120,
        )
        if check and result.returncode != 0:
            raise DevEnvError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


# --------------------------------------------------------------------------- Redis


@dataclass
class Redis:
    root: Path
    port: int = 0
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        binary = need_binary("redis-server", "redis-server")
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = spawn(f"redis-{self.port}", [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.root), "--protected-mode", "no",
        ], self.root)

        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(ping, "redis-server", self.proc, timeout=20)
        return self

    def restart(self) -> None:
        """Stop and start on the same port: the data is gone, as after a real crash without persistence."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    base = Path("/usr/lib/postgresql")
    if base.exists():
        for version in sorted(base.iterdir(), reverse=True):
            candidate = version / "bin" / name
            if candidate.exists():
                return str(candidate)
    raise DevEnvError(f"{name} not found: install the Debian package 'postgresql' (apt-get install postgresql)")


@dataclass
class Postgres:
    root: Path
    port: int = 0
    proc: Proc | None = None
    user: str | None = None
    # The address to listen on; a real node's pods reach host services only on the node address.
    host: str = "127.0.0.1"
    # Extra pg_hba.conf lines (initdb's trusts loopback only), e.g. the node's pod range.
    hba: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"postgresql://kubetriage@{self.host}:{self.port}/kubetriage"

    def start(self) -> Postgres:
        postgres = _pg_bin("postgres")
        data = self.root / "data"
        # PostgreSQL refuses to run as root; Debian's package provides the postgres user.
        self.user = "postgres" if os.geteuid() == 0 else None
        if not data.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if self.user:
                shutil.chown(self.root, self.user)
            init = spawn("initdb", [_pg_bin("initdb"), "-D", str(data), "-U", "kubetriage", "--auth=trust",
                                    "-E", "UTF8", "--no-sync"], self.root, user=self.user, cwd=self.root)
            if init.popen.wait(120) != 0:
                raise DevEnvError(f"initdb failed:\n{init.tail()}")
            if self.hba:
                with open(data / "pg_hba.conf", "a") as fh:
                    fh.write("".join(f"{line}\n" for line in self.hba))
        self.port = self.port or free_port()
        self.proc = spawn(f"postgres-{self.port}", [
            postgres, "-D", str(data), "-p", str(self.port), "-h", self.host, "-k", str(self.root),
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ], self.root, user=self.user, cwd=self.root)

        def accepting() -> bool:
            r = subprocess.run([_pg_bin("pg_isready"), "-h", self.host, "-p", str(self.port)],
                               capture_output=True)
            return r.returncode == 0

        wait_until(accepting, "postgres", self.proc, timeout=60, interval=0.2)
        if not getattr(self, "_created", False):
            r = subprocess.run([_pg_bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", "kubetriage",
                                "kubetriage"], capture_output=True, text=True)
            if r.returncode != 0 and "already exists" not in r.stderr:
                raise DevEnvError(f"createdb failed: {r.stderr}")
            self._created = True
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(timeout=20, sig=signal.SIGINT)  # fast shutdown


# --------------------------------------------------------------------------- Alertmanager


@dataclass
class Alertmanager:
    """prometheus-alertmanager on loopback with the given config, clustering off, state in ``root``."""

    root: Path
    config: str
    port: int = 0
    proc: Proc | None = None
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Alertmanager:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            raise DevEnvError("prometheus-alertmanager not found: install the Debian package "
                              "'prometheus-alertmanager' (apt-get install prometheus-alertmanager)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "alertmanager.yml"
        config.write_text(self.config)
        self.port = self.port or free_port()
        self.proc = spawn(f"alertmanager-{self.port}", [
            binary, f"--config.file={config}", f"--storage.path={self.root / 'data'}",
            f"--web.listen-address={self.host}:{self.port}", "--cluster.listen-address=", "--log.level=warn",
        ], self.root)
        _wait_ready(self.url, "alertmanager", self.proc, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def _wait_ready(url: str, what: str, proc: Proc, timeout: float) -> None:
    """Prometheus-family servers answer 200 on /-/ready once they serve."""
    wait_until(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200, what, proc,
               timeout=timeout)


@contextlib.contextmanager
def temp_root(prefix: str = "kubetriage-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)  # the postgres user must reach its data folder below
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Prometheus:
    """Debian's prometheus on loopback scraping the given ``host:port`` targets every second.

    ``rules``: a rule file's YAML (evaluated every second); ``alertmanagers``: ``host:port`` of the
    Alertmanagers its alerts go to; ``backfill``: OpenMetrics samples written into the TSDB with
    ``promtool tsdb create-blocks-from openmetrics`` before the start, so a series can have a past
    (a condition that has held for an hour) in a test that runs for a minute. Alerts' generatorURL
    points at this server (``--web.external-url``).
    """

    root: Path
    targets: dict[str, list[str]]
    port: int = 0
    proc: Proc | None = None
    rules: str = ""
    alertmanagers: list[str] = field(default_factory=list)
    backfill: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = need_binary("prometheus", "prometheus")
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        if self.backfill and not data.exists():
            source = self.root / "backfill.om"
            source.write_text(self.backfill)
            made = subprocess.run([need_binary("promtool", "prometheus"), "tsdb", "create-blocks-from",
                                   "openmetrics", str(source), str(data)], capture_output=True, text=True)
            if made.returncode != 0:
                raise DevEnvError(f"promtool could not backfill: {made.stderr.strip()}")
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: [{', '.join(repr(t) for t in targets)}]\n"
            for job, targets in self.targets.items()
        )
        extra = ""
        if self.rules:
            (self.root / "rules.yml").write_text(self.rules)
            extra += f"rule_files: [{str(self.root / 'rules.yml')!r}]\n"
        if self.alertmanagers:
            targets = ", ".join(repr(t) for t in self.alertmanagers)
            extra += f"alerting:\n  alertmanagers:\n  - static_configs:\n    - targets: [{targets}]\n"
        config = self.root / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{extra}"
                          f"scrape_configs:\n{jobs}")
        self.port = self.port or free_port()
        # Alerts firing before the notifier has discovered its Alertmanagers (about 5 s after the start) are
        # only sent again after the resend delay: 1 s instead of 1 min, so a test does not wait for it.
        resend = ["--rules.alert.resend-delay=1s"] if self.alertmanagers else []
        self.proc = spawn(f"prometheus-{self.port}", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{self.port}", f"--web.external-url={self.url}/", "--log.level=warn",
            *resend,
        ], self.root)
        _wait_ready(self.url, "prometheus", self.proc, timeout=60)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

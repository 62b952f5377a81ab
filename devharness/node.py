"""A real single-node Kubernetes cluster on this machine, for the end-to-end tests and ``make cluster``.

etcd and kube-apiserver (hack/control-plane.sh), kubelet, kube-controller-manager,
kube-scheduler, kube-proxy and CoreDNS (hack/node.sh), all built from pinned
Go modules, plus Debian's containerd, runc and CNI plugins: real pods of real
images, no Docker, no kind, no registry. The recipe, its measurements and the
blockers it works around are in ../shared/REAL_NODE.md; the why of each
setting is next to it below.

**No packet leaves the machine.** The node address is a /32 on ``lo`` and the
start refuses to go on unless the kernel routes it locally; pods get no route
out (a ``mangle FORWARD`` DROP for pod traffic to anything but pods, checked
with ``iptables -C``); CoreDNS has no upstream (no ``forward`` plugin); the API
server reaches the kubelet by InternalIP (never the machine's resolver); the
host reaches Services through the bridge, never the default route; containerd
gets a dead proxy and dead registry hosts, so even a missing image cannot be
pulled from anywhere; host services pods use bind the node address.

**It leaves nothing behind.** Every start first tears down whatever a crashed
session left, under a lock (the addresses are fixed: one node per machine).
Teardown stops the processes, kills pods' processes through their cgroups,
removes containers, mounts, network namespaces, cgroups, the bridge, the
address, the iptables rules and chains the node added, restores the sysctls it
changed, and removes the host folders containerd and the kubelet create
outside the state folder when they did not exist before (a journal written
before the first change says which). A *keeper* process shares the lock and
runs the teardown when its owner dies (a killed test session); ``make
cluster`` leaves the keeper running until ``make cluster-down``.

State lives in ``$KUBETRIAGE_CACHE/node/state``: the PKI and containerd's image
store are kept between starts (a warm start imports nothing); etcd, the
kubelet's folder and the logs of the previous run are replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devharness import images as images_mod
from devharness.images import NodeImages

REPO_ROOT = Path(__file__).resolve().parent.parent

# Fixed addresses (one node per machine). 10.250.0.1 is the node, API server, kubelet and CoreDNS address.
NODE_IP = "10.250.0.1"
NODE_NAME = "kt-node"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_POD_CIDR = "10.244.0.0/24"  # the first /24 kube-controller-manager allocates from CLUSTER_CIDR
POD_GATEWAY = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/24"
API_SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR
DNS_SERVICE_IP = "10.96.0.10"
BRIDGE = "kt-cni0"
API_PORT = 6443
ETCD_CLIENT_PORT = 23790
ETCD_PEER_PORT = 23791
# Pod traffic to anything but pods is dropped once routed (Services and the host are DNAT'd / local first).
GUARD_RULE = ("FORWARD", "-s", CLUSTER_CIDR, "!", "-d", CLUSTER_CIDR, "-j", "DROP")
GUARD_TABLE = "mangle"
# A closed local port as containerd's proxy: a registry request (a missing image) fails here, without even a
# DNS lookup of the registry's name.
DEAD_PROXY = "http://127.0.0.1:9"
REGISTRIES = ("docker.io", "registry-1.docker.io", "registry.k8s.io", "k8s.gcr.io", "gcr.io", "ghcr.io",
              "quay.io", "mcr.microsoft.com", "public.ecr.aws", "localhost", "_default")

# Sysctls the node or the kubelet / kube-proxy change; their values are saved before and restored after.
SYSCTLS = (
    "net.ipv4.ip_forward", "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables", "kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory",
    "vm.panic_on_oom", "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established", "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding",
)
# Host folders containerd, runc, CNI and the kubelet use whatever their configuration says; removed on
# teardown when they did not exist before the node started.
HOST_PATHS = ("/run/containerd", "/run/netns", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
              "/var/lib/kubelet", "/var/run/kubernetes", "/etc/cni", "/opt/cni", "/var/lib/containerd",
              "/etc/kubernetes", "/usr/libexec/kubernetes")
# Components in stop order: first what creates pods, then the kubelet, then the runtime, then the API.
KUBECONFIGS = ("admin", "node", "kcm", "scheduler", "proxy", "coredns")
STOP_ORDER = ("kube-scheduler", "kube-controller-manager", "coredns", "kube-proxy", "kubelet", "containerd",
              "kube-apiserver", "etcd")


class NodeUnavailable(RuntimeError):
    """This machine cannot host a node (the reason says why); tests skip on it unless a node is required."""


class NodeError(RuntimeError):
    """The node failed to start or to answer; the message carries the failing component's log."""


def log(msg: str) -> None:
    print(f"[node] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return images_mod.cache_root()


def run(argv: Sequence[str], check: bool = True, input: str | None = None, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(argv[:6])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def node_address_is_local() -> bool:
    return subprocess.run(["ip", "route", "get", NODE_IP], capture_output=True,
                          text=True).stdout.startswith("local ")


def require_local() -> None:
    """Refuse any client call to the node unless its address is local: with the node down, the kernel would
    route a request for it out of the machine (the incident in ../shared/REAL_NODE.md)."""
    if not node_address_is_local():
        raise NodeError(f"the node is not running ({NODE_IP} is not a local address); refusing to contact it")


def clean_env() -> dict[str, str]:
    """The environment without proxy settings: a proxy in the caller's environment would otherwise carry the
    cluster's own traffic (API server, kubelet) to it, off the machine."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def ok(argv: Sequence[str]) -> bool:
    return subprocess.run(list(argv), capture_output=True).returncode == 0


def _script_output(script: str, *args: str) -> Path:
    """Run a hack/ script that prints a folder on its last stdout line (progress goes to stderr)."""
    r = subprocess.run(["bash", str(REPO_ROOT / "hack" / script), *args], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise NodeError(f"hack/{script} failed; see the lines above")
    return Path(r.stdout.strip().splitlines()[-1])


def wait_until(check: Callable[[], bool], what: str, timeout: float, interval: float = 0.1,
               context: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except NodeError:
            raise  # a component died: no point in waiting
        except Exception as exc:  # not up yet: any other error means "not yet"
            last = exc
        time.sleep(interval)
    raise NodeError(f"{what}: not ready after {timeout:.0f}s (last error: {last})\n{context()}")


# --------------------------------------------------------------------------- processes


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone; we reap it if it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop_pids(pids: list[int], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left."""
    if not pids:
        return
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    _signal_all(left, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in left):
        time.sleep(0.05)


# --------------------------------------------------------------------------- host checks


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def collisions(addresses: str | None = None, routes: str | None = None) -> list[str]:
    """Addresses and routes on this machine that overlap the node's ranges (excluding the node's own).

    ``addresses`` / ``routes``: ``ip -4 -o addr show`` / ``ip -4 route show table all`` output (read from
    the machine when None)."""
    ours = [ipaddress.ip_network(n) for n in (f"{NODE_IP}/32", CLUSTER_CIDR, SERVICE_CIDR)]
    found = []
    if addresses is None:
        addresses = run(["ip", "-4", "-o", "addr", "show"]).stdout
    if routes is None:
        routes = run(["ip", "-4", "route", "show", "table", "all"]).stdout
    for line in addresses.splitlines():
        parts = line.split()
        dev, cidr = parts[1], parts[3]
        if dev == BRIDGE or (dev == "lo" and cidr == f"{NODE_IP}/32"):
            continue
        net = ipaddress.ip_interface(cidr).network
        hits = [str(o) for o in ours if net.overlaps(o)]
        if hits:
            found.append(f"address {cidr} on {dev} overlaps {', '.join(hits)}")
    for line in routes.splitlines():
        parts = line.split()
        if not parts or parts[0] in ("default", "broadcast"):
            continue
        dst = parts[1] if parts[0] in ("local", "unreachable", "blackhole", "prohibit", "multicast") else parts[0]
        dev = parts[parts.index("dev") + 1] if "dev" in parts else ""
        if dev == BRIDGE or (dev == "lo" and dst in (NODE_IP, f"{NODE_IP}/32")):
            continue
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_network(dst, strict=False)
            if net.prefixlen == 0:
                continue
            hits = [str(o) for o in ours if net.overlaps(o)]
            if hits:
                found.append(f"route {line.strip()} overlaps {', '.join(hits)}")
    return found


def preflight() -> None:
    """Raise NodeUnavailable when this machine cannot host a node, saying why."""
    if sys.platform != "linux":
        raise NodeUnavailable("a real node needs Linux")
    if os.geteuid() != 0:
        raise NodeUnavailable("a real node needs root (it adds an address, a bridge, iptables rules and cgroups)")
    caps = effective_caps()
    missing_caps = [name for bit, name in ((12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN")) if not caps >> bit & 1]
    if missing_caps:
        raise NodeUnavailable(f"root here lacks {', '.join(missing_caps)} (a container without privileges?)")
    if not os.access("/sys/fs/cgroup", os.W_OK) and not any(
            os.access(p, os.W_OK) for p in Path("/sys/fs/cgroup").glob("*")):
        raise NodeUnavailable("the cgroup filesystem is not writable")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise NodeUnavailable("the kernel has no overlay filesystem (containerd's snapshotter needs it)")
    if not ok(["bash", str(REPO_ROOT / "hack" / "node.sh"), "check"]):
        r = subprocess.run(["bash", str(REPO_ROOT / "hack" / "node.sh"), "packages"])
        if r.returncode != 0:
            raise NodeUnavailable("the Debian packages a node needs could not be installed (see [node] above)")


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    state: Path = field(default_factory=lambda: cache_root() / "node" / "state")
    lock_timeout: float = 900.0
    images: NodeImages | None = None
    _lock_fd: int | None = None
    _keeper: subprocess.Popen[bytes] | None = None
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    host_before: dict[str, object] = field(default_factory=dict)
    host_after: dict[str, object] = field(default_factory=dict)
    running: bool = False

    # ------------------------------------------------------------------ paths

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def cfg(self) -> Path:
        return self.state / "config"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def kubeconfig(self) -> Path:
        return self.pki / "admin.kubeconfig"

    @property
    def containerd_sock(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def journal(self) -> Path:
        return self.state / "host-journal.json"

    @property
    def keeper_file(self) -> Path:
        return self.state / "keeper.json"

    @property
    def server(self) -> str:
        return f"https://{NODE_IP}:{API_PORT}"

    def cp_bin(self) -> Path:
        return _script_output("control-plane.sh")

    def node_bin(self) -> Path:
        return _script_output("node.sh")

    # ------------------------------------------------------------------ clients

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        require_local()
        r = subprocess.run([str(self._kubectl_bin), f"--kubeconfig={self.kubeconfig}", *args], input=input,
                           capture_output=True, text=True, timeout=timeout, env=clean_env())
        if check and r.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    @property
    def _kubectl_bin(self) -> Path:
        if not hasattr(self, "_kubectl_path"):
            self._kubectl_path = self.cp_bin() / "kubectl"
        return self._kubectl_path

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "-a", str(self.containerd_sock), "-n", "k8s.io", *args], check=check, timeout=timeout)

    def log_tail(self, component: str, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = (self.logs / f"{component}.log").read_text(errors="replace")
            return f"--- {component} log ---\n" + "\n".join(text.splitlines()[-lines:])
        return ""

    # ------------------------------------------------------------------ lock and keeper

    def _acquire_lock(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._keeper_info()
                if holder.get("detached"):
                    os.close(fd)
                    raise NodeError("a node from `make cluster` is running on this machine; "
                                    "stop it with `make cluster-down` first") from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise NodeError(f"the node lock is held by another session ({holder}) for over "
                                    f"{self.lock_timeout:.0f}s") from None
                if not said:
                    log(f"waiting for the node lock (another session uses the node: {holder})")
                    said = True
                time.sleep(1)
        self._lock_fd = fd

    def _keeper_info(self) -> dict[str, object]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.keeper_file.read_text()))
        return {}

    def _start_keeper(self, parent: int | None) -> None:
        """A process sharing the lock that tears the node down when ``parent`` dies (or on SIGTERM)."""
        assert self._lock_fd is not None
        argv = [sys.executable, "-m", "devharness.node", "keep", "--state", str(self.state), "--lock-fd",
                str(self._lock_fd)]
        if parent is not None:
            argv += ["--parent", str(parent)]
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.state / "keeper.log", "ab")
        self._keeper = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        pass_fds=(self._lock_fd,), start_new_session=True,
                                        cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        out.close()
        self.keeper_file.write_text(json.dumps({"pid": self._keeper.pid, "parent": parent,
                                                "detached": parent is None}))

    def _stop_keeper(self) -> None:
        """Tell our keeper its owner tore down already (SIGUSR1: exit without a teardown)."""
        if self._keeper is not None:
            with contextlib.suppress(ProcessLookupError):
                self._keeper.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._keeper.wait(10)
            if self._keeper.poll() is None:
                self._keeper.kill()
                self._keeper.wait(5)
            self._keeper = None
        self.keeper_file.unlink(missing_ok=True)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ start

    def up(self, images: NodeImages | None = None, parent: int | None = None, detach: bool = False) -> Node:
        """Start the node; ``images`` are imported into containerd (built first when None)."""
        t0 = time.monotonic()
        preflight()
        cp_bin, node_bin = self.cp_bin(), self.node_bin()
        self._acquire_lock()
        if not detach:
            from devharness import devenv

            devenv.harness_id()  # the session's marker, which the keeper (and every component) inherits
        try:
            self._start_keeper(None if detach else (parent or os.getpid()))
            self.teardown(quiet=True)  # whatever a crashed session left behind
            found = collisions()
            if found:
                raise NodeUnavailable("the node's address ranges collide with ones in use here: " + "; ".join(found))
            # the host as this node finds it, under the lock (another session's node is gone by now): what
            # the teardown must restore
            self.host_before = host_snapshot(self.state)
            self.images = images or images_mod.ensure_images()
            self._mark("preflight", t0)
            self._start_all(cp_bin, node_bin, t0)
        except BaseException:
            self.teardown(quiet=True)
            self._stop_keeper()
            self._release_lock()
            raise
        self.running = True
        log(f"node {NODE_NAME} Ready at {self.server} in {time.monotonic() - t0:.1f}s "
            f"(kubeconfig {self.kubeconfig}); " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        if detach:
            # `make cluster`: the keeper holds the lock from now on; this process may exit.
            self._keeper = None
            self._release_lock()
        return self

    def _mark(self, what: str, t0: float) -> None:
        self.timings[what] = time.monotonic() - t0

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**clean_env(), **(env or {})})
        out.close()
        self._procs[name] = proc
        return proc

    def _check_alive(self, *names: str) -> Callable[[], str]:
        def context() -> str:
            return "\n".join(self.log_tail(n) for n in names)
        return context

    def _wait(self, name: str, check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        proc = self._procs[name]

        def guarded() -> bool:
            if proc.poll() is not None:
                raise NodeError(f"{name} exited with {proc.returncode}\n{self.log_tail(name)}")
            return check()

        wait_until(guarded, what, timeout, context=self._check_alive(name))

    def _start_all(self, cp_bin: Path, node_bin: Path, t0: float) -> None:
        for d in (self.logs, self.run_dir, self.cfg):
            d.mkdir(parents=True, exist_ok=True)
        self._write_journal()
        self._network()
        self._mark("network", t0)
        self._ensure_pki()
        self._write_kubeconfigs()
        self._write_configs()
        self._mark("pki+config", t0)
        s, p = self.state, self.pki
        etcd = self._spawn("etcd", [
            str(cp_bin / "etcd"), "--data-dir", str(s / "etcd"), "--name", "kt",
            "--listen-client-urls", f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-cluster", f"kt=http://127.0.0.1:{ETCD_PEER_PORT}",
            "--unsafe-no-fsync=true", "--log-level", "warn",
        ])
        # containerd: a dead proxy, so no registry is ever reached (not even its name resolved).
        self._spawn("containerd", ["containerd", "--config", str(self.cfg / "containerd.toml")],
                    env={"HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "NO_PROXY": "",
                         "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "no_proxy": ""})
        import urllib.request

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ETCD_CLIENT_PORT}/health", timeout=1) as r:
                return r.status == 200

        self._wait("etcd", etcd_healthy, "etcd", 30)
        del etcd
        self._spawn("kube-apiserver", [
            str(cp_bin / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--bind-address={NODE_IP}", f"--advertise-address={NODE_IP}", f"--secure-port={API_PORT}",
            f"--cert-dir={p}", f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--kubelet-client-certificate={p / 'kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'kubelet-client.key'}",
            # exec/logs/port-forward go to the kubelet's InternalIP, never to a name the machine would resolve
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            "--enable-priority-and-fairness=false", "--profiling=false", "--v=0",
        ])
        imported: list[BaseException] = []

        def import_images() -> None:
            try:
                self._wait("containerd", lambda: ok(["ctr", "-a", str(self.containerd_sock), "version"]),
                           "containerd", 30)
                self._mark("containerd", t0)
                self._import_images()
                self._mark("images imported", t0)
            except BaseException as exc:  # re-raised in the starting thread
                imported.append(exc)

        importer = threading.Thread(target=import_images, name="image-import")
        importer.start()
        self._wait("kube-apiserver", lambda: self.kubectl("get", "--raw", "/readyz", check=False,
                                                          timeout=5).returncode == 0, "kube-apiserver", 60)
        self._mark("apiserver", t0)
        self._spawn("kube-controller-manager", [
            str(node_bin / "kube-controller-manager"), f"--kubeconfig={p / 'kcm.kubeconfig'}",
            f"--authentication-kubeconfig={p / 'kcm.kubeconfig'}", f"--authorization-kubeconfig={p / 'kcm.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--cert-dir={s / 'run' / 'kcm-certs'}", "--leader-elect=false",
            "--use-service-account-credentials=true", f"--service-account-private-key-file={p / 'sa.key'}",
            f"--root-ca-file={p / 'ca.crt'}", f"--cluster-signing-cert-file={p / 'ca.crt'}",
            f"--cluster-signing-key-file={p / 'ca.key'}", "--allocate-node-cidrs=true",
            f"--cluster-cidr={CLUSTER_CIDR}", "--node-cidr-mask-size=24", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-cloud-node-lifecycle-controller", "--profiling=false",
        ])
        self._spawn("kube-scheduler", [
            str(node_bin / "kube-scheduler"), f"--config={self.cfg / 'scheduler.yaml'}",
            f"--authentication-kubeconfig={p / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={p / 'scheduler.kubeconfig'}", "--bind-address=127.0.0.1",
            f"--cert-dir={s / 'run' / 'scheduler-certs'}",
        ])
        self._spawn("kube-proxy", [str(node_bin / "kube-proxy"), f"--config={self.cfg / 'kube-proxy.yaml'}"])
        self._spawn("coredns", [str(node_bin / "coredns"), "-conf", str(self.cfg / "Corefile")])
        self.kubectl("apply", "--server-side", "--field-manager=kt-node", "-f", str(self.cfg / "bootstrap.yaml"))
        # The kubelet needs containerd answering (not the images: pods come after Ready).
        while importer.is_alive() and "containerd" not in self.timings and not imported:
            time.sleep(0.05)
        if imported:
            importer.join()
            raise imported[0]
        self._spawn("kubelet", [
            str(node_bin / "kubelet"), f"--config={self.cfg / 'kubelet.yaml'}",
            f"--kubeconfig={p / 'node.kubeconfig'}", f"--root-dir={s / 'kubelet'}",
            f"--cert-dir={s / 'kubelet' / 'pki'}", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            "--v=1",
        ])

        def node_ready() -> bool:
            out = self.kubectl("get", "node", NODE_NAME, "-o",
                               "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False, timeout=5)
            return out.stdout.strip() == "True"

        self._wait("kubelet", node_ready, "node Ready", 90)
        self._mark("node Ready", t0)
        self._wait("kube-controller-manager", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False, timeout=5).returncode == 0,
            "default ServiceAccount", 60)
        self._wait("coredns", lambda: dns_answers(NODE_IP, "kubernetes.default.svc.cluster.local"),
                   "CoreDNS", 30)
        importer.join()
        if imported:
            raise imported[0]
        self._mark("dns+sa", t0)
        for name in ("kube-scheduler", "kube-proxy"):
            if self._procs[name].poll() is not None:
                raise NodeError(f"{name} exited\n{self.log_tail(name)}")

    def detached_running(self) -> bool:
        """A node of `make cluster` runs (its keeper holds the lock)."""
        info = self._keeper_info()
        return bool(info.get("detached")) and _alive(int(str(info.get("pid") or 0)))

    def import_images(self) -> None:
        """Import ``self.images`` into the running node's containerd (what is there already is skipped)."""
        self._import_images()

    def _import_images(self) -> None:
        assert self.images is not None
        present = set(self.ctr("images", "ls", "-q").stdout.split())
        for image in self.images.all():
            if image.ref in present:
                continue
            log(f"importing {image.ref} into containerd")
            self.ctr("images", "import", str(image.archive), timeout=300)
        # Older builds of the project image (one per source change) would only fill the disk: keep those whose
        # archive the image cache still keeps (the newest few).
        kept = {f"{images_mod.PROJECT_REPO}:src-{p.stem.split('-', 1)[1]}"
                for p in (cache_root() / "images" / "archives").glob("kubetriage-*.tar")}
        stale = [r for r in present if r.startswith(images_mod.PROJECT_REPO + ":")
                 and r != self.images.project.ref and r not in kept]
        if stale:
            self.ctr("images", "rm", *stale, check=False)

    # ------------------------------------------------------------------ host network

    def _write_journal(self) -> None:
        """What the host looked like before the node touched it: the teardown restores exactly this."""
        if self.journal.exists():
            return  # a crashed run's journal: its "before" is the true one (teardown removes it when done)
        sysctls: dict[str, str] = {}
        for key in SYSCTLS:
            path = Path("/proc/sys") / key.replace(".", "/")
            with contextlib.suppress(OSError):
                sysctls[key] = path.read_text().strip()
        tables = {}
        for tool in ("iptables", "ip6tables"):
            with contextlib.suppress(Exception):
                tables[tool] = run([f"{tool}-save"]).stdout
        self.journal.write_text(json.dumps({
            "sysctls": sysctls,
            "paths": {p: os.path.lexists(p) for p in HOST_PATHS},
            "iptables": tables,
            "lo_address": f" {NODE_IP}/32 " in run(["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout,
        }, indent=1))

    def _network(self) -> None:
        lo = run(["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout
        if f" {NODE_IP}/32 " not in lo:
            # no `dummy` link type in this kernel: a /32 on lo is local all the same, and pods reach it
            # through their default route (the bridge)
            run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"])
        # Refuse to go on unless the kernel delivers the node address locally: anything else would send the
        # API server's traffic (and credentials) out of the machine through the default route.
        route = run(["ip", "route", "get", NODE_IP]).stdout
        if not route.startswith("local "):
            raise NodeError(f"{NODE_IP} is not local after adding it (ip route get: {route.strip()}); refusing")
        # The bridge exists before any pod, so the Service range can be routed into it: the host reaches
        # ClusterIPs through kube-proxy's DNAT, and without rules they die on the bridge, never on eth0.
        if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
            run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        if f" {POD_GATEWAY}/24 " not in run(["ip", "-4", "-o", "addr", "show", "dev", BRIDGE]).stdout:
            run(["ip", "addr", "add", f"{POD_GATEWAY}/24", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        run(["ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", POD_GATEWAY])
        for cidr in (SERVICE_CIDR, NODE_POD_CIDR):
            got = run(["ip", "route", "get", cidr.split("/")[0].rsplit(".", 1)[0] + ".77"]).stdout
            if f" dev {BRIDGE} " not in got:
                raise NodeError(f"{cidr} is not routed into {BRIDGE} ({got.strip()}); refusing")
        # ClusterIP -> pod on the same bridge is routed (forwarded), hence ip_forward; the guard below keeps
        # forwarding from ever carrying pod traffic anywhere else.
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        if not ok(["iptables", "-t", GUARD_TABLE, "-C", *GUARD_RULE]):
            run(["iptables", "-t", GUARD_TABLE, "-I", *GUARD_RULE])
        if not self.egress_guard_present():
            raise NodeError("the pod egress guard rule is missing after inserting it; refusing")
        bnf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if bnf.exists() and bnf.read_text().strip() != "1":
            bnf.write_text("1\n")  # kube-proxy's DNAT must see bridged pod-to-Service traffic

    @staticmethod
    def egress_guard_present() -> bool:
        """The pod egress guard, asserted by its presence (never by sending anything out)."""
        return ok(["iptables", "-t", GUARD_TABLE, "-C", *GUARD_RULE])

    # ------------------------------------------------------------------ PKI and configuration

    def _ensure_pki(self) -> None:
        """Kept between starts (3 s of key generation saved); remade when missing or nearly expired."""
        marker = self.pki / "done"
        fresh = marker.exists() and time.time() - marker.stat().st_mtime < 300 * 86400
        if fresh and marker.read_text().strip() == NODE_IP:
            return
        shutil.rmtree(self.pki, ignore_errors=True)
        d = self.pki
        d.mkdir(parents=True)

        def o(*args: str) -> None:
            run(["openssl", *args], timeout=60)

        o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
          "-days", "365", "-subj", "/CN=kubetriage-node-ca")
        sans = (f"IP:127.0.0.1,IP:{NODE_IP},IP:{API_SERVICE_IP},DNS:localhost,DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
        (d / "ext.cnf").write_text(f"[req]\ndistinguished_name=dn\n[dn]\n[srv]\nsubjectAltName={sans}\n"
                                   "extendedKeyUsage=serverAuth\n[cli]\nextendedKeyUsage=clientAuth\n")
        certs = {
            "apiserver": ("/CN=kube-apiserver", "srv"),
            "admin": ("/O=system:masters/CN=kubetriage-admin", "cli"),
            "kubelet-client": ("/CN=kube-apiserver-kubelet-client", "cli"),
            "node": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", "cli"),
            "kcm": ("/CN=system:kube-controller-manager", "cli"),
            "scheduler": ("/CN=system:kube-scheduler", "cli"),
            "proxy": ("/CN=system:kube-proxy", "cli"),
            "coredns": ("/CN=kubetriage:coredns", "cli"),
        }
        for name, (subj, ext) in certs.items():
            o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
              "-subj", subj)
            o("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
              "-CAcreateserial", "-out", str(d / f"{name}.crt"), "-days", "365", "-extfile", str(d / "ext.cnf"),
              "-extensions", ext)
        o("genrsa", "-out", str(d / "sa.key"), "2048")
        o("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))
        for f in d.iterdir():
            f.chmod(0o600 if f.suffix == ".key" else 0o644)
        marker.write_text(NODE_IP)

    def _write_kubeconfigs(self) -> None:
        """Written at every start and removed at teardown: a kubeconfig naming the node address must not
        outlive the node, or a later `kubectl` would send its request out through the default route."""
        d = self.pki
        for name in KUBECONFIGS:
            (d / f"{name}.kubeconfig").write_text(
                "apiVersion: v1\nkind: Config\ncurrent-context: kt\nclusters:\n- name: kt\n"
                f"  cluster: {{server: \"{self.server}\", certificate-authority: {d / 'ca.crt'}}}\n"
                f"users:\n- name: u\n  user: {{client-certificate: {d / f'{name}.crt'}, "
                f"client-key: {d / f'{name}.key'}}}\ncontexts:\n- name: kt\n  context: {{cluster: kt, user: u}}\n")

    def _write_configs(self) -> None:
        s, c, p = self.state, self.cfg, self.pki
        (s / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (c / "containerd.toml").write_text(f"""version = 2
root = "{s / 'containerd' / 'root'}"
state = "{s / 'containerd' / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.containerd_sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{s / 'containerd' / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images_mod.PAUSE_REF}"
  enable_cdi = false
  stream_server_address = "127.0.0.1"
  # This VM's bounding set lacks CAP_SYS_RESOURCE: nobody may lower oom_score_adj below 0, so clamp the
  # sandbox (-998) and Guaranteed-pod (-997) scores to containerd's own instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{s / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{s / 'cni' / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    # Every registry this cluster might name points at a closed local port (with the dead proxy: nothing
    # is ever pulled; images are imported).
    config_path = "{c / 'certs.d'}"
""")
        for reg in REGISTRIES:
            (c / "certs.d" / reg).mkdir(parents=True, exist_ok=True)
            (c / "certs.d" / reg / "hosts.toml").write_text(
                'server = "http://127.0.0.1:9"\n[host."http://127.0.0.1:9"]\n  capabilities = ["pull", "resolve"]\n')
        (s / "cni" / "net.d" / "10-ktnet.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "ktnet",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(s / "cni" / "ipam"),
                          "ranges": [[{"subnet": NODE_POD_CIDR, "gateway": POD_GATEWAY}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=1))
        (c / "resolv.conf").write_text(f"nameserver {DNS_SERVICE_IP}\nsearch cluster.local\n")
        (c / "kubelet.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 here (hybrid, no systemd): allowed again, cgroupfs driver
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{self.containerd_sock}
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {p / 'ca.crt'}}}
authorization: {{mode: Webhook}}
clusterDomain: cluster.local
clusterDNS: [{DNS_SERVICE_IP}]
resolvConf: {c / 'resolv.conf'}
podLogsDir: {s / 'pod-logs'}
volumePluginDir: {s / 'kubelet' / 'volume-plugins'}
registerNode: true
serializeImagePulls: false
# never garbage-collect the imported images (nothing could pull them back)
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
maxPods: 60
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
fileCheckFrequency: 10s
shutdownGracePeriod: 0s
""")
        (c / "kube-proxy.yaml").write_text(f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {p / 'proxy.kubeconfig'}}}
hostnameOverride: {NODE_NAME}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: iptables
clusterCIDR: {CLUSTER_CIDR}
nodePortAddresses: ["{NODE_IP}/32"]
# leave the host's conntrack settings alone
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
        (c / "scheduler.yaml").write_text(f"""apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection: {{kubeconfig: {p / 'scheduler.kubeconfig'}}}
leaderElection: {{leaderElect: false}}
# Pods that could not be scheduled are retried within 2 s (default up to 10 s) once room frees up: tests on
# scheduling order wait less, the order itself (priority first) is the scheduler's own.
podInitialBackoffSeconds: 1
podMaxBackoffSeconds: 2
""")
        (c / "Corefile").write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    # no `forward` plugin: names outside the cluster are never asked anywhere
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {p / 'coredns.kubeconfig'} kt
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        (c / "bootstrap.yaml").write_text(f"""# CoreDNS runs on the host at {NODE_IP}:53; a selector-less kube-dns
# Service and a hand-made EndpointSlice give pods the usual {DNS_SERVICE_IP} (kube-proxy DNATs it to the host).
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  clusterIP: {DNS_SERVICE_IP}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-host
  namespace: kube-system
  labels: {{kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: kubetriage-node}}
addressType: IPv4
ports:
- {{name: dns, port: 53, protocol: UDP}}
- {{name: dns-tcp, port: 53, protocol: TCP}}
endpoints:
- addresses: ["{NODE_IP}"]
  conditions: {{ready: true}}
---
# CoreDNS's own identity: read what it serves, nothing else.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "kubetriage:coredns"}}
rules:
- apiGroups: [""]
  resources: [services, endpoints, namespaces, pods]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "kubetriage:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "kubetriage:coredns"}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "kubetriage:coredns"}}
---
# The API server's client certificate for the kubelet (logs, exec, port-forward): the kubelet asks the API
# server whether that user may, as kubeadm sets it up.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "kubetriage:apiserver-kubelet"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}}
""")

    # ------------------------------------------------------------------ stop

    def down(self) -> None:
        """Stop the node this process started (or a detached one) and remove every trace of it."""
        if self._lock_fd is not None:
            # our own node: tear down and look at the host before another session may take the lock
            try:
                self._stop_keeper()
                self.teardown()
                self.host_after = host_snapshot(self.state)
            finally:
                self.running = False
                self._release_lock()
            return
        info = self._keeper_info()
        if info.get("detached") and _alive(int(str(info.get("pid") or 0))):
            # `make cluster-down`: the keeper owns the node; it tears down on SIGTERM and releases the lock.
            pid = int(str(info["pid"]))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        # Leftovers of a crashed run, unless a live session owns the node (then it is theirs to stop).
        timeout, self.lock_timeout = self.lock_timeout, 5.0
        try:
            self._acquire_lock()
        except NodeError:
            log("the node is in use by another session; leaving it alone")
            return
        finally:
            self.lock_timeout = timeout
        try:
            self.teardown()
        finally:
            self._release_lock()

    def component_pids(self, name: str) -> list[int]:
        """Processes of a component that belong to this node: their command line names the state folder.

        Found through /proc, not PID files, so a crashed session's processes are found as well, and a
        reused PID is never mistaken for one of ours."""
        state = str(self.state)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            argv = cmdline(int(entry.name))
            if argv and os.path.basename(argv[0]) == name and any(state in a for a in argv[1:]):
                pids.append(int(entry.name))
        return pids

    def _shim_pids(self) -> list[int]:
        sock = str(self.containerd_sock)
        return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
                and (argv := cmdline(int(e.name))) and "containerd-shim" in os.path.basename(argv[0])
                and sock in argv]

    def teardown(self, quiet: bool = False) -> None:
        """Remove the node and every host change it made. Idempotent; works after a crash too.

        Processes are this node's when their command line names its state folder. Host changes (pods'
        cgroups, network namespaces, the bridge, the address, iptables, sysctls, host folders) are undone
        only with the journal of the run that made them: without one this node changed nothing, and what
        exists belongs to someone else (another kubelet's pods, say)."""
        t0 = time.monotonic()
        say = (lambda _m: None) if quiet else log
        journal = self._read_journal()
        for name in STOP_ORDER[:5]:
            _stop_pids(self.component_pids(name), timeout=3)
        if journal:
            _kill_cgroup_procs()
        containerd = self.component_pids("containerd")
        if not containerd and journal and (self.cfg / "containerd.toml").exists():
            # A crashed run: containerd is gone but its store lists the dead pods' containers. Start it briefly
            # so they are deleted properly (snapshots, sandbox records) instead of lingering in the store.
            self.logs.mkdir(parents=True, exist_ok=True)
            self._spawn("containerd-cleanup", ["containerd", "--config", str(self.cfg / "containerd.toml")],
                        env={"HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY})
            with contextlib.suppress(NodeError):
                wait_until(lambda: ok(["ctr", "-a", str(self.containerd_sock), "version"]), "containerd", 15)
            containerd = self.component_pids("containerd")
        if containerd and self.containerd_sock.exists():
            with contextlib.suppress(Exception):
                tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=20).stdout.split()
                if tasks:
                    self.ctr("tasks", "delete", "-f", *tasks, check=False, timeout=60)
                containers = self.ctr("containers", "ls", "-q", check=False, timeout=20).stdout.split()
                if containers:
                    self.ctr("containers", "delete", *containers, check=False, timeout=60)
        _stop_pids(self.component_pids("containerd"), timeout=5)
        _stop_pids(self._shim_pids(), timeout=1)
        if journal:
            _kill_cgroup_procs()
        for name in STOP_ORDER[6:]:
            _stop_pids(self.component_pids(name), timeout=5)
        self._procs.clear()
        say(f"processes stopped ({time.monotonic() - t0:.1f}s)")
        self._unmount_all(host_too=bool(journal))
        if journal:
            for binary in (cache_root() / "node").glob("*/kube-proxy"):
                run([str(binary), "--cleanup"], check=False, timeout=30)  # its KUBE-* chains, both families
                break
            for ns in run(["ip", "netns", "list"], check=False).stdout.splitlines():
                name = ns.split(" ")[0]
                if name.startswith("cni-"):
                    run(["ip", "netns", "delete", name], check=False)
            _remove_cgroups()
            if os.path.exists(f"/sys/class/net/{BRIDGE}"):
                # A pod's network namespace can outlive its processes for minutes (orphaned TCP sockets still
                # retransmitting hold it), and with it the veth pair: delete the bridge's ports explicitly.
                for line in run(["ip", "-o", "link", "show", "master", BRIDGE], check=False).stdout.splitlines():
                    port = line.split(":")[1].strip().split("@")[0]
                    run(["ip", "link", "delete", port], check=False)
                run(["ip", "link", "delete", BRIDGE], check=False)
            if not journal.get("lo_address", False):
                run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"], check=False)
            while ok(["iptables", "-t", GUARD_TABLE, "-C", *GUARD_RULE]):
                run(["iptables", "-t", GUARD_TABLE, "-D", *GUARD_RULE], check=False)
            for tool, before in dict(journal.get("iptables") or {}).items():
                _restore_iptables(tool, before)
            for key, value in dict(journal.get("sysctls") or {}).items():
                with contextlib.suppress(OSError):
                    Path("/proc/sys", key.replace(".", "/")).write_text(value + "\n")
            for path, existed in dict(journal.get("paths") or {}).items():
                if not existed and os.path.lexists(path):
                    _remove_tree(Path(path))
        for d in ("etcd", "kubelet", "runc", "pod-logs", "cni/ipam", "containerd/state", "run"):
            _remove_tree(self.state / d)
        for name in KUBECONFIGS:
            (self.pki / f"{name}.kubeconfig").unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)
        say(f"node torn down in {time.monotonic() - t0:.1f}s")

    def _read_journal(self) -> dict[str, object]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.journal.read_text()))
        return {}

    def _unmount_all(self, host_too: bool) -> None:
        """Unmount everything under the state folder (and the host folders pods use), deepest first."""
        prefixes = [str(self.state) + "/"]
        if host_too:
            prefixes += ["/run/netns/", "/var/run/netns/", "/run/containerd/", "/var/lib/kubelet/"]
        for _ in range(3):
            points = []
            with contextlib.suppress(OSError):
                for line in Path("/proc/self/mountinfo").read_text().splitlines():
                    mp = line.split()[4].replace("\\040", " ")
                    if any(mp.startswith(p) for p in prefixes):
                        points.append(mp)
            if not points:
                return
            for mp in sorted(set(points), key=len, reverse=True):
                run(["umount", "-l", mp], check=False)


# --------------------------------------------------------------------------- teardown helpers


def _kubepods_cgroups() -> list[Path]:
    found = []
    root = Path("/sys/fs/cgroup")
    for top in [root, *root.glob("*")]:
        k = top / "kubepods"
        if k.is_dir():
            found.append(k)
    return found


def _kill_cgroup_procs() -> None:
    """SIGKILL every process in the kubepods cgroups: the pods' containers, however they were left."""
    for _ in range(3):
        pids: set[int] = set()
        for top in _kubepods_cgroups():
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        if not pids:
            return
        _signal_all(sorted(pids), signal.SIGKILL)
        time.sleep(0.2)


def _remove_cgroups() -> None:
    for top in _kubepods_cgroups():
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            for _ in range(10):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


_OURS = re.compile(r"KUBE-|CNI-|10\.244\.|10\.96\.|10\.250\.0\.1|" + re.escape(BRIDGE))


def _save_rules(text: str) -> dict[str, tuple[set[str], list[str]]]:
    """iptables-save text -> {table: (chains, rules)}."""
    tables: dict[str, tuple[set[str], list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables[current] = (set(), [])
        elif current and line.startswith(":"):
            tables[current][0].add(line[1:].split()[0])
        elif current and line.startswith("-A "):
            tables[current][1].append(line)
    return tables


def _restore_iptables(tool: str, before: str | None) -> None:
    """Delete the rules and chains the node (kubelet, kube-proxy, CNI) added since ``before``."""
    try:
        now = run([f"{tool}-save"], timeout=30).stdout
    except Exception:
        return
    for argv in iptables_cleanup(tool, before or "", now):
        run(argv, check=False)
    old = _save_rules(before or "")
    # iptables-nft creates a table on first use and never deletes it: drop the ones that did not exist before
    # and are empty again (built-in chains, ACCEPT, no rules), so not even an empty table stays behind.
    with contextlib.suppress(Exception):
        after = run([f"{tool}-save"], timeout=30).stdout
        family = "ip6" if tool == "ip6tables" else "ip"
        for table, (_chains, rules) in _save_rules(after).items():
            body = after.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
            policies = re.findall(r"^:\S+ (\S+)", body, flags=re.M)
            if table not in old and not rules and all(p in ("ACCEPT", "-") for p in policies) and shutil.which("nft"):
                run(["nft", "delete", "table", family, table], check=False)


def iptables_cleanup(tool: str, before: str, now: str) -> list[list[str]]:
    """The commands that remove what was added between two ``iptables-save`` outputs, in order.

    Only rules and chains that are new *and* about the node (KUBE-/CNI- chains, its ranges, its bridge) are
    touched, so rules another program adds meanwhile are left alone. Rules first (the jumps into the chains),
    then the chains are flushed, then deleted."""
    old = _save_rules(before)
    cmds: list[list[str]] = []
    for table, (chains, rules) in _save_rules(now).items():
        old_chains, old_rules = old.get(table, (set(), []))
        old_set = set(old_rules)
        for rule in rules:
            if rule not in old_set and _OURS.search(rule):
                cmds.append([tool, "-t", table, "-D", *_unquote(rule.split()[1:])])
        new_chains = sorted(c for c in chains if c not in old_chains and c.startswith(("KUBE-", "CNI-")))
        cmds += [[tool, "-t", table, "-F", c] for c in new_chains]
        cmds += [[tool, "-t", table, "-X", c] for c in new_chains]
    return cmds


def _unquote(args: list[str]) -> list[str]:
    """iptables-save quotes comments ("..."); rejoin and strip them for the command line."""
    out: list[str] = []
    buf: list[str] | None = None
    for a in args:
        if buf is not None:
            buf.append(a)
            if a.endswith('"'):
                out.append(" ".join(buf)[1:-1])
                buf = None
        elif a.startswith('"') and not (len(a) > 1 and a.endswith('"')):
            buf = [a]
        elif a.startswith('"') and a.endswith('"') and len(a) > 1:
            out.append(a[1:-1])
        else:
            out.append(a)
    return out


def dns_answers(server: str, name: str) -> bool:
    """One A query over UDP to ``server`` (local): at least one answer."""
    q = struct.pack(">HHHHHH", 0x6b74, 0x100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(q, (server, 53))
        r = s.recv(512)
    return struct.unpack(">H", r[6:8])[0] >= 1


def host_snapshot(state: Path | None = None) -> dict[str, object]:
    """What the node could change on the host, for before/after comparisons (tests, ``make cluster-down``)."""
    state = state or Node().state

    def out(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(list(argv), capture_output=True, text=True, timeout=30).stdout
        return ""

    def rules(text: str) -> list[str]:
        return [re.sub(r" \[\d+:\d+\]$", "", ln) for ln in text.splitlines() if ln and not ln.startswith("#")]

    sysctls = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            sysctls[key] = Path("/proc/sys", key.replace(".", "/")).read_text().strip()
    prefixes = (str(state) + "/", "/run/netns/", "/var/run/netns/", "/run/containerd/", "/var/lib/kubelet/")
    mounts = sorted(ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if ln.split()[4].startswith(prefixes))
    procs = sorted(" ".join(a) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != os.getpid()
                   for a in [cmdline(int(e.name))] if a and any(str(state) in x for x in a[1:])
                   and "devharness.node" not in a)
    return {
        "sysctls": sysctls,
        "iptables": rules(out("iptables-save")),
        "ip6tables": rules(out("ip6tables-save")),
        "nft tables": sorted(out("nft", "list", "tables").splitlines()),
        "links": sorted(ln.split(":")[1].strip().split("@")[0] for ln in out("ip", "-o", "link").splitlines()),
        "addresses": sorted(" ".join(ln.split()[1:4]) for ln in out("ip", "-o", "addr").splitlines()),
        "routes": sorted(out("ip", "-4", "route", "show", "table", "all").splitlines()
                         + out("ip", "-6", "route", "show", "table", "all").splitlines()),
        "netns": sorted(out("ip", "netns", "list").splitlines()),
        "mounts": mounts,
        "cgroups": sorted(str(p) for p in _kubepods_cgroups()),
        "host paths": {p: os.path.lexists(p) for p in HOST_PATHS},
        "processes": procs,
    }


# --------------------------------------------------------------------------- keeper and CLI


def keep(state: Path, lock_fd: int, parent: int | None) -> int:
    """Hold the node lock; tear the node down when ``parent`` dies or on SIGTERM; SIGUSR1: just exit."""
    node = Node(state=state)
    stop = {"teardown": False, "exit": False}

    def on_term(_s: int, _f: object) -> None:
        stop["teardown"] = stop["exit"] = True

    def on_usr1(_s: int, _f: object) -> None:
        stop["exit"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    orphaned = False
    while not stop["exit"]:
        if parent is not None and not _alive(parent):
            log(f"owner {parent} is gone: tearing the node down")
            stop["teardown"] = stop["exit"] = orphaned = True
            break
        time.sleep(0.5)
    if orphaned:
        # first: the session's clients (Alertmanager posting to a Service, ...) must not outlive the node's
        # routes, or their retries would go out through the default route
        _stop_session_leftovers()
    if stop["teardown"]:
        node.teardown()
    node.keeper_file.unlink(missing_ok=True)
    os.close(lock_fd)
    return 0


def _stop_session_leftovers() -> None:
    """The dead owner's other servers (Redis, PostgreSQL, ... started by devharness.devenv carry the session's
    marker, as this keeper does): a killed test session leaves none of them running either."""
    from devharness import devenv

    marker = os.environ.get(devenv.HARNESS_ENV)
    if marker:
        pids = [pid for pid, _ in devenv.leftover_processes(marker) if pid != os.getpid()]
        if pids:
            log(f"stopping {len(pids)} process(es) the dead session left: {pids}")
            _stop_pids(pids, timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devharness.node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the node and leave it running (the keeper stays)")
    up.add_argument("--no-images", action="store_true", help="import only what is already built")
    sub.add_parser("down", help="stop the node and undo every host change")
    sub.add_parser("status", help="print whether a node runs")
    k = sub.add_parser("keep")
    k.add_argument("--state", type=Path, required=True)
    k.add_argument("--lock-fd", type=int, required=True)
    k.add_argument("--parent", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "keep":
        return keep(args.state, args.lock_fd, args.parent)
    node = Node()
    if args.cmd == "up":
        try:
            node.up(detach=True)
        except (NodeUnavailable, NodeError) as exc:
            log(str(exc))
            return 1
        print(node.kubeconfig)
        return 0
    if args.cmd == "down":
        node.down()
        return 0
    info = node._keeper_info()
    running = bool(info) and _alive(int(str(info.get("pid", 0))))
    print(f"node {'running' if running else 'not running'}; kubeconfig {node.kubeconfig}")
    return 0 if running else 3


if __name__ == "__main__":
    raise SystemExit(main())

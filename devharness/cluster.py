"""``make cluster`` / ``make cluster-down``: kubetriage on a real single-node cluster, without Docker.

``up`` starts the node (``devharness.node``, left running with its keeper),
builds the images with buildah and imports them, installs charts/kubetriage
with them (bundled Redis from Debian's redis-server, SQLite, an ingest token
in a Secret) and prints how to use it. ``down`` removes the node and every
host change it made. Both need root: the node adds an address on ``lo``, a
bridge and iptables rules, and runs containerd and the kubelet.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time

from devharness import images, node

NAMESPACE = "kubetriage"
RELEASE = "kubetriage"


def say(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def helm_binary() -> str:
    r = subprocess.run(["bash", str(node.REPO_ROOT / "hack" / "helm.sh")], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit("building helm failed; see the [helm] lines above")
    return r.stdout.strip().splitlines()[-1]


def up() -> int:
    t0 = time.monotonic()
    n = node.Node()
    try:
        node.preflight()
        say("building the images with buildah (cached; the first build takes a few minutes)")
        imgs = images.ensure_images()
        if n.detached_running():
            say("the node is already running: importing the images and upgrading the release")
            n.images = imgs
            n.import_images()
        else:
            n.up(images=imgs, detach=True)
    except (node.NodeUnavailable, node.NodeError, images.ImageError) as exc:
        say(f"cannot start the cluster: {exc}")
        return 1
    helm = helm_binary()
    node.require_local()  # the calls below go to the node's address: only while it is local
    kubectl = str(n.cp_bin() / "kubectl")
    k = [kubectl, f"--kubeconfig={n.kubeconfig}"]
    env = node.clean_env()
    subprocess.run([*k, "create", "namespace", NAMESPACE], capture_output=True, env=env)
    if subprocess.run([*k, "-n", NAMESPACE, "get", "secret", "kubetriage-ingest"], capture_output=True,
                      env=env).returncode != 0:
        subprocess.run([*k, "-n", NAMESPACE, "create", "secret", "generic", "kubetriage-ingest",
                        f"--from-literal=token={secrets.token_hex(24)}"], check=True, capture_output=True, env=env)
    say(f"helm upgrade --install {RELEASE} charts/kubetriage (image {imgs.project.ref})")
    r = subprocess.run([helm, "upgrade", "--install", RELEASE, str(node.REPO_ROOT / "charts" / "kubetriage"),
                        "-n", NAMESPACE, f"--kubeconfig={n.kubeconfig}",
                        "--set", f"image.repository={imgs.project.repository}",
                        "--set", f"image.tag={imgs.project.tag}",
                        "--set", "image.pullPolicy=Never",
                        "--set", f"redis.bundled.image.repository={imgs.redis.repository}",
                        "--set", f"redis.bundled.image.tag={imgs.redis.tag}",
                        "--set", "redis.bundled.image.pullPolicy=Never",
                        "--set", "ingest.existingSecret=kubetriage-ingest", "--wait", "--timeout", "5m"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        say(f"helm install failed (the node stays up; `make cluster-down` removes it):\n{r.stderr}")
        return 1
    svc = subprocess.run([*k, "-n", NAMESPACE, "get", "svc", f"{RELEASE}-ingest", "-o",
                          "jsonpath={.spec.clusterIP}"], capture_output=True, text=True, env=env).stdout.strip()
    say(f"ready in {time.monotonic() - t0:.0f}s")
    print(f"""
kubetriage runs on a real single-node cluster (node {node.NODE_NAME}, {node.NODE_IP}; pods have no route out).

  export KUBECONFIG={n.kubeconfig}
  alias kubectl={kubectl}
  kubectl -n {NAMESPACE} get pods,triagepools

Send a first alert to the ingest Service (this host reaches ClusterIPs through the node's bridge):

  TOKEN=$(kubectl -n {NAMESPACE} get secret kubetriage-ingest -o jsonpath='{{.data.token}}' | base64 -d)
  curl -sS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
    http://{svc}:8000/v1/alertmanager -d '{{
      "version": "4", "status": "firing", "receiver": "kubetriage",
      "alerts": [{{"status": "firing", "labels": {{"alertname": "EndpointDown", "severity": "critical"}},
                  "annotations": {{"summary": "20 consecutive failed probes"}},
                  "startsAt": "2025-01-01T00:00:00Z"}}]}}'
  kubectl -n {NAMESPACE} get tj

Rebuild and reinstall after a change: make cluster (again). Remove everything: make cluster-down
""")
    return 0


def down() -> int:
    n = node.Node()
    n.down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devharness.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("cmd", choices=["up", "down"])
    args = parser.parse_args(argv)
    return up() if args.cmd == "up" else down()


if __name__ == "__main__":
    raise SystemExit(main())

"""The Helm chart, proven against the real API server.

- ``helm lint`` and ``values.schema.json`` (a typo must fail the install);
- ``helm template`` with several value sets, each server-side applied (not a
  dry run) in fresh namespaces, so the API server's own validation, defaulting
  and pruning judge every object;
- least privilege: the chart's ServiceAccount and RBAC are applied, the real
  operator runs with that ServiceAccount's token (signed by the control
  plane) and the chart's own environment, and a pipeline completes; then a
  list of things the operator must never do is refused with 403, and
  ``kubectl auth can-i --list`` shows nothing the chart did not intend.

helm itself is built from a pinned Go module by hack/helm.sh and cached
outside the repository, like the control plane.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import sqlite3
import subprocess
import tarfile
import textwrap
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from devharness import devenv, localrun
from devharness.localpods import LocalPods
from kubetriage.infra.config import Settings
from kubetriage.infra.kube import ApiError, Kube, triagejob_path, triagepool_path, triagerule_path
from tests.conftest import CRDS, REPO
from tests.pipeline import alert_spec, script_spec
from tests.receiver import Receiver
from tests.waiting import eventually

CHART = REPO / "charts" / "kubetriage"
DATA = Path(__file__).parent / "data"
MONITORING_CRDS = DATA / "monitoring.coreos.com-crds.yaml"
FIELD_MANAGER = "kubetriage-chart-test"
# Objects every authenticated user may use (system:basic-user / system:discovery), not granted by the chart.
BUILTIN_RESOURCES = {
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
    "selfsubjectreviews.authentication.k8s.io",
}


# --------------------------------------------------------------------------- helm


@pytest.fixture(scope="session")
def helm() -> str:
    """The pinned helm binary (built once with Go and cached; $HELM overrides)."""
    result = subprocess.run(["bash", str(REPO / "hack" / "helm.sh")], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise devenv.DevEnvError("building helm failed; see the [helm] lines above")
    return result.stdout.strip().splitlines()[-1]


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def write_values(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def render(helm: str, tmp: Path, release: str, namespace: str, values: dict[str, Any],
           *extra: str) -> list[dict[str, Any]]:
    """``helm template`` as a list of objects (the documents Helm would send to the API server)."""
    vfile = write_values(tmp / f"{release}-values.yaml", values)
    out = run_helm(helm, "template", release, str(CHART), "-n", namespace, "-f", str(vfile), *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def apply(cluster: devenv.ControlPlane, docs: list[dict[str, Any]]) -> None:
    """Server-side apply, the way Helm 4 and GitOps tools send objects: the API server validates everything."""
    cluster.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-",
                    input=yaml.safe_dump_all(docs))


def delete(cluster: devenv.ControlPlane, docs: list[dict[str, Any]]) -> None:
    """Remove what a test applied. PriorityClasses stay: other tests use the same three (identical) classes,
    and without a controller-manager a deleted namespace keeps its objects, so they are deleted one by one."""
    keep = [d for d in docs if d["kind"] != "PriorityClass"]
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=yaml.safe_dump_all(keep),
                    check=False)


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def operator_cluster_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's ClusterRole: the one the chart binds (the others are the users' aggregated roles)."""
    return find(docs, "ClusterRole", find(docs, "ClusterRoleBinding")["roleRef"]["name"])


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def aggregated_user_roles(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The chart's ClusterRoles for users, by the built-in role they aggregate into (view, edit, admin)."""
    out = {}
    for d in docs:
        targets = [k.removeprefix(AGGREGATE) for k in d["metadata"]["labels"] if k.startswith(AGGREGATE)]
        if d["kind"] == "ClusterRole" and targets:
            assert len(targets) == 1, d["metadata"]
            out[targets[0]] = d
    return out


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = next(d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator")
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def new_namespace(cluster: devenv.ControlPlane, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    return ns


def secret(cluster: devenv.ControlPlane, ns: str, name: str, **data: str) -> None:
    args = [f"--from-literal={k}={v}" for k, v in data.items()]
    cluster.kubectl("create", "secret", "generic", name, "-n", ns, *args)


# --------------------------------------------------------------------------- lint, schema, single-source CRDs


def test_helm_lint_strict(helm: str) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_crds_have_one_copy_that_template_and_package_follow(helm: str, tmp_path: Path) -> None:
    """charts/kubetriage/crds is a link to crds/: Helm must read through it, and a packaged chart must
    carry the real files (a chart repository has no repository checkout to link to)."""
    link = CHART / "crds"
    assert link.is_symlink() and link.resolve() == CRDS.resolve()
    expected = {p.name: p.read_bytes() for p in sorted(CRDS.glob("*.yaml"))}
    want = [d for p in sorted(CRDS.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    out = run_helm(helm, "template", "t", str(CHART), "--include-crds").stdout
    crds = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    assert sorted(json.dumps(d, sort_keys=True) for d in crds) == sorted(json.dumps(d, sort_keys=True) for d in want)
    run_helm(helm, "package", str(CHART), "-d", str(tmp_path))
    (archive,) = tmp_path.glob("kubetriage-*.tgz")
    with tarfile.open(archive) as tar:
        packed = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                  if m.name.startswith("kubetriage/crds/") and m.isfile()}
        assert not [m.name for m in tar.getmembers() if m.issym() or m.islnk()], "links must be resolved"
    assert packed == expected


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "operater.replicas=2"], "additional properties 'operater' not allowed"),
    (["--set", "metrics.serviceMonitor.enabeld=true"], "additional properties 'enabeld' not allowed"),
    (["--set", "operator.replicas=0"], "/operator/replicas"),
    (["--set", "config.leaseSeconds=soon"], "/config/leaseSeconds"),
    (["--set", "redis.url=http://redis:6379"], "/redis/url"),
    (["--set-json", 'watchNamespaces=["Team_A"]'], "/watchNamespaces/0"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "database.existingSecret=My Secret"], "/database/existingSecret"),
], ids=["top-level-typo", "nested-typo", "replicas-0", "not-a-number", "redis-url-scheme", "namespace-name",
        "pull-policy", "secret-name"])
def test_values_schema_rejects_bad_values(helm: str, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", "t", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "redis.url=redis://r:6379/0"], "set either redis.url / redis.existingSecret"),
    (["--set", "redis.bundled.enabled=false"], "the operator needs a Redis"),
    (["--set", "peering.enabled=false"], "operator.replicas > 1 needs peering.enabled=true"),
], ids=["two-redis-sources", "no-redis", "replicas-without-peering"])
def test_contradictory_values_fail_with_a_clear_message(helm: str, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", "t", str(CHART), *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --------------------------------------------------------------------------- value sets, server-side applied


@dataclass
class ValueSet:
    id: str
    values: dict[str, Any]
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # created in the release namespace first
    watch_team: bool = False  # watchNamespaces: [a second fresh namespace]


VALUE_SETS = [
    ValueSet("defaults", {}),
    ValueSet("bundled-redis-namespaced-netpol", {
        "redis": {"bundled": {"enabled": True, "persistence": {"enabled": True, "size": "2Gi"}}},
        "networkPolicy": {"enabled": True,
                          "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
        "operator": {"replicas": 3},
    }, watch_team=True),
    ValueSet("external-redis-postgres-secrets", {
        "redis": {"bundled": {"enabled": False}, "existingSecret": "kt-redis"},
        "database": {"existingSecret": "kt-db", "existingSecretKey": "dsn"},
        "llm": {"model": "openai/gpt-4o-mini", "existingSecret": "kt-llm"},
        "ingest": {"existingSecret": "kt-ingest"},
        "networkPolicy": {"enabled": True},
    }, secrets={"kt-redis": {"url": "redis://:pw@redis.example:6379/0"},
                "kt-db": {"dsn": "postgresql://kubetriage:pw@db.example/triage"},
                "kt-llm": {"api-key": "sk-test"}, "kt-ingest": {"token": "t" * 32}}),
    ValueSet("evidence-egress", {
        "pools": [{"name": "default", "spec": {"priorityClassName": "kubetriage-p1", "evidence": {
            "prometheus": {"url": "http://prometheus-operated.monitoring:9090", "allowHTTP": True,
                           "allowPrivateEndpoints": True, "bearerTokenSecretRef": {"name": "prom", "key": "token"}},
            "alertmanager": {"url": "https://alertmanager.monitoring:9093", "allowPrivateEndpoints": True,
                             "basicAuth": {"username": {"name": "am", "key": "user"},
                                           "password": {"name": "am", "key": "password"}},
                             "tls": {"caConfigMapRef": {"name": "monitoring-ca", "key": "ca.crt"}}},
            "timeoutSeconds": 3, "budgetSeconds": 8}}}],
        "networkPolicy": {"enabled": True, "workerEgress": [
            {"ports": [{"protocol": "TCP", "port": 443}]},
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
             "ports": [{"protocol": "TCP", "port": 9090}, {"protocol": "TCP", "port": 9093}]}]},
    }),
    ValueSet("prometheus-operator", {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "podMonitor": {"enabled": True},
                    "prometheusRule": {"enabled": True},
                    "grafanaDashboard": {"enabled": True}},
    }),
]


@pytest.fixture(scope="module")
def monitoring_crds(cluster: devenv.ControlPlane) -> None:
    """The Prometheus Operator's CRDs (minimal copies in tests/data), so its objects can really be applied."""
    cluster.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(MONITORING_CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "-f", str(MONITORING_CRDS), "--timeout=60s")


@pytest.mark.cluster
@pytest.mark.parametrize("vs", VALUE_SETS, ids=[v.id for v in VALUE_SETS])
def test_value_set_renders_lints_and_applies_server_side(
        cluster: devenv.ControlPlane, helm: str, tmp_path: Path, monitoring_crds: None, vs: ValueSet) -> None:
    ns = new_namespace(cluster, "chart")
    team = new_namespace(cluster, "team") if vs.watch_team else None
    values = {**vs.values, **({"watchNamespaces": [team]} if team else {})}
    for name, data in vs.secrets.items():
        secret(cluster, ns, name, **data)
    release = f"kt{uuid.uuid4().hex[:6]}"
    run_helm(helm, "lint", "--strict", str(CHART), "-n", ns, "-f", str(write_values(tmp_path / "lint.yaml", values)))
    docs = render(helm, tmp_path, release, ns, values)
    try:
        apply(cluster, docs)
        live = json.loads(cluster.kubectl("get", "-f", "-", "-o", "json", input=yaml.safe_dump_all(docs)).stdout)
        assert len(live["items"]) == len(docs)
        check_common(docs, ns)
        CHECKS[vs.id](docs, ns, team)
    finally:
        delete(cluster, docs)
        for n in (ns, team):
            if n:
                cluster.kubectl("delete", "namespace", n, "--wait=false", check=False)


def check_common(docs: list[dict[str, Any]], ns: str) -> None:
    """What holds for every value set: no Secret rendered, a hardened operator, only real settings."""
    assert "Secret" not in kinds(docs), "the chart must never carry secret values"
    dep = find(docs, "Deployment", next(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
                                        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"))
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    c = operator_container(docs)
    assert c["args"] == ["run"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_of(c)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ports["health"] == int(env["KUBETRIAGE_HEALTH_PORT"]["value"])
    assert ports["metrics"] == int(env["KUBETRIAGE_METRICS_PORT"]["value"])
    assert ports["ingest"] == int(env["KUBETRIAGE_INGEST_PORT"]["value"])
    # every variable is a real setting (a typo would be ignored by the operator, silently)
    unknown = {n for n in env if n.removeprefix("KUBETRIAGE_").lower() not in Settings.model_fields}
    assert not unknown, f"not settings of kubetriage.config.Settings: {unknown}"
    for name in ("KUBETRIAGE_LLM_API_KEY", "KUBETRIAGE_INGEST_TOKEN"):
        assert name not in env or "valueFrom" in env[name], f"{name} must come from a Secret"
    assert all(d["metadata"].get("namespace") in (None, ns) or d["kind"] in ("Role", "RoleBinding", "KopfPeering")
               for d in docs)
    sa = find(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    pool = find(docs, "TriagePool", "default")
    assert pool["spec"]["priorityClassName"] == "kubetriage-p1"


def check_defaults(docs: list[dict[str, Any]], ns: str, team: str | None) -> None:
    dep = find(docs, "Deployment", next(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"))
    assert dep["spec"]["replicas"] == 2
    env = env_of(operator_container(docs))
    assert env["KUBETRIAGE_STANDALONE"]["value"] == "false"
    assert env["KUBETRIAGE_NAMESPACES"]["value"] == ""  # cluster-wide
    sts = find(docs, "StatefulSet")
    assert env["KUBETRIAGE_REDIS_URL"]["value"] == f"redis://{sts['metadata']['name']}.{ns}.svc:6379/0"
    assert env["KUBETRIAGE_DATABASE_URL"]["value"].startswith("sqlite:////var/lib/kubetriage/")
    assert {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "PodDisruptionBudget"} <= kinds(docs)
    assert "KopfPeering" not in kinds(docs) and "NetworkPolicy" not in kinds(docs)
    pcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PriorityClass"}
    assert {n: (p["value"], p["preemptionPolicy"]) for n, p in pcs.items()} == {
        "kubetriage-p1": (1000000, "Never"), "kubetriage-p2": (100000, "Never"), "kubetriage-p3": (10000, "Never")}
    assert not kinds(docs) & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    # Users' roles: folded into the built-in view/edit/admin by aggregation, bound by the chart to nobody.
    users = aggregated_user_roles(docs)
    assert set(users) == {"view", "edit", "admin"}
    bound = {d["roleRef"]["name"] for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    assert not bound & {r["metadata"]["name"] for r in users.values()}
    grants = {k: {(res, verb) for rule in r["rules"] for res in rule["resources"] for verb in rule["verbs"]}
              for k, r in users.items()}
    assert {verb for res, verb in grants["view"]} == {"get", "list", "watch"}
    assert not [g for g in grants["edit"] if g[0] != "triagejobs"], "rules, pools and policies are for admins only"
    assert {("triagerules", "create"), ("triagerules", "delete"), ("triagepools", "create"),
            ("triagepolicies", "create"), ("triagepolicies", "delete")} <= grants["admin"]
    assert ("triagepolicies", "list") in grants["view"]
    # no TriagePolicy Secret listed: nothing mounted, and an empty allow-list
    assert env["KUBETRIAGE_ACTIONS_SECRET_NAMESPACES"]["value"] == "{}"
    assert not [v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v]


def check_bundled_namespaced(docs: list[dict[str, Any]], ns: str, team: str | None) -> None:
    env = env_of(operator_container(docs))
    assert sorted(env["KUBETRIAGE_NAMESPACES"]["value"].split(",")) == sorted([team, ns])
    sts = find(docs, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "--appendonly" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "ClusterKopfPeering" not in kinds(docs)
    assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "KopfPeering") == sorted([ns, team])
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}
    assert roles == {ns, team}
    cluster_rules = operator_cluster_role(docs)["rules"]
    assert {r["resources"][0] for r in cluster_rules} == {"priorityclasses", "customresourcedefinitions", "namespaces"}
    policies = {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"workers", "operator", "redis"}
    workers = policies["workers"]["spec"]
    assert workers["policyTypes"] == ["Ingress", "Egress"]
    assert workers["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]  # scrapes only
    egress_ports = sorted(p["port"] for rule in workers["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 443, 6379]


def check_external(docs: list[dict[str, Any]], ns: str, team: str | None) -> None:
    assert "StatefulSet" not in kinds(docs)
    env = env_of(operator_container(docs))
    assert env["KUBETRIAGE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "kt-redis", "key": "url"}
    assert env["KUBETRIAGE_REDIS_URL_SECRET"]["value"] == "kt-redis/url"  # workers get a secretKeyRef too
    assert env["KUBETRIAGE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "kt-db", "key": "dsn"}
    assert env["KUBETRIAGE_INGEST_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "kt-ingest", "key": "token"}
    assert "KUBETRIAGE_LLM_API_KEY" not in env  # the operator never calls the LLM; the workers do
    analyzer = find(docs, "TriagePool", "default")["spec"]["analyzer"]
    assert analyzer["apiKeySecretRef"] == {"name": "kt-llm", "key": "api-key"}
    assert analyzer["model"] == "openai/gpt-4o-mini" and analyzer["chain"] == "auto"
    workers = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-workers"))
    assert workers["spec"]["ingress"] == []  # no inbound at all
    redis_rule = next(r for r in workers["spec"]["egress"] if r["ports"] == [{"protocol": "TCP", "port": 6379}])
    assert "to" not in redis_rule  # external Redis: any address, port 6379 only


def check_prometheus(docs: list[dict[str, Any]], ns: str, team: str | None) -> None:
    smon = find(docs, "ServiceMonitor")
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics"))
    assert smon["metadata"]["labels"]["release"] == "prom"
    assert smon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert smon["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    pmon = find(docs, "PodMonitor")
    assert pmon["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    rules = find(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"KubetriageVerdictBacklog", "KubetriageQueueStalled",
                                           "KubetriageQueueWaitHigh", "KubetriageJobsFailing",
                                           "KubetriageDatabaseWriteFailures", "KubetriageLLMErrors",
                                           "KubetriageEvidenceUnavailable", "KubetriageActionsFailing"}
    cm = find(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["kubetriage.json"])
    assert dashboard["uid"] == "kubetriage" and len(dashboard["panels"]) >= 10


def check_evidence(docs: list[dict[str, Any]], ns: str, team: str | None) -> None:
    """A pool's evidence endpoints pass the CRD (applied above), and the workers' egress opens exactly them."""
    evidence = find(docs, "TriagePool", "default")["spec"]["evidence"]
    assert evidence["prometheus"]["bearerTokenSecretRef"] == {"name": "prom", "key": "token"}
    workers = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-workers"))
    ports = sorted(p["port"] for rule in workers["spec"]["egress"] for p in rule["ports"])
    assert ports == [53, 53, 443, 6379, 9090, 9093]
    monitoring = next(r for r in workers["spec"]["egress"] if {"port": 9090, "protocol": "TCP"} in r["ports"])
    assert monitoring["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


CHECKS = {"defaults": check_defaults, "bundled-redis-namespaced-netpol": check_bundled_namespaced,
          "external-redis-postgres-secrets": check_external, "evidence-egress": check_evidence,
          "prometheus-operator": check_prometheus}


@pytest.mark.cluster
def test_notes_show_a_first_alert_that_the_api_server_accepts(cluster: devenv.ControlPlane, helm: str) -> None:
    """NOTES.txt: the TriageJob it tells users to apply is valid against the real CRD, and the curl example
    takes its bearer token from the ingest Secret."""
    ns = new_namespace(cluster, "notes")
    try:
        out = run_helm(helm, "install", "kt", str(CHART), "-n", ns, "--dry-run=client",
                       f"--kubeconfig={cluster.kubeconfig}", "--set", "ingest.existingSecret=kt-ingest",
                       # the session's cluster has the classes from examples/, not owned by a Helm release
                       "--set", "priorityClasses.create=false").stdout
        notes = out.split("NOTES:", 1)[1]
        manifest = re.search(r"cat <<'EOF' \| kubectl -n (\S+) apply -f -\n(.*?)\n\s*EOF\n", notes, flags=re.S)
        assert manifest and manifest.group(1) == ns, notes
        job = yaml.safe_load(textwrap.dedent(manifest.group(2)))
        assert job["kind"] == "TriageJob"
        cluster.kubectl("apply", "--server-side", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(job))
        assert "get secret kt-ingest -o jsonpath='{.data.token}'" in notes
        assert 'curl -sS -H "Authorization: Bearer $TOKEN"' in notes and "/v1/alertmanager" in notes
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# --------------------------------------------------------------------------- rules and dashboard vs. README metrics


def readme_metrics() -> set[str]:
    """Metric names of the README's metrics table: the documented contract the alerts and panels rely on."""
    text = (REPO / "README.md").read_text()
    return set(re.findall(r"^\| `(kubetriage_[a-z0-9_]+)` \|", text, flags=re.M))


def metric_names(text: str) -> set[str]:
    names = set(re.findall(r"\b(kubetriage_[a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_alerts_and_dashboard_use_documented_metrics(helm: str) -> None:
    documented = readme_metrics()
    assert "kubetriage_queue_depth" in documented, "README metrics table not found"
    out = run_helm(helm, "template", "t", str(CHART), "--set", "metrics.prometheusRule.enabled=true").stdout
    rules = find([d for d in yaml.safe_load_all(out) if d], "PrometheusRule")
    dashboard = (CHART / "dashboards" / "kubetriage.json").read_text()
    json.loads(dashboard)
    for what, text in (("PrometheusRule", json.dumps(rules)), ("dashboard", dashboard)):
        used = metric_names(text)
        assert used <= documented, f"{what} uses metrics the README does not document: {used - documented}"
    assert {"kubetriage_queue_depth", "kubetriage_jobs_failed_total", "kubetriage_database_write_failures_total",
            "kubetriage_lease_expiries_total", "kubetriage_worker_jobs_total"} <= metric_names(json.dumps(rules))


def test_promtool_accepts_the_rules_and_they_fire(helm: str, tmp_path: Path) -> None:
    """Prometheus's own rule checker and unit-test runner: the PromQL parses, and the alerts fire on the
    series they are about (and stay quiet on healthy ones)."""
    promtool = subprocess.run(["which", "promtool"], capture_output=True, text=True).stdout.strip()
    if not promtool:
        pytest.fail("promtool not installed: install the Debian package 'prometheus' (make test does)")
    out = run_helm(helm, "template", "t", str(CHART), "--set", "metrics.prometheusRule.enabled=true").stdout
    rule = find([d for d in yaml.safe_load_all(out) if d], "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The unit test compares labels; annotations (checked above) are left out of its copy of the rules.
    bare = {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                       for g in rule["spec"]["groups"]]}
    bare_file = tmp_path / "rules-bare.yaml"
    bare_file.write_text(yaml.safe_dump(bare))
    tests = {
        "rule_files": [str(bare_file)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # pool a: a growing backlog and no worker progress at all
                {"series": 'kubetriage_queue_depth{pool="ns/a",priority="1000000"}', "values": "150x40"},
                {"series": 'kubetriage_worker_jobs_total{pool="ns/b",outcome="verdict"}', "values": "0+10x40"},
                {"series": 'kubetriage_worker_jobs_total{pool="ns/b",outcome="error"}', "values": "0+5x40"},
                {"series": 'kubetriage_queue_depth{pool="ns/b",priority="1000000"}', "values": "2x40"},
                {"series": "kubetriage_database_write_failures_total", "values": "0+1x40"},
                {"series": 'kubetriage_jobs_failed_total{reason="attempts"}', "values": "0 0 0 0 0 1x35"},
                # pool a: Prometheus evidence fails for 3 of 4 jobs; Alertmanager evidence is fine
                {"series": 'kubetriage_evidence_total{pool="ns/a",source="prometheus",outcome="ok"}',
                 "values": "0+1x40"},
                {"series": 'kubetriage_evidence_total{pool="ns/a",source="prometheus",outcome="unreachable"}',
                 "values": "0+3x40"},
                {"series": 'kubetriage_evidence_total{pool="ns/a",source="alertmanager",outcome="ok"}',
                 "values": "0+4x40"},
                {"series": 'kubetriage_evidence_total{pool="ns/a",source="alertmanager",outcome="cached"}',
                 "values": "0+9x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "KubetriageVerdictBacklog", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "pool": "ns/a"}}]},
                {"eval_time": "30m", "alertname": "KubetriageQueueStalled", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "pool": "ns/a"}}]},  # b makes progress: quiet
                {"eval_time": "30m", "alertname": "KubetriageLLMErrors", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "pool": "ns/b"}}]},  # 5 of 15 fail: above 20%
                {"eval_time": "30m", "alertname": "KubetriageDatabaseWriteFailures", "exp_alerts": [
                    {"exp_labels": {"severity": "warning"}}]},
                {"eval_time": "12m", "alertname": "KubetriageJobsFailing", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "reason": "attempts"}}]},
                {"eval_time": "38m", "alertname": "KubetriageJobsFailing", "exp_alerts": []},  # no new failures
                {"eval_time": "35m", "alertname": "KubetriageEvidenceUnavailable", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "pool": "ns/a", "source": "prometheus"}}]},
                {"eval_time": "10m", "alertname": "KubetriageEvidenceUnavailable", "exp_alerts": []},  # not for 15m
            ],
        }],
    }
    tests_file = tmp_path / "tests.yaml"
    tests_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(tests_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- least privilege, proven


@dataclass
class Install:
    """The chart's ServiceAccount and RBAC in fresh namespaces, and a kubeconfig holding that SA's token."""

    mode: str
    release: str
    rel: str  # the release namespace (pools, worker Deployments, ingest)
    team: str  # where users create TriageJobs
    other: str  # a namespace the operator has no business in
    docs: list[dict[str, Any]]
    sa: str
    kubeconfig: Path
    root: Path
    ports: dict[str, int]
    token: str

    def as_sa(self, cluster: devenv.ControlPlane, *args: str, input: str | None = None,
              ) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl(*args, input=input, check=False, kubeconfig=self.kubeconfig)

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.rel}:{self.sa}"

    def role_name(self) -> str:
        """The chart's Role in the release namespace (worker Deployments, ingest; all of it when namespaced)."""
        return next(d["metadata"]["name"] for d in self.docs if d["kind"] == "Role"
                    and d["metadata"]["namespace"] == self.rel)


@pytest.fixture(scope="module", params=["namespaced", "clusterwide"])
def install(request: pytest.FixtureRequest, cluster: devenv.ControlPlane, redis_server: devenv.Redis, helm: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    mode = request.param
    root = tmp_path_factory.mktemp(f"rbac-{mode}")
    rel, team, other = (new_namespace(cluster, p) for p in ("rel", "team", "other"))
    token = "ingest-" + uuid.uuid4().hex
    secret(cluster, rel, "kt-redis", url=redis_server.url)
    secret(cluster, rel, "kt-db", url=f"sqlite:///{root / 'verdicts.db'}")
    secret(cluster, rel, "kt-ingest", token=token)
    secret(cluster, rel, "kt-hooks", signing=HOOK_KEY)
    secret(cluster, other, "do-not-read", password="hunter2")
    ports = {"ingest": devenv.free_port(), "metrics": devenv.free_port(), "health": devenv.free_port()}
    values: dict[str, Any] = {
        "redis": {"bundled": {"enabled": False}, "existingSecret": "kt-redis"},
        "database": {"existingSecret": "kt-db"},
        "ingest": {"existingSecret": "kt-ingest"},
        "ports": ports,
        "config": {"redisPrefix": f"c{uuid.uuid4().hex[:8]}", "leaseSeconds": 5, "scaleDownDelaySeconds": 2},
        "peering": {"lifetimeSeconds": 10},
        "priorityClasses": {"create": False},  # the session's cluster has them already
        "pools": [{"name": "default", "spec": {"priorityClassName": "kubetriage-p1",
                                                "replicas": {"min": 1, "max": 2}, "concurrency": 4}}],
        "actions": {"secrets": [{"name": "kt-hooks", "namespaces": [team]}]},
    }
    if mode == "namespaced":
        values["watchNamespaces"] = [team]
    release = f"kt{uuid.uuid4().hex[:6]}"
    docs = render(helm, root, release, rel, values)
    sa = find(docs, "ServiceAccount")["metadata"]["name"]
    apply(cluster, docs)
    token_sa = cluster.kubectl("create", "token", sa, "-n", rel, "--duration=2h").stdout.strip()
    kubeconfig = cluster.kubeconfig_for_token(token_sa, root / "sa.kubeconfig")
    try:
        yield Install(mode, release, rel, team, other, docs, sa, kubeconfig, root, ports, token)
    finally:
        delete(cluster, docs)
        for ns in (rel, team, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def resolved_env(cluster: devenv.ControlPlane, namespace: str, container: dict[str, Any]) -> dict[str, str]:
    """The operator container's environment as the kubelet would give it (values and secretKeyRefs)."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        obj = json.loads(cluster.kubectl("get", "secret", ref["name"], "-n", namespace, "-o", "json").stdout)
        env[item["name"]] = base64.b64decode(obj["data"][ref["key"]]).decode()
    return env


HOOK_KEY = "chart-test-signing-key"


def mounted_secrets(cluster: devenv.ControlPlane, namespace: str, docs: list[dict[str, Any]], env: dict[str, str],
                    root: Path) -> None:
    """The kubelet's part for the Secret volumes of the operator: each Secret's keys as files where the pod's
    volumeMounts put them (under a local folder that stands for the container's file system)."""
    pod = find(docs, "Deployment", operator_deployment_name(docs))["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m["mountPath"] for m in operator_container(docs)["volumeMounts"]}
    base = env["KUBETRIAGE_ACTIONS_SECRETS_DIR"]
    for volume, secret_name in volumes.items():
        obj = json.loads(cluster.kubectl("get", "secret", secret_name, "-n", namespace, "-o", "json").stdout)
        folder = root / "container" / Path(mounts[volume]).relative_to("/")
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in obj["data"].items():
            (folder / key).write_bytes(base64.b64decode(value))
    env["KUBETRIAGE_ACTIONS_SECRETS_DIR"] = str(root / "container" / Path(base).relative_to("/"))


def operator_deployment_name(docs: list[dict[str, Any]]) -> str:
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
                and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")


def sa_writes(cluster: devenv.ControlPlane, user: str) -> list[dict[str, Any]]:
    """The ServiceAccount's writes in the API server's audit log (writes are logged; reads are not)."""
    path = cluster.root / "logs" / "audit.log"
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if e.get("user", {}).get("username") == user:
                events.append(e)
    return events


async def wait_for(check: Any, what: str, proc: devenv.Proc, timeout: float = 120) -> Any:
    """``eventually``, giving up when the operator exits, with its log in the failure message."""
    return await eventually(check, what, timeout=timeout, interval=0.3,
                            give_up=lambda: None if proc.alive() else f"the operator exited:\n{proc.tail(60)}",
                            context=lambda: f"operator log:\n{proc.tail(60)}")


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def http_post(url: str, body: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def alertmanager_webhook(status: str, fingerprint: str) -> dict[str, Any]:
    alert = {"status": status, "labels": {"alertname": "ChartSmoke", "severity": "critical"},
             "annotations": {"summary": "sent by test_chart"}, "startsAt": "2026-01-05T10:00:00Z",
             "endsAt": "2026-01-05T10:05:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
             "fingerprint": fingerprint}
    return {"version": "4", "status": status, "receiver": "kubetriage", "alerts": [alert],
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "groupKey": "{}", "truncatedAlerts": 0}


@pytest.mark.cluster
async def test_operator_runs_a_pipeline_with_only_the_charts_rbac(
        cluster: devenv.ControlPlane, install: Install) -> None:
    """The real operator, its environment taken from the chart's Deployment, authenticated as the chart's
    ServiceAccount: jobs from kubectl and from the ingest endpoint get verdicts, Events and database rows,
    the pool's worker Deployment is created, and the pool can be deleted (kopf removes its finalizer)."""
    i = install
    env = resolved_env(cluster, i.rel, operator_container(i.docs))
    env["KUBECONFIG"] = str(i.kubeconfig)
    mounted_secrets(cluster, i.rel, i.docs, env, i.root)
    receiver = Receiver(HOOK_KEY).__enter__()
    op = localrun.start_operator(i.root, env, f"operator-{i.mode}")
    # the kubelet's stand-in reads Deployments and Secrets with admin rights, as the kubelet would
    admin = Kube()
    pods = LocalPods(admin, namespace=i.rel, log_dir=i.root / "pods",
                     extra_env={"KUBETRIAGE_METRICS_PORT": "0"}, interval=0.3)
    stop = asyncio.Event()
    pods_task = asyncio.create_task(pods.run(stop))
    try:
        # A TriageRule first, as the README orders it: the operator lists and watches it and writes its
        # Accepted condition with the chart's rights; the guarded job then never ends false_positive.
        await admin.create(triagerule_path(i.team), {
            "apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageRule", "metadata": {"name": "disk-guard"},
            "spec": {"match": {"alertNames": ["DiskFull"]}, "action": {"neverDiscard": True}}})

        async def rule_accepted() -> bool:
            st = (await admin.get(triagerule_path(i.team, "disk-guard"))).get("status") or {}
            return st.get("observedGeneration") == 1 and [c["status"] for c in st.get("conditions") or []] == ["True"]

        await wait_for(rule_accepted, "TriageRule disk-guard Accepted", op)
        # A TriagePolicy posting every verdict to a webhook, signed with the mounted Secret kt-hooks; the
        # operator reads no Secret from the API (the FORBIDDEN list below)
        await admin.create(f"/apis/kubetriage.io/v1alpha1/namespaces/{i.team}/triagepolicies", {
            "apiVersion": "kubetriage.io/v1alpha1", "kind": "TriagePolicy", "metadata": {"name": "tell"},
            "spec": {"mode": "enforce", "classifications": ["false_positive", "valid", "inconclusive"],
                     "minConfidence": 0, "notify": [{"name": "hook", "webhook": {
                         "url": receiver.url("/hook"), "allowHTTP": True, "allowPrivateEndpoints": True,
                         "signingSecretRef": {"name": "kt-hooks", "key": "signing"}}}]}})

        async def policy_accepted() -> bool:
            st = (await admin.get(f"/apis/kubetriage.io/v1alpha1/namespaces/{i.team}/triagepolicies/tell")
                  ).get("status") or {}
            return [c["status"] for c in st.get("conditions") or []] == ["True"]

        await wait_for(policy_accepted, "TriagePolicy tell Accepted", op)
        for n, spec in enumerate([alert_spec("DiskFull", labels={"flaps_last_hour": "9"}),
                                  alert_spec("EndpointDown", severity="critical", consecutiveCount=20),
                                  script_spec("checkout-e2e"), script_spec("login-e2e", "TimeoutError")]):
            await admin.create(triagejob_path(i.team), {
                "apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageJob",
                "metadata": {"name": f"job-{n}"}, "spec": spec})

        async def liveness() -> bool:
            with contextlib.suppress(OSError):
                return http_get(f"http://127.0.0.1:{i.ports['health']}/healthz")[0] == 200
            return False

        await wait_for(liveness, "/healthz on the chart's health port", op)
        status, text = http_get(f"http://127.0.0.1:{i.ports['metrics']}/metrics")
        assert status == 200 and "kubetriage_build_info" in text

        code, body = http_post(f"http://127.0.0.1:{i.ports['ingest']}/v1/alertmanager",
                               alertmanager_webhook("firing", "00aa11bb22cc33dd"), i.token)
        assert code == 201, body
        ingested = body["jobs"][0]["name"]

        async def done(ns: str, names: list[str]) -> dict[str, Any] | None:
            items = {j["metadata"]["name"]: j for j in (await admin.get(triagejob_path(ns)))["items"]}
            phases = {n: (items.get(n, {}).get("status") or {}).get("phase") for n in names}
            return items if all(p == "Succeeded" for p in phases.values()) else None

        team_names = [f"job-{n}" for n in range(4)]
        jobs = await wait_for(lambda: done(i.team, team_names), f"{team_names} Succeeded", op)
        await wait_for(lambda: done(i.rel, [ingested]), f"ingested {ingested} Succeeded", op)
        assert all(j["status"]["recorded"] is True for j in jobs.values())
        assert jobs["job-0"]["status"]["verdict"]["classification"] != "false_positive"
        await wait_for(lambda: len({d.key for d in receiver.to("/hook")}) >= 4, "a signed webhook per verdict", op)
        assert all(d.signed for d in receiver.to("/hook"))

        # TTL: a finished job is deleted with the chart's rights (its only delete)
        await admin.create(triagejob_path(i.team), {
            "apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageJob", "metadata": {"name": "short-lived"},
            "spec": script_spec("short", "AssertionError", spec={"ttlSecondsAfterFinished": 0})})

        async def ttl_gone() -> bool:
            try:
                await admin.get(triagejob_path(i.team, "short-lived"))
            except ApiError as exc:
                return exc.status == 404
            return False

        await wait_for(ttl_gone, "the TTL to delete short-lived", op)

        code, body = http_post(f"http://127.0.0.1:{i.ports['ingest']}/v1/alertmanager",
                               alertmanager_webhook("resolved", "00aa11bb22cc33dd"), i.token)
        assert code == 200 and body["jobs"][0]["result"] == "resolved", body

        events = (await admin.get(f"/api/v1/namespaces/{i.team}/events"))["items"]
        assert {e["involvedObject"]["name"] for e in events if e["reason"] == "Triaged"} == {*team_names,
                                                                                             "short-lived"}
        db = sqlite3.connect(str(i.root / "verdicts.db"))
        try:
            rows = {r[0] for r in db.execute("SELECT job_name FROM triage_verdicts")}
        finally:
            db.close()
        assert set(team_names) | {ingested} <= rows

        deploys = (await admin.get(f"/apis/apps/v1/namespaces/{i.rel}/deployments",
                                   labelSelector="app.kubernetes.io/component=worker"))["items"]
        assert [d["metadata"]["name"] for d in deploys] == ["kubetriage-worker-default"]
        worker_pod = deploys[0]["spec"]["template"]["spec"]
        assert worker_pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in worker_pod or worker_pod["serviceAccountName"] == "default"

        # Deleting the pool: kopf's daemon stops and its finalizer is removed with the SA's rights.
        await admin.delete(triagepool_path(i.rel, "default"))

        async def pool_gone() -> bool:
            try:
                await admin.get(triagepool_path(i.rel, "default"))
            except ApiError as exc:
                return exc.status == 404
            return False

        await wait_for(pool_gone, "the TriagePool to be deleted (finalizer removed)", op)
    finally:
        stop.set()
        await pods_task
        op.stop()
        await admin.close()
        receiver.__exit__()

    # No write of the operator in its own namespaces was refused. (Cluster-wide, it also sees other tests'
    # leftover pools and is refused Deployments there: that is the point of pool-namespace-only Deployments.)
    mine = {i.rel, i.team}

    def refused() -> list[tuple[str, str, str]]:
        return [(e["verb"], e["objectRef"].get("resource", ""), e["objectRef"].get("subresource", ""))
                for e in sa_writes(cluster, i.user)
                if e["responseStatus"].get("code") == 403 and e["objectRef"].get("namespace") in mine]

    allowed_refusals = {("create", "kopfpeerings", ""), ("create", "clusterkopfpeerings", "")}  # the chart made it
    assert set(refused()) <= allowed_refusals, refused()
    # Reads are not audited: kopf and the operator log refused ones. None may concern our namespaces or
    # cluster-scoped resources (kopf retries a refused list for a minute before it degrades).
    forbidden = [ln for ln in op.log_path.read_text().splitlines() if "Forbidden" in ln
                 and (i.rel in ln or i.team in ln or "cluster scope" in ln)]
    assert not forbidden, "\n".join(forbidden[:5])


FORBIDDEN = [
    ("read a Secret in another namespace", lambda i: ["get", "secret", "do-not-read", "-n", i.other]),
    ("read its own database Secret", lambda i: ["get", "secret", "kt-db", "-n", i.rel]),
    ("list Secrets in its namespace", lambda i: ["get", "secrets", "-n", i.rel]),
    ("list Secrets cluster-wide", lambda i: ["get", "secrets", "-A"]),
    ("list pods", lambda i: ["get", "pods", "-n", i.rel]),
    ("delete a pod", lambda i: ["delete", "pod", "anything", "-n", i.rel, "--wait=false"]),
    ("create a pod", lambda i: ["run", "pwn", "--image=busybox", "-n", i.rel, "--restart=Never"]),
    ("exec into a pod", lambda i: ["create", "--raw", f"/api/v1/namespaces/{i.rel}/pods/anything/exec"
                                   "?command=sh&stdin=true", "-f", "-"]),
    ("create a ClusterRoleBinding", lambda i: ["create", "clusterrolebinding", f"pwn-{i.release}",
                                               "--clusterrole=cluster-admin",
                                               f"--serviceaccount={i.rel}:{i.sa}"]),
    ("edit its own ClusterRole", lambda i: ["patch", "clusterrole", operator_cluster_role(i.docs)["metadata"]["name"],
                                            "--type=json", "-p",
                                            '[{"op":"add","path":"/rules/-","value":{"apiGroups":["*"],'
                                            '"resources":["*"],"verbs":["*"]}}]']),
    ("edit its own Role", lambda i: ["patch", "role", i.role_name(), "-n", i.rel, "--type=json", "-p",
                                     '[{"op":"add","path":"/rules/-","value":{"apiGroups":[""],'
                                     '"resources":["secrets"],"verbs":["get"]}}]']),
    ("create a Role", lambda i: ["create", "role", "pwn", "--verb=get", "--resource=secrets", "-n", i.rel]),
    ("impersonate an admin", lambda i: ["get", "secrets", "-A", "--as=admin", "--as-group=system:masters"]),
    ("mint a token for another ServiceAccount", lambda i: ["create", "token", "default", "-n", i.rel]),
    ("create a Deployment outside the pool namespaces", lambda i: ["create", "deployment", "pwn",
                                                                   "--image=busybox", "-n", i.other]),
    # TriageJobs are the only thing it deletes (their TTL); policies are the team admins', like rules
    ("create a TriagePolicy", lambda i: ["create", "-n", i.team, "-f", "-"]),
    ("change a TriagePolicy", lambda i: ["patch", "triagepolicy", "tell", "-n", i.team, "--type=merge", "-p",
                                         '{"spec":{"mode":"shadow"}}']),
    ("delete a TriagePolicy", lambda i: ["delete", "triagepolicy", "tell", "-n", i.team, "--wait=false"]),
    ("delete a TriagePool", lambda i: ["delete", "triagepool", "default", "-n", i.rel, "--wait=false"]),
    ("read the Secret of TriagePolicies", lambda i: ["get", "secret", "kt-hooks", "-n", i.rel]),
    # TriageRules are the team admins': the operator only reads them and writes their status
    ("create a TriageRule", lambda i: ["create", "-n", i.team, "-f", "-"]),
    ("change a TriageRule", lambda i: ["patch", "triagerule", "disk-guard", "-n", i.team, "--type=merge", "-p",
                                       '{"spec":{"action":{"neverDiscard":false}}}']),
    ("delete a TriageRule", lambda i: ["delete", "triagerule", "disk-guard", "-n", i.team, "--wait=false"]),
    ("create a TriageJob outside the ingest namespaces", lambda i: ["create", "-n", i.other, "-f", "-"]),
    ("delete a worker Deployment", lambda i: ["delete", "deployment", "kubetriage-worker-default", "-n", i.rel,
                                              "--wait=false"]),
    ("change a PriorityClass", lambda i: ["patch", "priorityclass", "kubetriage-p3", "--type=merge", "-p",
                                          '{"description":"pwned"}']),
    ("delete a CRD", lambda i: ["delete", "crd", "triagejobs.kubetriage.io", "--wait=false"]),
    ("list nodes", lambda i: ["get", "nodes"]),
    ("read ConfigMaps in kube-system", lambda i: ["get", "configmaps", "-n", "kube-system"]),
    ("create a namespace", lambda i: ["create", "namespace", f"pwn-{i.release}"]),
    ("create a peering object", lambda i: ["create", "-f", "-"]),
]


def _stdin(i: Install, what: str) -> str | None:
    if what == "exec into a pod":
        return "{}"
    if what == "create a TriageJob outside the ingest namespaces":
        return json.dumps({"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageJob",
                           "metadata": {"name": "pwn"}, "spec": script_spec("x")})
    if what == "create a TriagePolicy":
        return json.dumps({"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriagePolicy",
                           "metadata": {"name": "pwn"}, "spec": {"mode": "enforce"}})
    if what == "create a TriageRule":
        return json.dumps({"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageRule",
                           "metadata": {"name": "pwn"}, "spec": {"action": {"classification": "false_positive",
                                                                            "confidence": 1}}})
    if what == "create a peering object":
        return json.dumps({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                           "metadata": {"name": f"pwn-{i.release}"}})
    return None


@pytest.mark.cluster
@pytest.mark.parametrize(("what", "args"), FORBIDDEN, ids=[w for w, _ in FORBIDDEN])
def test_service_account_is_refused(cluster: devenv.ControlPlane, install: Install, what: str, args: Any) -> None:
    result = install.as_sa(cluster, *args(install), input=_stdin(install, what))
    assert result.returncode != 0, f"{what}: allowed!\n{result.stdout}"
    # the API server's RBAC denial (a 403 Status), not a client-side error
    assert f'is forbidden: User "{install.user}" cannot' in result.stderr, f"{what}: not a 403:\n{result.stderr}"


def can_i_list(cluster: devenv.ControlPlane, install: Install, namespace: str) -> set[tuple[str, str, str]]:
    """``kubectl auth can-i --list`` as (resource, resourceName, verb) triples; non-resource URLs left out."""
    out = install.as_sa(cluster, "auth", "can-i", "--list", "-n", namespace)
    assert out.returncode == 0, out.stderr
    rows = set()
    for line in out.stdout.splitlines()[1:]:
        m = re.match(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$", line)
        assert m, f"unparsed can-i line: {line!r}"
        resource, _urls, names, verbs = m.groups()
        if not resource:
            continue  # /api, /version, ...: discovery, granted to every authenticated user
        for verb in verbs.split():
            for name in names.split() or [""]:
                rows.add((resource, name, verb))
    return rows


def intended(install: Install, namespace: str) -> set[tuple[str, str, str]]:
    """The chart's rules that apply in ``namespace``: its ClusterRole plus its Role there, if any."""
    rules = list(operator_cluster_role(install.docs)["rules"])
    rules += [r for d in install.docs if d["kind"] == "Role" and d["metadata"]["namespace"] == namespace
              for r in d["rules"]]
    out = set()
    for r in rules:
        for group in r["apiGroups"]:
            for res in r["resources"]:
                base, _, sub = res.partition("/")
                name = f"{base}.{group}" if group else base
                name += f"/{sub}" if sub else ""
                for verb in r["verbs"]:
                    for rn in r.get("resourceNames") or [""]:
                        out.add((name, rn, verb))
    return out


@pytest.mark.cluster
def test_can_i_list_holds_nothing_beyond_the_chart(cluster: devenv.ControlPlane, install: Install) -> None:
    for ns in (install.rel, install.team, install.other):
        actual = can_i_list(cluster, install, ns)
        builtin = {row for row in actual if row[0] in BUILTIN_RESOURCES}
        assert actual - builtin == intended(install, ns), ns
    # and the intent itself: no secrets, pods, RBAC or delete anywhere; namespace names only when namespaced
    everything = set().union(*(intended(install, ns) for ns in (install.rel, install.team)))
    assert not [r for r in everything if r[0].split(".")[0].split("/")[0] in
                {"secrets", "pods", "roles", "rolebindings", "clusterroles", "clusterrolebindings",
                 "serviceaccounts", "nodes", "configmaps"}]
    # update only on the pools' finalizers subresource (owner-reference enforcement; no object behind it), and
    # delete only of TriageJobs (their TTL)
    risky = {"delete", "deletecollection", "escalate", "bind", "impersonate", "update", "*"}
    assert not [r for r in everything if r[2] in risky and r[0] != "triagepools.kubetriage.io/finalizers"
                and r != ("triagejobs.kubetriage.io", "", "delete")]
    assert ("triagejobs.kubetriage.io", "", "delete") in everything
    namespaces = {r[2] for r in everything if r[0] == "namespaces"}
    assert namespaces == ({"list", "watch"} if install.mode == "namespaced" else set())


# --------------------------------------------------------------------------- users: who may write rules


def aggregation_closure(roles: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The ClusterRoles the aggregation controller folds into ``name``: those its ``aggregationRule`` selects
    by label, and theirs in turn (the built-in view is labelled into edit, edit into admin)."""
    found: set[str] = set()
    todo = [name]
    while todo:
        for selector in (roles[todo.pop()].get("aggregationRule") or {}).get("clusterRoleSelectors") or []:
            assert not selector.get("matchExpressions"), "the built-in roles select by matchLabels only"
            want = (selector.get("matchLabels") or {}).items()
            for other, role in roles.items():
                if other not in found and other != name and want <= (role["metadata"].get("labels") or {}).items():
                    found.add(other)
                    todo.append(other)
    return sorted(found)


@pytest.mark.cluster
async def test_namespace_editors_submit_jobs_and_only_admins_write_rules(
        cluster: devenv.ControlPlane, helm: str, tmp_path: Path) -> None:
    """Two real ServiceAccounts of one namespace, bound there (RoleBindings) to the built-in ``edit`` and
    ``admin`` ClusterRoles, act with their own tokens: the editor may create TriageJobs, not TriageRules or
    TriagePools, nor write a job's status; the admin may create and delete TriageRules.

    The chart's roles reach edit and admin through aggregation, which the aggregation controller of
    kube-controller-manager performs. This control plane runs kube-apiserver and etcd only, so aggregation
    is not active (checked: the built-in ``admin`` has an aggregationRule but no rules). The test then does
    the controller's selection itself and binds its result directly: it reads each built-in role's
    aggregationRule from the API server and follows it, transitively, to every ClusterRole it selects by
    label (the built-in system:aggregate-to-* roles and the chart's), and binds those beside the built-in
    role. So a wrong aggregation label on a chart role fails here as it would in a real cluster. With
    aggregation active, the built-in roles are bound alone, once they hold the chart's rules.
    """
    ns, elsewhere = new_namespace(cluster, "users"), new_namespace(cluster, "elsewhere")
    release = f"kt{uuid.uuid4().hex[:6]}"
    user_roles = list(aggregated_user_roles(render(helm, tmp_path, release, ns, {})).values())
    apply(cluster, user_roles)
    try:
        roles = {r["metadata"]["name"]: r
                 for r in json.loads(cluster.kubectl("get", "clusterroles", "-o", "json").stdout)["items"]}
        aggregating = bool(roles["admin"].get("rules"))
        if aggregating:
            chart_admin = next(r for r in user_roles if f"{AGGREGATE}admin" in r["metadata"]["labels"])

            def admin_has_rules() -> bool:
                live = json.loads(cluster.kubectl("get", "clusterrole", "admin", "-o", "json").stdout)
                return all(rule in live.get("rules", []) for rule in chart_admin["rules"])

            await eventually(admin_has_rules, "the aggregation controller to fold the chart's roles into admin")
        kubeconfigs = {}
        for user, builtin in (("editor", "edit"), ("owner", "admin")):
            cluster.kubectl("create", "serviceaccount", user, "-n", ns)
            bound = [builtin] + ([] if aggregating else aggregation_closure(roles, builtin))
            for n, role in enumerate(bound):
                cluster.kubectl("create", "rolebinding", f"{user}-{n}", f"--clusterrole={role}",
                                f"--serviceaccount={ns}:{user}", "-n", ns)
            token = cluster.kubectl("create", "token", user, "-n", ns, "--duration=1h").stdout.strip()
            kubeconfigs[user] = cluster.kubeconfig_for_token(token, tmp_path / f"{user}.kubeconfig")
        if not aggregating:
            assert {r["metadata"]["name"] for r in user_roles} <= set(aggregation_closure(roles, "admin"))

        def as_user(user: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
            return cluster.kubectl(*args, input=input, check=False, kubeconfig=kubeconfigs[user])

        def allowed(result: subprocess.CompletedProcess[str]) -> None:
            assert result.returncode == 0, result.stderr

        def refused(result: subprocess.CompletedProcess[str], user: str, what: str) -> None:
            assert result.returncode != 0, f"{user} was allowed to {what}:\n{result.stdout}"
            assert f'is forbidden: User "system:serviceaccount:{ns}:{user}" cannot' in result.stderr, result.stderr

        job = json.dumps({"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageJob",
                          "metadata": {"name": "from-ci"}, "spec": script_spec("checkout-e2e")})
        rule = json.dumps({"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriageRule",
                           "metadata": {"name": "ignore-e2e-timeouts"},
                           "spec": {"match": {"errorRegex": "TimeoutError"},
                                    "action": {"classification": "false_positive", "confidence": 0.95}}})
        pool = json.dumps({"apiVersion": "kubetriage.io/v1alpha1", "kind": "TriagePool",
                           "metadata": {"name": "mine"}, "spec": {"priorityClassName": "kubetriage-p3"}})

        allowed(as_user("editor", "create", "-n", ns, "-f", "-", input=job))
        allowed(as_user("editor", "get", "triagerules,triagepools,triagejobs", "-n", ns))  # view
        refused(as_user("editor", "create", "-n", ns, "-f", "-", input=rule), "editor", "create a TriageRule")
        refused(as_user("editor", "create", "-n", ns, "-f", "-", input=pool), "editor", "create a TriagePool")
        refused(as_user("editor", "patch", "triagejob", "from-ci", "-n", ns, "--subresource=status",
                        "--type=merge", "-p", '{"status":{"phase":"Succeeded"}}'), "editor", "write a job's status")
        refused(as_user("editor", "create", "-n", elsewhere, "-f", "-", input=job), "editor",
                "create a TriageJob in another namespace")

        allowed(as_user("owner", "create", "-n", ns, "-f", "-", input=rule))
        allowed(as_user("owner", "create", "-n", ns, "-f", "-", input=pool))
        allowed(as_user("owner", "delete", "triagerule", "ignore-e2e-timeouts", "-n", ns))
        allowed(as_user("owner", "delete", "triagepool", "mine", "-n", ns))
        allowed(as_user("editor", "delete", "triagejob", "from-ci", "-n", ns))
        refused(as_user("owner", "create", "-n", elsewhere, "-f", "-", input=rule), "owner",
                "create a TriageRule in another namespace")
    finally:
        delete(cluster, user_roles)
        for n in (ns, elsewhere):
            cluster.kubectl("delete", "namespace", n, "--wait=false", check=False)

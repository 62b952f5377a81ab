"""Human verdicts are attributable: the chart's ValidatingAdmissionPolicy on the real API server, with real
ServiceAccount tokens, the real operator recording the verdict, and ``kubetriage verdict set`` as a user runs it.

Two ServiceAccounts may both create and annotate TriageJobs; only ``judge`` is also allowed ``update`` on
``triagejobs/verdict``. The policy is rendered from the chart and bound to this test's namespace only (the
chart's namespaced mode), so no other test's namespace is affected.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devharness import devenv
from kubetriage.api.keys import VERDICT, VERDICT_BY, VERDICT_REASON
from kubetriage.api.models import API_VERSION
from kubetriage.infra.kube import triagejob_path
from kubetriage.ingest.jobs import create_job
from tests.pipeline import Pipeline, script_spec
from tests.test_chart import helm, render  # noqa: F401 - helm is the pinned-helm fixture
from tests.test_cli import cli
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

REFUSED_PERMISSION = "needs update on triagejobs/verdict"
REFUSED_NAME = "kubetriage.io/verdict-by must be your authenticated user name"


@dataclass
class Account:
    name: str
    user: str
    kubeconfig: Path
    token: str

    def kubectl(self, cluster: devenv.ControlPlane, *args: str, input: str | None = None,
                ) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl(*args, input=input, check=False, kubeconfig=self.kubeconfig)


def account(cluster: devenv.ControlPlane, ns: str, name: str, root: Path) -> Account:
    cluster.kubectl("create", "serviceaccount", name, "-n", ns)
    token = cluster.kubectl("create", "token", name, "-n", ns, "--duration=1h").stdout.strip()
    return Account(name, f"system:serviceaccount:{ns}:{name}",
                   cluster.kubeconfig_for_token(token, root / f"{name}.kubeconfig"), token)


def status_patch(cluster: devenv.ControlPlane, acct: Account, path: str, patch: dict[str, Any]) -> int:
    """One merge patch of /status, exactly as the operator sends it (no GET first, unlike kubectl patch)."""
    ctx = ssl.create_default_context(cafile=str(cluster.root / "pki" / "ca.crt"))
    req = urllib.request.Request(cluster.server + path, data=json.dumps(patch).encode(), method="PATCH", headers={
        "Authorization": f"Bearer {acct.token}", "Content-Type": "application/merge-patch+json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def policy(pipeline: Pipeline, helm: str, tmp_path: Path) -> Iterator[list[dict[str, Any]]]:  # noqa: F811
    p = pipeline
    docs = render(helm, tmp_path, "vp", p.ns, {"watchNamespaces": [p.ns]},
                  "--show-only", "templates/verdict-policy.yaml")
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    selector = docs[1]["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
    assert selector["values"] == [p.ns]  # bound to this namespace, nowhere else
    p.cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    try:
        yield docs
    finally:
        p.cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=yaml.safe_dump_all(docs), check=False)


def job_body(name: str, annotations: dict[str, str] | None = None) -> str:
    return json.dumps({"apiVersion": API_VERSION, "kind": "TriageJob",
                       "metadata": {"name": name, "annotations": annotations or {}},
                       "spec": script_spec("checkout", f"AssertionError: {name}")})


async def test_only_a_permitted_user_records_a_verdict_and_only_under_their_own_name(
    pipeline: Pipeline, policy: list[dict[str, Any]], tmp_path: Path
) -> None:
    p, cluster = pipeline, pipeline.cluster
    rules = [("tj-edit", "triagejobs", ["get", "list", "watch", "create", "update", "patch"]),
             ("tj-verdict", "triagejobs/verdict", ["update"]), ("tj-status", "triagejobs/status", ["patch"])]
    for role, resource, verbs in rules:  # applied as objects: kubectl create role would look the subresource up
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": role, "namespace": p.ns},
            "rules": [{"apiGroups": ["kubetriage.io"], "resources": [resource], "verbs": verbs}]}))
    judge, submitter, writer = (account(cluster, p.ns, n, tmp_path) for n in ("judge", "submitter", "writer"))
    for acct, roles in ((judge, ["tj-edit", "tj-verdict"]), (submitter, ["tj-edit"]), (writer, ["tj-status"])):
        for role in roles:
            cluster.kubectl("create", "rolebinding", f"{acct.name}-{role}", "-n", p.ns, f"--role={role}",
                            f"--serviceaccount={p.ns}:{acct.name}")
    await p.pool("default", concurrency=2)
    p.start_operator()

    # A job created with a forged human verdict is refused (the policy loads asynchronously: wait for it).
    forged = {VERDICT: "false_positive", VERDICT_BY: submitter.user, VERDICT_REASON: "nothing to see"}

    def refused_at_creation() -> str | None:
        out = submitter.kubectl(cluster, "create", "--dry-run=server", "-n", p.ns, "-f", "-",
                                input=job_body("forged", forged))
        return out.stderr if out.returncode != 0 else None

    stderr = await eventually(refused_at_creation, "the verdict policy to refuse a forged verdict", timeout=60)
    assert REFUSED_PERMISSION in stderr and submitter.user in stderr, stderr
    out = submitter.kubectl(cluster, "create", "-n", p.ns, "-f", "-", input=job_body("forged", forged))
    assert out.returncode != 0 and REFUSED_PERMISSION in out.stderr

    # Without the permission, annotating a verdict is refused; other annotations are not the policy's business.
    out = submitter.kubectl(cluster, "create", "-n", p.ns, "-f", "-", input=job_body("j1"))
    assert out.returncode == 0, out.stderr
    await p.wait_terminal(["j1"])
    out = submitter.kubectl(cluster, "annotate", "tj", "j1", "-n", p.ns, f"{VERDICT}=false_positive",
                            f"{VERDICT_BY}={submitter.user}")
    assert out.returncode != 0 and REFUSED_PERMISSION in out.stderr, out.stderr
    assert submitter.kubectl(cluster, "annotate", "tj", "j1", "-n", p.ns, "team=shop").returncode == 0

    # With the permission, but under another name: refused, naming the right one.
    out = judge.kubectl(cluster, "annotate", "tj", "j1", "-n", p.ns, f"{VERDICT}=valid", f"{VERDICT_BY}=alice")
    assert out.returncode != 0 and REFUSED_NAME in out.stderr and judge.user in out.stderr, out.stderr
    code, _, err = await cli("verdict", "set", "j1", "valid", "--reason", "x", "--by", "alice", "-n", p.ns,
                             env={"KUBECONFIG": str(judge.kubeconfig)})
    assert code == 1 and REFUSED_NAME in err, err

    # `kubetriage verdict set` as the judge: the name comes from the API server, and the verdict is recorded.
    code, out_text, err = await cli("verdict", "set", "j1", "valid", "--reason", "reproduced by hand", "-n", p.ns,
                                    env={"KUBECONFIG": str(judge.kubeconfig)})
    assert code == 0 and f"(by {judge.user})" in out_text, err
    job = await p.get("j1")
    assert job["metadata"]["annotations"][VERDICT_BY] == judge.user

    async def human() -> dict[str, Any] | None:
        st = (await p.get("j1"))["status"]
        return st if (st.get("verdict") or {}).get("checkType") == "user" else None

    st = await p.wait(human, "the judge's verdict recorded as a human verdict")
    assert st["verdict"]["classification"] == "valid" and f"(by {judge.user})" in st["verdict"]["reason"]
    rows = await p.wait(lambda: [r for r in p.audit_rows() if r["check_type"] == "user"] or None, "the audit row")
    assert rows[0]["job_name"] == "j1" and judge.user in rows[0]["reason"]

    # The operator's kind of write, status, is a subresource the policy does not match: a job carrying verdict
    # annotations is still patched by an account that may not give verdicts.
    code = status_patch(cluster, writer, triagejob_path(p.ns, "j1", status=True),
                        {"status": {"message": "written by an account with the operator's status rights"}})
    assert code == 200
    # Taking a verdict away is a change too.
    out = submitter.kubectl(cluster, "annotate", "tj", "j1", "-n", p.ns, f"{VERDICT}-", f"{VERDICT_BY}-")
    assert out.returncode != 0 and REFUSED_PERMISSION in out.stderr


async def test_ingest_strips_verdict_annotations_from_what_it_creates(pipeline: Pipeline) -> None:
    """Whatever built the body (a webhook mapping, a CLI option), no job created by ingest carries a human verdict:
    with the policy off, that is what keeps an ingest token from recording one."""
    p = pipeline
    body = {"apiVersion": API_VERSION, "kind": "TriageJob",
            "metadata": {"name": "ingested", "labels": {}, "annotations": {
                VERDICT: "false_positive", VERDICT_BY: "alice", VERDICT_REASON: "forged", "kubetriage.io/verdict-at":
                "2026-01-01T00:00:00Z", "kubetriage.io/submitted-by": "ci"}},
            "spec": script_spec("checkout", "AssertionError: total was 0")}
    result = await create_job(p.kube, p.ns, body)
    assert result.result == "created", result
    annotations = (await p.get("ingested"))["metadata"]["annotations"]
    assert annotations == {"kubetriage.io/submitted-by": "ci"}

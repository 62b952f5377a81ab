"""``kubetriage submit|get|verdict set|queue`` as a user runs them: real processes, the real API server.

The last test runs the whole thing: an operator process with ingest enabled,
worker pods, and the CLI submitting through the operator's own ingest port.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import resource
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import yaml

from devharness import devenv
from kubetriage.api.keys import ALERT_STATUS_LABEL, VERDICT, VERDICT_AT, VERDICT_BY, VERDICT_REASON
from kubetriage.api.models import MAX_LOGS
from tests.ingestenv import IngestEnv
from tests.pipeline import Pipeline
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

JUNIT = b"""<testsuite name="pytest"><testcase classname="tests.test_cart" name="test_total">
<failure message="AssertionError: total was 0">assert 0 == 30</failure></testcase>
<testcase classname="tests.test_cart" name="test_ok"/></testsuite>"""


async def cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | int | None = None,
              heap_limit: int | None = None) -> tuple[int, str, str]:
    """``kubetriage ...`` in its own process (without blocking the loop that may serve ingest).

    ``stdin``: bytes to send, or a file descriptor to read from. ``heap_limit``: RLIMIT_DATA in bytes, so a
    process that would hold much more memory fails with MemoryError instead of straining the machine.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetriage", *args, env={**os.environ, **(env or {})},
        stdin=stdin if isinstance(stdin, int) else asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_heap_limit(heap_limit) if heap_limit else None)
    out, err = await proc.communicate(None if isinstance(stdin, int) else stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _heap_limit(limit: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


@pytest.fixture(scope="module")
async def env(cluster: devenv.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IngestEnv]:
    async with IngestEnv(cluster, tmp_path_factory.mktemp("cli")) as e:
        yield e


async def test_help_lists_the_commands_and_exit_codes() -> None:
    code, out, _ = await cli("--help")
    assert code == 0
    for command in ("submit", "get", "verdict", "queue"):
        assert command in out
    for args in (("submit", "alert"), ("submit", "script"), ("submit", "junit"), ("get",), ("verdict", "set"),
                 ("queue",)):
        code, out, _ = await cli(*args, "--help")
        assert code == 0 and "exit codes: 0 success" in out and "-o" in out, args


async def test_usage_errors_exit_2_with_a_message(env: IngestEnv, tmp_path: Path) -> None:
    cases: list[tuple[tuple[str, ...], str]] = [
        (("verdict", "set", "x", "maybe", "--reason", "r"), "invalid choice"),
        (("verdict", "set", "x", "valid"), "--reason"),
        (("verdict", "set", "x", "valid", "--reason", "  ", "-n", env.ns), "--reason must say why"),
        (("submit", "alert", "-n", env.ns), "needs an alert NAME"),
        (("submit", "alert", "X", "--status", "resolved", "-n", env.ns), "--starts-at"),
        (("submit", "alert", "X", "--label", "novalue", "-n", env.ns), "key=value"),
        (("submit", "script", "s", "--report-url", "ftp://x", "-n", env.ns), "html_report_r2_url"),
        (("submit", "junit", str(tmp_path / "missing.xml"), "-n", env.ns), "cannot read"),
        (("submit", "script", "s", "--url", env.url, "-n", env.ns), "KUBETRIAGE_INGEST_TOKEN"),
        (("get", "-o", "xml"), "invalid choice"),
    ]
    for args, message in cases:
        code, out, err = await cli(*args, env={"KUBETRIAGE_INGEST_TOKEN": ""})
        assert code == 2, (args, out, err)
        assert message in err, (args, err)
    assert await env.jobs() == []


async def test_submit_directly_to_the_cluster_then_get_and_verdict(env: IngestEnv, tmp_path: Path) -> None:
    ns = env.ns
    code, out, err = await cli("submit", "alert", "DiskFull", "--severity", "warning", "-l", "instance=db-1:9100",
                               "-a", "summary=disk 95% full", "--starts-at", "2026-01-05T10:00:00Z", "-n", ns,
                               "-o", "json")
    assert code == 0, err
    body = json.loads(out)
    assert body["created"] == 1
    alert_name = body["jobs"][0]["name"]
    assert alert_name.startswith("am-diskfull-")
    # the same alert again: nothing new, still success
    code, out, err = await cli("submit", "alert", "DiskFull", "--severity", "warning", "-l", "instance=db-1:9100",
                               "-a", "summary=disk 95% full", "--starts-at", "2026-01-05T10:00:00Z", "-n", ns)
    assert code == 0 and "exists" in out, (out, err)
    code, out, err = await cli("submit", "alert", "DiskFull", "--severity", "warning", "-l", "instance=db-1:9100",
                               "--starts-at", "2026-01-05T10:00:00Z", "--status", "resolved",
                               "--ends-at", "2026-01-05T10:03:00Z", "-n", ns)
    assert code == 0 and "resolved" in out, (out, err)

    logs = tmp_path / "run.log"
    logs.write_text("step 1 ok\nstep 2: TimeoutError\n")
    code, out, err = await cli("submit", "script", "checkout-e2e", "--id", "88412", "--error", "TimeoutError: x",
                               "--report-url", "https://r2.example.com/88412.html", "--screenshot",
                               "https://r2.example.com/88412.png", "--logs-file", str(logs), "--duration", "12.5",
                               "--attempt", "2", "-n", ns, "-o", "name")
    assert code == 0, err
    assert out.strip() == "triagejob.kubetriage.io/sr-checkout-e2e-88412"
    code, out, err = await cli("submit", "script", "-f", "-", "-n", ns, "-o", "yaml",
                               stdin=json.dumps({"id": 5, "script_name": "nightly", "success": True}).encode())
    assert code == 0 and yaml.safe_load(out)["jobs"][0]["result"] == "skipped", (out, err)

    report = tmp_path / "report.xml"
    report.write_bytes(JUNIT)
    code, out, err = await cli("submit", "junit", str(report), "--run", "ci-7", "-n", ns)
    assert code == 0 and "tests.test_cart::test_total" in out, (out, err)
    assert "failed 1" in err and "passed 1" in err  # the test summary goes to stderr, the table to stdout

    code, out, err = await cli("get", "-n", ns)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "PRIORITY", "PHASE", "VERDICT", "CONFIDENCE", "BY", "AGE",
                                "REASON"]
    assert len(lines) == 4
    row = next(line for line in lines if line.startswith(alert_name))
    assert "alert (resolved)" in row and "kubetriage-p2" in row

    code, out, err = await cli("verdict", "set", "sr-checkout-e2e-88412", "false_positive", "--reason",
                               "staging CDN outage, not the checkout code", "--by", "alice", "-n", ns)
    assert code == 0 and "verdict set: false_positive (by alice)" in out, (out, err)
    job = await env.job("sr-checkout-e2e-88412")
    ann = job["metadata"]["annotations"]
    assert ann[VERDICT] == "false_positive" and ann[VERDICT_BY] == "alice"
    assert ann[VERDICT_REASON] == "staging CDN outage, not the checkout code" and ann[VERDICT_AT].endswith("Z")
    sr = job["spec"]["scriptResult"]
    assert sr["logsExcerpt"] == "step 1 ok\nstep 2: TimeoutError\n" and sr["attempt"] == 2
    code, out, err = await cli("get", "sr-checkout-e2e-88412", "-n", ns)
    assert code == 0
    assert "false_positive" in out and "user:alice (pending)" in out and "staging CDN outage" in out

    code, out, _ = await cli("get", "sr-checkout-e2e-88412", "-n", ns, "-o", "json")
    assert code == 0 and json.loads(out)["metadata"]["name"] == "sr-checkout-e2e-88412"
    code, out, _ = await cli("get", "-n", ns, "-o", "yaml", "-l", f"{ALERT_STATUS_LABEL}=resolved")
    items = yaml.safe_load(out)["items"]
    assert code == 0 and [i["metadata"]["name"] for i in items] == [alert_name]
    code, out, _ = await cli("get", "-A", "-o", "name")
    assert code == 0 and f"triagejob.kubetriage.io/{alert_name}" in out.splitlines()

    code, _, err = await cli("get", "no-such-job", "-n", ns)
    assert code == 1 and "triagejob 'no-such-job' not found" in err
    code, _, err = await cli("verdict", "set", "no-such-job", "valid", "--reason", "x", "-n", ns)
    assert code == 1 and "not found" in err


async def test_submit_through_the_ingest_endpoint(env: IngestEnv, tmp_path: Path) -> None:
    token = {"KUBETRIAGE_INGEST_TOKEN": env.token}
    code, out, err = await cli("submit", "script", "login", "--id", "7", "--error", "boom", "--url", env.url,
                               "-n", env.ns2, "-o", "json", env=token)
    assert code == 0, err
    body = json.loads(out)
    assert body["namespace"] == env.ns2 and body["jobs"] == [{"name": "sr-login-7", "result": "created"}]
    report = tmp_path / "r.xml"
    report.write_bytes(JUNIT)
    code, out, err = await cli("submit", "junit", str(report), "--url", env.url, "--token", env.team_token)
    assert code == 0 and "created" in out, (out, err)
    assert len(await env.jobs(env.team_ns)) == 1  # the team token's own namespace
    code, out, err = await cli("submit", "alert", "Ping", "--url", env.url, "-n", env.ns2, "--starts-at",
                               "2026-01-05T10:00:00Z", env=token)
    assert code == 0 and "created" in out, (out, err)
    # refused by the server: exit 1 with its message
    code, _, err = await cli("submit", "script", "x", "--url", env.url, "-n", "kube-system", env=token)
    assert code == 1 and "403" in err and "not allowed" in err
    code, _, err = await cli("submit", "script", "x", "--url", env.url, "--token", "wrong-token-wrong-token")
    assert code == 1 and "401" in err
    code, _, err = await cli("submit", "script", "x", "--url", f"http://127.0.0.1:{devenv.free_port()}", env=token)
    assert code == 1 and "cannot reach" in err


async def test_operator_serves_ingest_and_cli_shows_verdicts_and_queue(pipeline: Pipeline) -> None:
    p = pipeline
    port, token = devenv.free_port(), "operator-ingest-token-0123456789"
    await p.pool("default", concurrency=2, replicas={"min": 1, "max": 1})
    p.start_operator(ingest_port=port, ingest_token=token, ingest_namespace=p.ns)
    url = f"http://127.0.0.1:{port}"

    async def serving() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{url}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(serving, "the operator's ingest port", timeout=90, interval=0.3)
    env = {"KUBETRIAGE_INGEST_TOKEN": token}
    code, out, err = await cli("submit", "script", "cart-e2e", "--id", "1", "--error",
                               "AssertionError: total was 0", "--url", url, "-o", "json", env=env)
    assert code == 0, err
    name = json.loads(out)["jobs"][0]["name"]
    code, out, err = await cli("submit", "alert", "EndpointDown", "--severity", "critical", "-l",
                               "instance=https://api.example.com/health", "--url", url, "-o", "name", env=env)
    assert code == 0, err
    alert = out.strip().split("/")[-1]
    jobs = await p.wait_terminal([name, alert])
    verdict = jobs[name]["status"]["verdict"]

    code, out, err = await cli("get", "-n", p.ns)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(name))
    assert verdict["classification"] in row and "Succeeded" in row and verdict["analyzer"] in row
    assert " ".join(verdict["reason"].split())[:40] in row

    code, out, err = await cli("queue", "-n", p.ns)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["POOL", "PRIORITY", "REPLICAS", "RUNNING", "BACKLOG", "OLDEST", "WAIT"]
    assert out.splitlines()[1].split()[0] == "default"
    code, out, err = await cli("queue", "-n", p.ns, "-o", "json")
    pools = json.loads(out)["pools"]
    assert code == 0 and pools[0]["pool"] == "default" and pools[0]["backlog"] == 0
    assert pools[0]["oldestWaitSeconds"] is None and pools[0]["maxReplicas"] == 1

    code, out, err = await cli("verdict", "set", name, "valid", "--reason", "reproduced by hand", "-n", p.ns)
    assert code == 0, err
    code, out, _ = await cli("get", name, "-n", p.ns, "-o", "wide")
    assert "valid" in out and "reproduced by hand" in out


LOG_END = "step 9: TimeoutError: page.goto: Timeout 30000ms exceeded."
HEAP = 256 << 20  # the CLI needs well under this; the inputs below are 1 GiB and more
# writes 1.5 GiB of log lines to stdout, then the line that matters
GENERATOR = f"""
import sys
out = sys.stdout.buffer
line = b"INFO nothing to see here " * 40 + b"\\n"
block = line * (1048576 // len(line))
for _ in range(1536):
    out.write(block)
out.write({(LOG_END + chr(10)).encode()!r})
"""


async def test_logs_file_sends_a_bounded_tail_of_any_input(cluster: devenv.ControlPlane, tmp_path: Path) -> None:
    # a body over 256 KiB is refused: a request carrying more than the tail of a log would fail with 413
    async with IngestEnv(cluster, tmp_path / "ingest", ingest_max_body_bytes=256 << 10) as env:
        token = {"KUBETRIAGE_INGEST_TOKEN": env.token}
        big = tmp_path / "big.log"
        with big.open("wb") as f:  # 1 GiB, sparse: no disk is used
            f.truncate(1 << 30)
            f.seek(0, os.SEEK_END)
            f.write(f"{LOG_END}\n".encode())
        runs: list[tuple[str, str, list[str]]] = [
            ("file", str(big), []), ("file-url", str(big), ["--url", env.url]),
            ("zero", "/dev/zero", ["--url", env.url]),  # never ends
            ("pipe", "-", []), ("pipe-url", "-", ["--url", env.url]),  # 1.5 GiB from another process
        ]
        for row_id, path, via in runs:
            reader, writer = os.pipe()
            gen = await asyncio.create_subprocess_exec(sys.executable, "-c", GENERATOR, stdout=writer) \
                if path == "-" else None
            os.close(writer)
            try:
                code, out, err = await cli("submit", "script", "big-log", "--id", row_id.replace("-", ""),
                                           "--error", "x", "--logs-file", path, "-n", env.ns, *via, env=token,
                                           stdin=reader, heap_limit=HEAP)
            finally:
                os.close(reader)
                if gen is not None and gen.returncode is None:
                    gen.kill()
                if gen is not None:
                    await gen.wait()
            assert code == 0, (row_id, out, err)
        logs = {j["spec"]["source"]["id"]: j["spec"]["scriptResult"]["logsExcerpt"] for j in await env.jobs()}
        assert sorted(logs) == ["file", "fileurl", "pipe", "pipeurl", "zero"]
        for row_id, text in logs.items():
            assert len(text) <= MAX_LOGS, row_id
            if row_id != "zero":
                assert text.endswith(LOG_END + "\n") and "bytes of" in text.splitlines()[0], (row_id, text[:200])
        assert "stopped reading /dev/zero after 1024 MiB: a device that does not end" in logs["zero"]
        assert logs["file"].startswith("…[the first 1073709") and logs["pipe"].startswith("…[the first 16")


# --------------------------------------------------------------------------- login: exec credential plugins

EXEC_V1 = "client.authentication.k8s.io/v1"
# An exec credential plugin like ``aws eks get-token`` or ``gke-gcloud-auth-plugin``: a real program that the CLI
# runs. It logs each call (argv, env, KUBERNETES_EXEC_INFO) and answers with the next status from answers.json
# (the last one repeats); "fail" makes it exit 3 with a message, as a plugin whose session expired does.
PLUGIN = """#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "mark": os.environ.get("PLUGIN_MARK"),
                        "info": json.loads(os.environ["KUBERNETES_EXEC_INFO"])}}) + "\\n")
with open(os.path.join(here, "calls.jsonl")) as f:
    n = len(f.readlines())
with open(os.path.join(here, "answers.json")) as f:
    answers = json.load(f)
status = answers[min(n, len(answers)) - 1]
if status == "fail":
    print("plugin: your session has expired; run the cloud CLI's login", file=sys.stderr)
    sys.exit(3)
print(json.dumps({{"apiVersion": "{api}", "kind": "ExecCredential", "status": status}}))
"""


class ExecLogin:
    """A folder with a kubeconfig whose user is an exec plugin (a local script) and the plugin's answers."""

    def __init__(self, cluster: devenv.ControlPlane, folder: Path, exec_spec: dict[str, object] | None = None,
                 namespace: str = "default") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        plugin = folder / "plugin.py"
        plugin.write_text(PLUGIN.format(python=sys.executable, api=EXEC_V1))
        plugin.chmod(0o755)
        ca = base64.b64encode((cluster.root / "pki" / "ca.crt").read_bytes()).decode()
        spec = {"apiVersion": EXEC_V1, "command": "./plugin.py", "args": ["--cluster", "local"],
                "env": [{"name": "PLUGIN_MARK", "value": "from-kubeconfig"}], "interactiveMode": "Never",
                "provideClusterInfo": True, **(exec_spec or {})}
        self.kubeconfig = folder / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "cloud",
            "clusters": [{"name": "cloud", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
            "users": [{"name": "cloud-user", "user": {"exec": spec}}],
            "contexts": [{"name": "cloud", "context": {"cluster": "cloud", "user": "cloud-user",
                                                       "namespace": namespace}}],
        }))
        self.answers("fail")

    def answers(self, *statuses: dict[str, str] | str) -> None:
        """What the plugin prints on its next runs; clears the call log."""
        (self.folder / "answers.json").write_text(json.dumps(list(statuses)))
        (self.folder / "calls.jsonl").unlink(missing_ok=True)

    def calls(self) -> list[dict[str, object]]:
        log = self.folder / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    async def cli(self, *args: str) -> tuple[int, str, str]:
        return await cli(*args, env={"KUBECONFIG": str(self.kubeconfig)})


def in_an_hour() -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def triage_reader(cluster: devenv.ControlPlane, ns: str, name: str) -> None:
    """A ServiceAccount that may read TriageJobs and pools and set verdicts in ``ns``, nothing else."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name, "namespace": ns},
         "rules": [{"apiGroups": ["kubetriage.io"], "resources": ["triagejobs", "triagepools"],
                    "verbs": ["get", "list", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
    ]}))


async def test_cli_logs_in_through_an_exec_plugin(env: IngestEnv, tmp_path: Path) -> None:
    """EKS/GKE/AKS kubeconfigs: the user is a command that prints an ExecCredential, here with a real token."""
    ns, cluster = env.ns, env.cluster
    triage_reader(cluster, ns, "cli-exec")
    token = cluster.kubectl("create", "token", "cli-exec", "-n", ns, "--duration=1h").stdout.strip()
    code, out, err = await cli("submit", "script", "exec-login", "--id", "1", "--error", "boom", "-n", ns)
    assert code == 0, err
    login = ExecLogin(cluster, tmp_path / "exec", namespace=ns)

    login.answers({"token": token, "expirationTimestamp": in_an_hour()})
    code, out, err = await login.cli("get", "sr-exec-login-1", "sr-exec-login-1")  # two requests, one login
    assert code == 0, err
    assert "sr-exec-login-1" in out
    calls = login.calls()
    assert len(calls) == 1, calls  # cached until expirationTimestamp
    call = calls[0]
    assert call["argv"] == ["--cluster", "local"] and call["mark"] == "from-kubeconfig"
    info = call["info"]
    assert isinstance(info, dict) and info["apiVersion"] == EXEC_V1 and info["kind"] == "ExecCredential"
    assert info["spec"]["interactive"] is False  # no terminal here, and interactiveMode: Never
    assert info["spec"]["cluster"]["server"] == cluster.server  # provideClusterInfo
    assert info["spec"]["cluster"]["certificate-authority-data"]

    login.answers({"token": token, "expirationTimestamp": "2020-01-01T00:00:00Z"})
    code, out, err = await login.cli("get", "sr-exec-login-1", "sr-exec-login-1")
    assert code == 0, err
    assert len(login.calls()) == 2  # an expired credential is not reused: the plugin runs before each request

    login.answers({"token": token})  # no expiry: kept for the whole command
    code, out, err = await login.cli("queue", "-o", "json")  # pools and jobs: two LISTs
    assert code == 0, err
    assert json.loads(out)["pools"] == [] and len(login.calls()) == 1
    code, out, err = await login.cli("verdict", "set", "sr-exec-login-1", "valid", "--reason", "seen by hand")
    assert code == 0, err
    job = await env.job("sr-exec-login-1")
    assert job["metadata"]["annotations"][VERDICT] == "valid"
    # the plugin's token is who the API server saw: the ServiceAccount may not read other namespaces
    code, _, err = await login.cli("get", "-n", env.ns2)
    assert code == 1 and "forbidden" in err and f"system:serviceaccount:{ns}:cli-exec" in err, err

    # a plugin may answer with a client certificate instead (here the control plane's admin certificate)
    pki = cluster.root / "pki"
    login.answers({"clientCertificateData": (pki / "admin.crt").read_text(),
                   "clientKeyData": (pki / "admin.key").read_text()})
    code, out, err = await login.cli("get", "-A", "-o", "name")  # across namespaces: only the admin may
    assert code == 0 and "triagejob.kubetriage.io/sr-exec-login-1" in out.splitlines(), (out, err)


async def test_cli_logs_in_again_after_a_401(env: IngestEnv, tmp_path: Path) -> None:
    """A token revoked before its expiry (here: bound to a Secret that is deleted) is replaced by running the
    plugin again, once, and the request is retried once."""
    ns, cluster = env.ns, env.cluster
    triage_reader(cluster, ns, "cli-revoked")
    cluster.kubectl("create", "secret", "generic", "session", "-n", ns)
    revoked = cluster.kubectl("create", "token", "cli-revoked", "-n", ns, "--duration=1h",
                              "--bound-object-kind=Secret", "--bound-object-name=session").stdout.strip()
    good = cluster.kubectl("create", "token", "cli-revoked", "-n", ns, "--duration=1h").stdout.strip()
    cluster.kubectl("delete", "secret", "session", "-n", ns)
    probe = cluster.kubeconfig_for_token(revoked, tmp_path / "probe.kubeconfig")
    await eventually(lambda: cluster.kubectl("get", "tj", "-n", ns, kubeconfig=probe, check=False).returncode != 0,
                     "the API server refusing the token bound to the deleted Secret")
    login = ExecLogin(cluster, tmp_path / "exec", namespace=ns)

    login.answers({"token": revoked, "expirationTimestamp": in_an_hour()},
                  {"token": good, "expirationTimestamp": in_an_hour()})
    code, out, err = await login.cli("get", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "List"
    assert len(login.calls()) == 2  # the cached token was refused (401): logged in again once

    # a plugin that keeps answering with a refused token: one more try, then a message saying what to do
    login.answers({"token": revoked, "expirationTimestamp": in_an_hour()})
    code, out, err = await login.cli("queue")
    assert code == 1, (out, err)
    assert "refused the credentials" in err and "also after logging in again" in err and str(login.kubeconfig) in err
    assert "Traceback" not in err
    assert len(login.calls()) == 2


async def test_cli_says_what_is_wrong_with_an_exec_plugin(env: IngestEnv, tmp_path: Path) -> None:
    login = ExecLogin(env.cluster, tmp_path / "failing")
    login.answers("fail")
    code, _, err = await login.cli("get")
    assert code == 1 and "Traceback" not in err, err
    assert "your session has expired" in err  # the plugin's own stderr reaches the user
    assert "plugin.py" in err and "failed with exit code 3" in err and "'cloud-user'" in err

    login.answers({"expirationTimestamp": in_an_hour()})
    code, _, err = await login.cli("get")
    assert code == 1 and "neither status.token nor status.clientCertificateData" in err, err

    missing = ExecLogin(env.cluster, tmp_path / "missing", {"command": "kubetriage-no-such-auth-plugin",
                                                            "installHint": "install it with: apt install nothing"})
    code, _, err = await missing.cli("queue")
    assert code == 1 and "'kubetriage-no-such-auth-plugin'" in err and "not found" in err, err
    assert "install it with: apt install nothing" in err

    old = ExecLogin(env.cluster, tmp_path / "old", {"apiVersion": "client.authentication.k8s.io/v1alpha1"})
    code, _, err = await old.cli("get")
    assert code == 1 and "v1alpha1" in err and "is not supported" in err and EXEC_V1 in err, err
    assert old.calls() == []

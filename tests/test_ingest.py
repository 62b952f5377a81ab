"""The ingest HTTP boundary against the real API server: hostile input, auth, namespaces, limits, mapping."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest

from devharness import devenv
from kubetriage.api.keys import ALERT_FINGERPRINT_LABEL, ALERT_STATUS_LABEL, INGEST_KEY, RESOLVED_AT
from kubetriage.infra.kube import Kube, triagejob_path
from kubetriage.ingest.jobs import ScriptResultIn, script_job
from tests.ingestenv import IngestEnv, am_alert, webhook

pytestmark = pytest.mark.cluster

MAX_BODY = 65536


@pytest.fixture(scope="module")
async def env(cluster: devenv.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IngestEnv]:
    async with IngestEnv(cluster, tmp_path_factory.mktemp("ingest"), ingest_max_body_bytes=MAX_BODY) as e:
        yield e


# --------------------------------------------------------------------------- hostile and malformed requests


@dataclass
class Bad:
    """One bad request: what it sends (built per environment) and the documented answer."""

    id: str
    status: int
    build: Callable[[IngestEnv], dict[str, Any]]
    path: str = "/v1/alertmanager"
    method: str = "POST"
    field: str | None = None
    auth: bool = True


def _json(data: Any) -> Callable[[IngestEnv], dict[str, Any]]:
    return lambda env: {"content": json.dumps(data).encode(), "headers": {"Content-Type": "application/json"}}


def _raw(data: bytes, **headers: str) -> Callable[[IngestEnv], dict[str, Any]]:
    return lambda env: {"content": data, "headers": headers}


def _headers(**headers: str) -> Callable[[IngestEnv], dict[str, Any]]:
    return lambda env: {"content": json.dumps(webhook(am_alert())).encode(), "headers": headers}


async def _chunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 8192 + 1):
        yield b" " * 8192


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<testsuites><testsuite name="s"><testcase classname="c" name="&lol9;"><failure message="&lol9;"/></testcase>
</testsuite></testsuites>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE t [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<testsuite name="s"><testcase classname="c" name="t"><failure message="&xxe;"/></testcase></testsuite>"""

SCRIPT = {"id": 1, "script_name": "checkout", "success": False, "error_msg": "boom"}

BAD: list[Bad] = [
    Bad("no-token", 401, _headers(), auth=False),
    Bad("wrong-token", 401, _headers(Authorization="Bearer not-the-token-at-all"), auth=False),
    Bad("basic-auth-scheme", 401, lambda env: {"headers": {"Authorization": f"Basic {env.token}"},
                                               "content": b"{}"}, auth=False),
    Bad("empty-bearer", 401, _headers(Authorization="Bearer"), auth=False),
    Bad("token-as-query-param", 401, lambda env: {"params": {"token": env.token}, "content": b"{}"}, auth=False),
    Bad("malformed-json", 400, _raw(b'{"alerts": [', **{"Content-Type": "application/json"})),
    Bad("json-nan", 400, _raw(b'{"alerts": [], "truncatedAlerts": NaN}')),
    Bad("json-huge-integer", 400, _raw(b'{"truncatedAlerts": ' + b"9" * 5000 + b"}")),
    Bad("empty-body", 400, _raw(b"")),
    Bad("non-utf8", 400, _raw(b'{"receiver": "\xff\xfe\xfa", "alerts": []}')),
    Bad("deeply-nested-json", 400, _raw(b"[" * 20000 + b"]" * 20000)),
    Bad("nested-over-limit", 400, _raw(json.dumps({"alerts": [], "x": json.loads("[" * 40 + "]" * 40)}).encode())),
    Bad("alerts-wrong-type", 422, _json({"version": "4", "alerts": "many"}), field="alerts"),
    Bad("alert-status-wrong", 422, _json(webhook({**am_alert(), "status": "burning"})), field="alerts[0].status"),
    Bad("alert-missing-startsAt", 422, _json(webhook({k: v for k, v in am_alert().items() if k != "startsAt"})),
        field="alerts[0].startsAt"),
    Bad("wrong-version", 422, _json({**webhook(am_alert()), "version": "3"}), field="version"),
    Bad("label-value-not-string", 422, _json(webhook(am_alert(**{"instance": 5}))),  # type: ignore[arg-type]
        field="alerts[0].labels.instance"),
    Bad("too-many-labels", 422, _json(webhook(am_alert(**{f"l{i}": "v" for i in range(80)}))),
        field="alerts[0].labels"),
    Bad("alertname-too-long", 422, _json(webhook(am_alert("A" * 300))), field="alerts[0].labels.alertname"),
    Bad("huge-label-value", 422, _json(webhook(am_alert(instance="x" * 5000))), field="alerts[0].labels.instance"),
    Bad("huge-body", 413, _raw(b" " * (MAX_BODY + 10))),
    Bad("huge-chunked-body", 413, lambda env: {"content": _chunks(MAX_BODY * 3)}),
    Bad("gzip-garbage", 400, _raw(b"this is not gzip", **{"Content-Encoding": "gzip"})),
    Bad("multipart-garbage", 400, _raw(b"--b\r\nnot a header line\r\n\r\nx\r\n--b--\r\n",
                                       **{"Content-Type": "multipart/form-data; boundary=b"}), path="/v1/junit"),
    Bad("gzip-bomb", 413, _raw(gzip.compress(b" " * (MAX_BODY * 200)), **{"Content-Encoding": "gzip"})),
    Bad("namespace-not-allowed", 403, lambda env: {"params": {"namespace": "kube-system"},
                                                   "content": json.dumps(webhook(am_alert())).encode()},
        field="namespace"),
    Bad("namespace-allowed-but-missing", 422, lambda env: {"params": {"namespace": env.missing_ns},
                                                           "content": json.dumps(webhook(am_alert())).encode()},
        field="namespace"),
    Bad("team-token-other-namespace", 403, lambda env: {
        "params": {"namespace": env.ns}, "headers": env.auth(env.team_token),
        "content": json.dumps(webhook(am_alert())).encode()}, field="namespace"),
    Bad("bad-pool-param", 422, lambda env: {"params": {"pool": "Not_A_Pool"},
                                            "content": json.dumps(webhook(am_alert())).encode()}, field="pool"),
    Bad("get-on-post-route", 405, lambda env: {}, method="GET"),
    Bad("unknown-route", 404, _json({}), path="/v1/nope"),
    Bad("script-success-not-bool", 422, _json({**SCRIPT, "success": "maybe"}), path="/v1/script-results",
        field="success"),
    Bad("script-id-bool", 422, _json({**SCRIPT, "id": True}), path="/v1/script-results", field="id"),
    Bad("script-missing-name", 422, _json({"success": False}), path="/v1/script-results", field="script_name"),
    Bad("script-javascript-url", 422, _json({**SCRIPT, "html_report_r2_url": "javascript:alert(1)"}),
        path="/v1/script-results", field="html_report_r2_url"),
    Bad("script-file-screenshot", 422, _json({**SCRIPT, "screenshots": ["file:///etc/passwd"]}),
        path="/v1/script-results", field="screenshots"),
    Bad("script-not-an-object", 422, _json("hello"), path="/v1/script-results", field="body"),
    Bad("script-list-too-long", 422, _json([SCRIPT] * 101), path="/v1/script-results", field="body"),
    Bad("script-second-item-bad", 422, _json([SCRIPT, {**SCRIPT, "id": 2, "duration": -1}]),
        path="/v1/script-results", field="[1].duration"),
    Bad("xml-billion-laughs", 400, _raw(BILLION_LAUGHS), path="/v1/junit"),
    Bad("xml-external-entity", 400, _raw(XXE), path="/v1/junit"),
    Bad("xml-undefined-entity", 400, _raw(b'<testsuite name="&nope;"/>'), path="/v1/junit"),
    Bad("xml-malformed", 400, _raw(b"<testsuite><testcase></testsuite>"), path="/v1/junit"),
    Bad("xml-not-junit", 422, _raw(b"<html><body>hi</body></html>"), path="/v1/junit", field="body"),
    Bad("xml-deep", 400, _raw(b"<testsuite>" + b"<a>" * 100 + b"</a>" * 100 + b"</testsuite>"), path="/v1/junit"),
    Bad("junit-multipart-without-file", 422, lambda env: {"data": {"note": "no file"}, "files": None},
        path="/v1/junit", field="file"),
    Bad("junit-bad-report-url", 422, lambda env: {"params": {"report_url": "ftp://x"}, "content": b"<testsuite/>"},
        path="/v1/junit", field="report_url"),
    # a declared type the route cannot parse (no type at all is parsed as the route's format)
    Bad("json-sent-as-text-plain", 415, _raw(json.dumps(webhook(am_alert())).encode(),
                                             **{"Content-Type": "text/plain"})),
    Bad("json-sent-as-a-form", 415, _raw(json.dumps(SCRIPT).encode(),
                                         **{"Content-Type": "application/x-www-form-urlencoded"}),
        path="/v1/script-results"),
    Bad("json-in-latin-1", 415, _raw(json.dumps(SCRIPT).encode(),
                                     **{"Content-Type": "application/json; charset=iso-8859-1"}),
        path="/v1/script-results"),
    Bad("multipart-on-a-json-route", 415, _raw(b"--b\r\n\r\nx\r\n--b--\r\n",
                                               **{"Content-Type": "multipart/form-data; boundary=b"})),
    Bad("junit-sent-as-json", 415, _raw(b"<testsuite/>", **{"Content-Type": "application/json"}), path="/v1/junit"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
async def test_bad_request_gets_documented_status_and_creates_nothing(env: IngestEnv, bad: Bad) -> None:
    before = await _all_jobs(env)
    kw = bad.build(env)
    headers = {**(env.auth() if bad.auth else {}), **kw.pop("headers", {})}
    if kw.get("files") is None and "data" in kw:  # a multipart body with no file part
        kw["files"] = {"note": (None, b"no file")}
        kw.pop("data")
    resp = await env.http.request(bad.method, bad.path, headers=headers, **kw)
    assert resp.status_code == bad.status, resp.text
    body = resp.json()
    assert body["status"] == bad.status and body["error"], body
    if bad.field is not None:
        assert body["field"] == bad.field, body
        assert bad.field.split(".")[0].split("[")[0] in body["error"] or bad.field == "body", body
    if bad.status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    if bad.status == 405:
        assert "POST" in resp.headers["Allow"]
    if bad.status == 415:  # says what the route takes, in the message and in Accept (RFC 9110)
        assert resp.headers["Accept"].startswith("application/") and resp.headers["Accept"] in body["error"], body
    assert await _all_jobs(env) == before, f"{bad.id} created a job"
    assert await env.healthy()


async def _all_jobs(env: IngestEnv) -> set[str]:
    return {f"{ns}/{j['metadata']['name']}" for ns in (env.ns, env.ns2, env.team_ns) for j in await env.jobs(ns)}


def test_there_are_at_least_twenty_hostile_cases() -> None:
    assert len(BAD) >= 20
    assert {b.status for b in BAD} == {400, 401, 403, 404, 405, 413, 415, 422}


async def test_server_still_serves_after_the_hostile_requests(env: IngestEnv) -> None:
    resp = await env.post("/v1/script-results", json={**SCRIPT, "id": "afterhostile"})
    assert resp.status_code == 201, resp.text
    assert [j["metadata"]["name"] for j in await env.jobs()] == ["sr-checkout-afterhostile"]
    await env.kube.delete(f"/apis/kubetriage.io/v1alpha1/namespaces/{env.ns}/triagejobs/sr-checkout-afterhostile")


# --------------------------------------------------------------------------- script results


async def test_script_result_maps_the_original_fields(env: IngestEnv) -> None:
    row = {
        "id": 88412, "script_name": "Checkout Login E2E", "success": False,
        "error_msg": "TimeoutError: page.goto: Timeout 30000ms exceeded.",
        "html_report_r2_url": "https://r2.example.com/reports/88412/index.html",
        "screenshots": ["https://r2.example.com/reports/88412/failed.png", "data:image/png;base64,iVBORw0KGgo="],
        "logs": "start\n" + "x" * 40000 + "\nthe end: TimeoutError", "duration": 31.5, "attempt": 2,
        "created_at": "2026-01-05T10:00:00Z", "checked": False,  # other columns of the row: ignored
    }
    resp = await env.post("/v1/script-results", json=row, params={"namespace": env.ns2})
    assert resp.status_code == 201, resp.text
    assert resp.json()["jobs"] == [{"name": "sr-checkout-login-e2e-88412", "result": "created"}]
    job = await env.job("sr-checkout-login-e2e-88412", env.ns2)
    spec = job["spec"]
    assert spec["source"] == {"type": "scriptResult", "id": "88412"}
    sr = spec["scriptResult"]
    assert sr["scriptName"] == "Checkout Login E2E" and sr["success"] is False
    assert sr["errorMessage"] == row["error_msg"]
    assert sr["reportURL"] == row["html_report_r2_url"]
    assert sr["screenshots"][0] == {"url": "https://r2.example.com/reports/88412/failed.png"}
    assert sr["screenshots"][1]["data"] == "iVBORw0KGgo=" and sr["screenshots"][1]["mediaType"] == "image/png"
    assert sr["logsExcerpt"].endswith("the end: TimeoutError") and "characters cut" in sr["logsExcerpt"]
    assert len(sr["logsExcerpt"]) <= 32768
    assert sr["durationSeconds"] == 31.5 and sr["attempt"] == 2
    assert "priorityClassName" not in spec  # the operator's default for script results (p2)
    assert job["metadata"]["labels"]["kubetriage.io/ingest"] == "script-result"
    assert job["metadata"]["annotations"]["kubetriage.io/submitted-by"] == "ingest-token"
    again = await env.post("/v1/script-results", json=row, params={"namespace": env.ns2})
    assert again.status_code == 200 and again.json()["jobs"][0]["result"] == "exists"
    assert len(await env.jobs(env.ns2)) == 1


async def test_successful_runs_are_skipped_unless_asked(env: IngestEnv) -> None:
    ok = {"id": "ok-1", "script_name": "nightly", "success": True}
    resp = await env.post("/v1/script-results", json=ok, params={"namespace": env.team_ns}, token=env.team_token)
    assert resp.status_code == 200 and resp.json()["jobs"][0]["result"] == "skipped"
    assert await env.jobs(env.team_ns) == []
    resp = await env.post("/v1/script-results", json={**ok, "analyze": True}, token=env.team_token)
    assert resp.status_code == 201 and resp.json()["namespace"] == env.team_ns  # the team token's default
    (job,) = await env.jobs(env.team_ns)
    assert job["spec"]["scriptResult"]["success"] is True
    assert job["metadata"]["annotations"]["kubetriage.io/submitted-by"] == "team-a"


async def test_list_of_results_and_id_less_results_are_idempotent(env: IngestEnv) -> None:
    items = [{"id": None, "script_name": "smoke", "success": False, "error_msg": f"fail {i}"} for i in range(3)]
    resp = await env.post("/v1/script-results", json=items, params={"pool": "backfill",
                                                                    "priority_class": "kubetriage-p3"})
    assert resp.status_code == 201, resp.text
    names = [j["name"] for j in resp.json()["jobs"]]
    assert len(set(names)) == 3 and all(n.startswith("sr-smoke-") for n in names)
    again = await env.post("/v1/script-results", json=items, params={"pool": "backfill"})
    assert [j["result"] for j in again.json()["jobs"]] == ["exists"] * 3
    job = await env.job(names[0])
    assert job["spec"]["pool"] == "backfill" and job["spec"]["priorityClassName"] == "kubetriage-p3"
    for n in names:
        await env.kube.delete(f"/apis/kubetriage.io/v1alpha1/namespaces/{env.ns}/triagejobs/{n}")


# --------------------------------------------------------------------------- alertmanager payloads (hand-made)


async def test_webhook_alerts_map_and_resend_and_resolve(env: IngestEnv) -> None:
    ns = env.ns2
    crit = am_alert("DiskFull", fingerprint="aaaabbbbccccdddd", severity="critical", instance="db-1:9100",
                    device="sda")
    warn = am_alert("Disk Full!", fingerprint="1111222233334444", severity="warning")
    odd = {**am_alert("NoSeverity", fingerprint="not-hex!"), "generatorURL": "/graph?g0.expr=up"}
    resp = await env.post("/v1/alertmanager", json=webhook(crit, warn, odd), params={"namespace": ns})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["created"] == 3 and body["truncatedAlerts"] == 0
    names = [j["name"] for j in body["jobs"]]
    jobs = {j["metadata"]["name"]: j for j in await env.jobs(ns)}
    # the fingerprint in the name is computed from the labels, as Alertmanager computes it, not the sender's
    fingerprints = [jobs[n]["metadata"]["labels"][ALERT_FINGERPRINT_LABEL] for n in names]
    assert names[0] == f"am-diskfull-{fingerprints[0]}-{names[0].rsplit('-', 1)[1]}"
    assert names[1].startswith(f"am-disk-full-{fingerprints[1]}-") and len(set(fingerprints)) == 3
    spec = jobs[names[0]]["spec"]
    assert spec["priorityClassName"] == "kubetriage-p1"
    assert spec["alert"]["name"] == "DiskFull" and spec["alert"]["status"] == "firing"
    assert spec["alert"]["labels"] == crit["labels"] and spec["alert"]["annotations"] == crit["annotations"]
    assert spec["alert"]["host"] == "db-1:9100" and spec["alert"]["device"] == "sda"
    assert spec["alert"]["severity"] == "critical" and spec["alert"]["startsAt"].startswith("2026-01-05T10:00:00")
    assert spec["alert"]["generatorURL"] == crit["generatorURL"] and "endsAt" not in spec["alert"]
    assert jobs[names[1]]["spec"]["priorityClassName"] == "kubetriage-p2"
    assert "priorityClassName" not in jobs[names[2]]["spec"]  # unmapped severity: the operator's p1 default
    assert "generatorURL" not in jobs[names[2]]["spec"]["alert"]  # relative URL: not a link anyone can follow
    assert jobs[names[0]]["metadata"]["labels"][ALERT_STATUS_LABEL] == "firing"

    resend = await env.post("/v1/alertmanager", json=webhook(crit, warn, odd), params={"namespace": ns})
    assert resend.status_code == 200 and resend.json()["exists"] == 3
    assert sum(j["metadata"]["name"].startswith("am-") for j in await env.jobs(ns)) == 3

    resolved = {**crit, "status": "resolved", "endsAt": "2026-01-05T10:04:00Z"}
    resp = await env.post("/v1/alertmanager", json=webhook(resolved, status="resolved"), params={"namespace": ns})
    assert resp.status_code == 200, resp.text
    assert resp.json()["jobs"] == [{"name": names[0], "result": "resolved", "alertStatus": "resolved", "phase": "",
                                    "started": False}]
    job = await env.job(names[0], ns)
    assert job["metadata"]["labels"][ALERT_STATUS_LABEL] == "resolved"
    assert job["metadata"]["annotations"][RESOLVED_AT] == "2026-01-05T10:04:00Z"
    assert job["spec"]["alert"]["status"] == "firing"  # the spec is immutable; metadata carries the news
    again = await env.post("/v1/alertmanager", json=webhook(resolved, status="resolved"), params={"namespace": ns})
    assert again.json()["jobs"][0]["result"] == "exists"

    # a resolved alert we never saw firing is created resolved (and analysed with that evidence)
    late = am_alert("ShortBlip", status="resolved", fingerprint="9999888877776666", ends="2026-01-05T10:01:00Z")
    resp = await env.post("/v1/alertmanager", json=webhook(late, status="resolved"), params={"namespace": ns})
    assert resp.status_code == 201 and resp.json()["jobs"][0]["result"] == "created"
    job = await env.job(resp.json()["jobs"][0]["name"], ns)
    assert job["spec"]["alert"]["status"] == "resolved"
    assert job["spec"]["alert"]["endsAt"].startswith("2026-01-05T10:01")
    assert job["metadata"]["labels"][ALERT_STATUS_LABEL] == "resolved"

    # the same alert firing again later is a new episode: a new job
    again = am_alert("DiskFull", fingerprint="aaaabbbbccccdddd", severity="critical", instance="db-1:9100",
                     device="sda", starts="2026-01-05T11:00:00Z")
    resp = await env.post("/v1/alertmanager", json=webhook(again), params={"namespace": ns})
    assert resp.status_code == 201 and resp.json()["jobs"][0]["name"] != names[0]


# --------------------------------------------------------------------------- auth, limits, Kubernetes trouble


async def test_unconfigured_ingest_refuses_everything(cluster: devenv.ControlPlane, tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path, ingest_token="", ingest_tokens_file="") as env:
        resp = await env.post("/v1/script-results", json=SCRIPT, token="anything-at-all")
        assert resp.status_code == 401
        assert "not configured" in resp.json()["error"] and "KUBETRIAGE_INGEST_TOKEN" in resp.json()["error"]
        assert (await env.http.get("/healthz")).json() == {"status": "ok", "configured": False}


async def test_rate_limit_answers_429_with_retry_after(cluster: devenv.ControlPlane, tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path, ingest_rate_per_second=0.01, ingest_burst=3) as env:
        codes = [(await env.post("/v1/script-results", json={**SCRIPT, "id": i})).status_code for i in range(5)]
        assert codes[:3] == [201, 201, 201] and codes[3:] == [429, 429]
        resp = await env.post("/v1/script-results", json={**SCRIPT, "id": 99})
        assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
        assert "rate limit" in resp.json()["error"]
        assert len(await env.jobs()) == 3
        # another token has its own bucket
        resp = await env.post("/v1/script-results", json={**SCRIPT, "id": 7}, token=env.team_token)
        assert resp.status_code == 201
        # guessing tokens is limited too, in its own bucket
        guesses = [(await env.post("/v1/script-results", json=SCRIPT, token=f"guess-{i}")).status_code
                   for i in range(5)]
        assert guesses == [401, 401, 401, 429, 429]


async def test_tokens_file_is_reloaded_when_the_secret_changes(cluster: devenv.ControlPlane, tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path) as env:
        new_token = "rotated-" + "x" * 24
        resp = await env.post("/v1/script-results", json=SCRIPT, token=new_token)
        assert resp.status_code == 401
        env.tokens_file.write_text(f"{new_token}: [{env.team_ns}, {env.ns2}]\n")
        resp = await env.post("/v1/script-results", json=SCRIPT, token=new_token, params={"namespace": env.ns2})
        assert resp.status_code == 201, resp.text
        assert (await env.post("/v1/script-results", json=SCRIPT, token=env.team_token)).status_code == 401
        env.tokens_file.write_text("not: [a, valid, file")  # a broken rotation keeps the last good tokens
        resp = await env.post("/v1/script-results", json={**SCRIPT, "id": 3}, token=new_token)
        assert resp.status_code == 201, resp.text


async def test_kubernetes_unreachable_is_503_with_retry_after(cluster: devenv.ControlPlane, tmp_path: Path) -> None:
    dead = Kube(kopf.ConnectionInfo(server=f"https://127.0.0.1:{devenv.free_port()}", insecure=True), timeout=5)
    async with IngestEnv(cluster, tmp_path, kube=dead) as env:
        resp = await env.post("/v1/alertmanager", json=webhook(am_alert()))
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"] == "5" and "safe to retry" in resp.json()["error"]
        assert resp.json()["jobs"][0]["result"] == "failed"
        assert await env.jobs() == []
        assert await env.healthy()


async def test_concurrent_resends_create_one_job(env: IngestEnv) -> None:
    alert = am_alert("Storm", fingerprint="5555666677778888")
    resps = await asyncio.gather(*(env.post("/v1/alertmanager", json=webhook(alert), params={"namespace": env.ns2})
                                   for _ in range(10)))
    results = sorted(r.json()["jobs"][0]["result"] for r in resps)
    assert results == ["created"] + ["exists"] * 9
    assert sum(j["metadata"]["name"].startswith("am-storm-") for j in await env.jobs(env.ns2)) == 1


# --------------------------------------------------------------------------- content types


async def test_each_route_takes_its_types_and_no_type_at_all(cluster: devenv.ControlPlane, tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path) as env:
        json_types = [None, "application/json", "application/json; charset=UTF-8", "application/vnd.runner+json"]
        for i, ctype in enumerate(json_types):
            headers = {"Content-Type": ctype} if ctype else {}
            resp = await env.post("/v1/script-results", content=json.dumps({**SCRIPT, "id": i}).encode(),
                                  headers=headers)
            assert resp.status_code == 201, (ctype, resp.text)
        report = b'<testsuite name="s"><testcase classname="c" name="t"><failure message="m"/></testcase></testsuite>'
        xml_types = [None, "application/xml", "text/xml; charset=utf-8", "application/junit+xml"]
        for i, ctype in enumerate(xml_types):  # None: what `kubetriage submit junit --url` sends
            headers = {"Content-Type": ctype} if ctype else {}
            resp = await env.post("/v1/junit", content=report, headers=headers, params={"run": f"ct-{i}"})
            assert resp.status_code == 201, (ctype, resp.text)
        resp = await env.post("/v1/junit", files={"file": ("r.xml", report, "application/xml")},
                              params={"run": "ct-multipart"})
        assert resp.status_code == 201, resp.text
        assert len(await env.jobs()) == len(json_types) + len(xml_types) + 1


# --------------------------------------------------------------------------- aiohttp's own refusals


async def test_an_over_long_header_is_one_warning_line(env: IngestEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "tok-" + "s" * 9000  # an over-long Authorization header: the token must not reach the log
    for headers in ({"X-Padding": "a" * 20000}, {"Authorization": f"Bearer {secret}"}):
        caplog.clear()
        resp = await env.post("/v1/script-results", json=SCRIPT, headers=headers)
        assert resp.status_code in (400, 431), resp.text  # aiohttp's answer, unchanged
        records = [r for r in caplog.records if r.name.startswith(("aiohttp", "kubetriage"))]
        assert [r for r in records if r.levelno >= logging.ERROR] == []
        (warning,) = [r for r in records if r.levelno == logging.WARNING]
        message = warning.getMessage()
        assert warning.exc_info is None and "\n" not in message, message
        assert f"refused with {resp.status_code}" in message and "8190 bytes" in message, message
        assert "aaaa" not in message and "ssss" not in message, message
    assert await env.healthy()


# --------------------------------------------------------------------------- job names: no row dropped


async def test_script_ids_differing_in_case_or_dashes_get_their_own_jobs(cluster: devenv.ControlPlane,
                                                                         tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path) as env:
        rows = [{**SCRIPT, "id": "AbC1"}, {**SCRIPT, "id": "abc1"},
                # "checkout" + "e2e-1" and "checkout-e2e" + "1" once both read sr-checkout-e2e-1
                {**SCRIPT, "id": "e2e-1"}, {**SCRIPT, "script_name": "checkout-e2e", "id": 1}]
        resp = await env.post("/v1/script-results", json=rows)
        assert resp.status_code == 201, resp.text
        assert [j["result"] for j in resp.json()["jobs"]] == ["created"] * 4
        ids = {j["metadata"]["name"]: j["spec"]["source"]["id"] for j in await env.jobs()}
        assert sorted(ids.values()) == ["1", "AbC1", "abc1", "e2e-1"]
        assert ids["sr-checkout-abc1"] == "abc1" and ids["sr-checkout-e2e-1"] == "1"  # plain ids read as before
        again = await env.post("/v1/script-results", json=rows)
        assert again.status_code == 200 and [j["result"] for j in again.json()["jobs"]] == ["exists"] * 4
        assert len(await env.jobs()) == 4


async def test_a_name_taken_by_another_input_is_a_409_naming_both(cluster: devenv.ControlPlane,
                                                                  tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path) as env:
        def existing(row_id: str, source_id: str, key: str | None) -> dict[str, Any]:
            """The job ingest would make for row_id, but made from another input (by hand, or by an older version)."""
            _, body = script_job(ScriptResultIn.model_validate({**SCRIPT, "id": row_id}))
            body = copy.deepcopy(body)
            body["spec"]["source"]["id"] = source_id
            body["metadata"]["annotations"].pop(INGEST_KEY, None)
            if key is not None:
                body["metadata"]["annotations"][INGEST_KEY] = key
            return body

        # an older kubetriage lowercased ids: row "AbC1" holds the name that row "abc1" has now (no ingest key)
        await env.kube.create(triagejob_path(env.ns), existing("abc1", "AbC1", None))
        # a job that carries the key of another input
        await env.kube.create(triagejob_path(env.ns), existing("k1", "k1", "0" * 64))
        # an older job for this very row: its re-send must stay a no-op
        await env.kube.create(triagejob_path(env.ns), existing("k2", "k2", None))
        resp = await env.post("/v1/script-results", json=[{**SCRIPT, "id": i} for i in ("abc1", "k1", "k2")])
        assert resp.status_code == 409, resp.text
        jobs = resp.json()["jobs"]
        assert [j["result"] for j in jobs] == ["failed", "failed", "exists"]
        assert "sr-checkout-abc1" in jobs[0]["detail"] and "id 'AbC1'" in jobs[0]["detail"]
        assert "id 'abc1'" in jobs[0]["detail"] and "collision" in resp.json()["error"]
        assert "field" not in resp.json()  # not a bad field of the request
        assert len(await env.jobs()) == 3  # nothing overwritten, nothing created


async def test_alerts_sharing_a_fingerprint_with_other_labels_all_land_in_jobs(cluster: devenv.ControlPlane,
                                                                              tmp_path: Path) -> None:
    async with IngestEnv(cluster, tmp_path) as env:
        one = am_alert("DiskFull", fingerprint="0123456789abcdef", instance="db-1")
        two = am_alert("DiskFull", fingerprint="0123456789abcdef", instance="db-2")
        resp = await env.post("/v1/alertmanager", json=webhook(one, two))
        assert resp.status_code == 201, resp.text
        assert [j["result"] for j in resp.json()["jobs"]] == ["created", "created"]
        jobs = {j["metadata"]["name"]: j for j in await env.jobs()}
        assert sorted(j["spec"]["alert"]["labels"]["instance"] for j in jobs.values()) == ["db-1", "db-2"]
        again = await env.post("/v1/alertmanager", json=webhook(one, two))
        assert again.status_code == 200 and [j["result"] for j in again.json()["jobs"]] == ["exists", "exists"]
        # resolving one marks its own job, not the other's
        done = {**two, "status": "resolved", "endsAt": "2026-01-05T10:09:00Z"}
        resp = await env.post("/v1/alertmanager", json=webhook(done, status="resolved"))
        assert resp.status_code == 200 and resp.json()["jobs"][0]["result"] == "resolved", resp.text
        status = {j["spec"]["alert"]["labels"]["instance"]: j["metadata"]["labels"][ALERT_STATUS_LABEL]
                  for j in await env.jobs()}
        assert status == {"db-1": "firing", "db-2": "resolved"} and len(jobs) == 2

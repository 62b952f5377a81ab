"""TriagePolicy actions end to end: the real operator, API server, workers, Redis and a real Alertmanager, and a
local receiver for the notifications (tests/receiver.py), all on loopback.

Verdicts come from TriageRules (a classification the team wrote), so they are known in advance without an LLM.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devharness import devenv
from kubetriage.api.models import API_VERSION
from kubetriage.infra.kube import triagepolicy_path
from tests.pipeline import Pipeline, alert_spec, audit_events, flush_audit_log
from tests.receiver import Receiver

pytestmark = pytest.mark.cluster

SECRET = "hmac-key-of-team-shop"


# --------------------------------------------------------------------------- helpers


def am_config(receiver: Receiver) -> str:
    """Every alert to the receiver, each alert its own group, repeated every 2 s (a silenced one is not)."""
    return f"""
route:
  receiver: r
  group_by: ['alertname', 'instance']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 2s
receivers:
- name: r
  webhook_configs:
  - url: {receiver.url('/am')}
    send_resolved: false
"""


@pytest.fixture
def am_receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
async def alertmanager(tmp_path: Path, am_receiver: Receiver) -> AsyncIterator[devenv.Alertmanager]:
    am = devenv.Alertmanager(tmp_path / "alertmanager", am_config(am_receiver))
    await asyncio.to_thread(am.start)
    try:
        yield am
    finally:
        await asyncio.to_thread(am.stop)


def secrets_dir(p: Pipeline, **keys: str) -> Path:
    """The Secret ``hooks`` as the chart would mount it into the operator: one file per key."""
    folder = p.root / "action-secrets"
    (folder / "hooks").mkdir(parents=True, exist_ok=True)
    for key, value in keys.items():
        (folder / "hooks" / key).write_text(value + "\n")
    return folder


def start(p: Pipeline, name: str = "operator", **settings: Any) -> devenv.Proc:
    folder = p.root / "action-secrets"
    folder.mkdir(exist_ok=True)
    return p.start_operator(name, actions_secrets_dir=str(folder),
                            actions_secret_namespaces=json.dumps({"hooks": [p.ns]}),
                            actions_retry_backoff_seconds=0.3, actions_timeout_seconds=10, **settings)


async def policy(p: Pipeline, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": API_VERSION, "kind": "TriagePolicy", "metadata": {"name": name}, "spec": spec}
    return await p.kube.create(triagepolicy_path(p.ns), body)


async def wait_policy(p: Pipeline, name: str) -> dict[str, Any]:
    async def judged() -> dict[str, Any] | None:
        found = await p.kube.get(triagepolicy_path(p.ns, name))
        st = found.get("status") or {}
        return found if st.get("observedGeneration") == found["metadata"]["generation"] else None

    return await p.wait(judged, f"TriagePolicy {name} judged by the operator", timeout=60)


async def fp_rule(p: Pipeline, name: str, match: dict[str, Any], classification: str = "false_positive") -> None:
    await p.rule(name, {"match": match, "action": {"classification": classification, "confidence": 0.95,
                                                   "reason": f"{classification} by the team's rule {name}"}})
    await p.wait_rule(name)


def am_alert(instance: str, severity: str = "warning", name: str = "DiskPressure") -> dict[str, Any]:
    return {"labels": {"alertname": name, "instance": instance, "severity": severity, "job": "node"},
            "annotations": {"summary": f"disk pressure on {instance}"}}


def job_spec(instance: str, severity: str = "warning", name: str = "DiskPressure", **spec: Any) -> dict[str, Any]:
    """The TriageJob ingest makes of that Alertmanager alert (its labels as they are)."""
    return alert_spec(name, severity=severity, labels=am_alert(instance, severity, name)["labels"],
                      spec=spec)


async def post_alerts(am: devenv.Alertmanager, alerts: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{am.url}/api/v2/alerts", json=alerts)
        assert resp.status_code == 200, resp.text


async def silences(am: devenv.Alertmanager) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{am.url}/api/v2/silences")).json()


async def silence(am: devenv.Alertmanager, sid: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{am.url}/api/v2/silence/{sid}")).json()


async def am_alert_state(am: devenv.Alertmanager, instance: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        found = (await client.get(f"{am.url}/api/v2/alerts")).json()
    return next(a["status"] for a in found if a["labels"].get("instance") == instance)


def notified(r: Receiver, instance: str) -> int:
    """Alertmanager notifications the receiver got that carry the alert of ``instance``."""
    return sum(1 for d in r.to("/am") for a in d.json()["alerts"] if a["labels"].get("instance") == instance)


def actions_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return (job.get("status") or {}).get("actions") or []


async def wait_action(p: Pipeline, name: str, action: str, result: str, timeout: float = 90) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = await p.get(name)
        found = [a for a in actions_of(job) if a["action"] == action and a["result"] == result]
        return found[-1] if found else None

    return await p.wait(check, f"{name}: {action} {result}", timeout=timeout)


async def kubetriage_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kubetriage", *args, env={**os.environ},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- silences


async def test_a_false_positive_alert_is_silenced_renewed_and_lifted_by_a_human(
        pipeline: Pipeline, alertmanager: devenv.Alertmanager, am_receiver: Receiver) -> None:
    p, am, r = pipeline, alertmanager, am_receiver
    await p.pool("default")
    start(p, dedup_window_seconds=0)  # the second job of the same alert is analysed, not folded into the first
    await fp_rule(p, "disk-pressure-is-noise", {"alertNames": ["DiskPressure"], "labels": {"severity": "warning"}})
    await policy(p, "silence-noise", {
        "mode": "enforce", "match": {"alertNames": ["DiskPressure"]},
        "silence": {"durationSeconds": 3600,
                    "alertmanager": {"url": am.url, "allowHTTP": True, "allowPrivateEndpoints": True}}})
    cond = (await wait_policy(p, "silence-noise"))["status"]["conditions"][0]
    assert (cond["type"], cond["status"]) == ("Accepted", "True"), cond

    # two alerts firing in Alertmanager, both reaching the receiver: db-1 is the noise, db-2 a marker
    await post_alerts(am, [am_alert("db-1"), am_alert("db-2")])
    await p.wait(lambda: notified(r, "db-1") and notified(r, "db-2"), "both alerts delivered before any silence")

    await p.job("disk-db-1", job_spec("db-1"))
    done = await wait_action(p, "disk-db-1", "silence", "Succeeded")
    job = await p.get("disk-db-1")
    assert job["status"]["verdict"]["classification"] == "false_positive"
    sid = done["silenceID"]
    assert done["key"] == f"{job['metadata']['uid']}:false_positive"

    # the silence, through Alertmanager's API v2: exact matchers, ours, bounded, naming the job
    [made] = [s for s in await silences(am) if s["id"] == sid]
    assert made["status"]["state"] in ("active", "pending")
    assert made["createdBy"] == "kubetriage"
    assert {(m["name"], m["value"], m["isRegex"], m.get("isEqual", True)) for m in made["matchers"]} == {
        ("alertname", "DiskPressure", False, True), ("severity", "warning", False, True),
        ("instance", "db-1", False, True), ("job", "node", False, True)}
    assert f"TriageJob {p.ns}/disk-db-1" in made["comment"] and "disk-pressure-is-noise" in made["comment"]
    assert made["endsAt"] > made["startsAt"]

    # the silenced alert no longer reaches the receiver; the marker, same alert name, other target, still does
    state = await p.wait(lambda: _suppressed(am, "db-1"), "db-1 suppressed in Alertmanager")
    assert state["silencedBy"] == [sid]
    marker = notified(r, "db-2")
    await p.wait(lambda: notified(r, "db-2") >= marker + 1, "one more delivery of the marker")
    before = notified(r, "db-1")
    marker = notified(r, "db-2")
    await p.wait(lambda: notified(r, "db-2") >= marker + 2, "two more deliveries of the marker")
    assert notified(r, "db-1") == before, "a silenced alert reached the receiver"
    assert (await am_alert_state(am, "db-2"))["state"] == "active"

    # the same alert again (a new episode, a new job), false_positive again: the one silence is renewed
    await p.job("disk-db-1-again", job_spec("db-1"))
    renewed = await wait_action(p, "disk-db-1-again", "silence", "Succeeded")
    assert renewed["silenceID"] == sid and renewed["message"].startswith("renewed silence")
    ours = [s for s in await silences(am) if s["createdBy"] == "kubetriage" and s["status"]["state"] != "expired"]
    assert [s["id"] for s in ours] == [sid]

    # a human says valid: the silence is lifted, recorded, and the alert reaches the receiver again
    code, _, err = await kubetriage_cli("verdict", "set", "disk-db-1-again", "valid", "--reason",
                                          "it was a real disk problem", "-n", p.ns)
    assert code == 0, err
    lifted = await wait_action(p, "disk-db-1-again", "unsilence", "Succeeded")
    assert lifted["silenceID"] == sid and "a human set the verdict to valid" in lifted["message"]
    assert (await silence(am, sid))["status"]["state"] == "expired"
    before = notified(r, "db-1")
    await p.wait(lambda: notified(r, "db-1") > before, "the lifted alert delivered again")
    events = [e["reason"] for e in await p.events_for("disk-db-1-again")]
    assert "ActionsTaken" in events


async def _suppressed(am: devenv.Alertmanager, instance: str) -> dict[str, Any] | None:
    state = await am_alert_state(am, instance)
    return state if state["state"] == "suppressed" else None


async def test_silences_end_on_a_severity_rise_and_a_users_delete_but_not_a_ttl_delete(
        pipeline: Pipeline, alertmanager: devenv.Alertmanager) -> None:
    p, am = pipeline, alertmanager
    # the Alertmanager this time from the pool's evidence configuration (the policy names none)
    await p.pool("default", evidence={"alertmanager": {"url": am.url, "allowHTTP": True,
                                                       "allowPrivateEndpoints": True}})
    start(p)
    await fp_rule(p, "warnings-are-noise", {"alertNames": ["DiskPressure"], "labels": {"severity": "warning"}})
    await policy(p, "silence-noise", {"mode": "enforce", "silence": {}})
    await wait_policy(p, "silence-noise")
    await p.job("deleted-by-ttl", job_spec("db-5", ttlSecondsAfterFinished=5))
    await p.job("rise-warning", job_spec("db-3"))
    await p.job("deleted-by-user", job_spec("db-4"))
    # (the TTL job first: it is deleted 5 s after its verdict, and the TTL waits for its actions' results)
    sids = {n: (await wait_action(p, n, "silence", "Succeeded"))["silenceID"]
            for n in ("deleted-by-ttl", "rise-warning", "deleted-by-user")}
    assert len(set(sids.values())) == 3
    # the default duration is 2 h
    made = {s["id"]: s for s in await silences(am)}
    for sid in sids.values():
        assert made[sid]["comment"].startswith("kubetriage: false positive")
        ends = dt.datetime.fromisoformat(made[sid]["endsAt"].replace("Z", "+00:00"))
        starts = dt.datetime.fromisoformat(made[sid]["startsAt"].replace("Z", "+00:00"))
        assert abs((ends - starts).total_seconds() - 7200) < 5

    # the same target fires at critical: the warning's silence ends
    await p.job("rise-critical", job_spec("db-3", "critical"))
    lifted = await wait_action(p, "rise-warning", "unsilence", "Succeeded")
    assert "severity rose to critical" in lifted["message"]
    assert (await silence(am, sids["rise-warning"]))["status"]["state"] == "expired"

    # the TTL deletes its job (after its actions were written): its silence stays
    async def gone(name: str) -> bool:
        return name not in {j["metadata"]["name"] for j in await p.jobs()}

    await p.wait(lambda: gone("deleted-by-ttl"), "the TTL to delete deleted-by-ttl")
    # a user deletes the other: its silence ends (an Event says so: the job is gone)
    await p.delete("deleted-by-user")

    async def lifted_event() -> list[dict[str, Any]]:
        return [e for e in await p.events_for("deleted-by-user") if e["reason"] == "SilenceLifted"]

    [event] = await p.wait(lifted_event, "SilenceLifted for the job the user deleted")
    assert sids["deleted-by-user"] in event["message"]
    assert (await silence(am, sids["deleted-by-user"]))["status"]["state"] == "expired"
    # the TTL deletion came first and was handled by then: that silence is still on
    assert (await silence(am, sids["deleted-by-ttl"]))["status"]["state"] == "active"
    assert not [e for e in await p.events_for("deleted-by-ttl") if e["reason"] == "SilenceLifted"]


# --------------------------------------------------------------------------- notifications


async def test_webhooks_are_signed_retried_and_sent_once_across_restarts(pipeline: Pipeline) -> None:
    p = pipeline
    with Receiver(SECRET) as r:
        secrets_dir(p, signing=SECRET, slack=r.url("/slack"))
        await p.pool("default")
        op = start(p)
        await fp_rule(p, "disk-noise", {"alertNames": ["DiskPressure"]})
        await fp_rule(p, "api-down-is-real", {"alertNames": ["ApiDown"]}, "valid")
        await policy(p, "tell-oncall", {
            "mode": "enforce", "classifications": ["false_positive", "valid"], "minConfidence": 0.5,
            "notify": [
                {"name": "oncall", "webhook": {"url": r.url("/hook"), "allowHTTP": True,
                                               "allowPrivateEndpoints": True,
                                               "signingSecretRef": {"name": "hooks", "key": "signing"}}},
                {"name": "chat", "classifications": ["valid"],
                 "slack": {"urlSecretRef": {"name": "hooks", "key": "slack"}, "allowHTTP": True,
                           "allowPrivateEndpoints": True}}]})
        cond = (await wait_policy(p, "tell-oncall"))["status"]["conditions"][0]
        assert cond["status"] == "True", cond

        # a 500 first: retried, and the second try carries the same key and a valid signature
        r.answers = [500]
        await p.job("noise-1", job_spec("db-1"))
        done = await wait_action(p, "noise-1", "webhook", "Succeeded")
        assert done["attempts"] == 2
        tries = r.to("/hook")
        assert [d.status for d in tries] == [500, 200]
        assert all(d.signed for d in tries) and len({d.key for d in tries}) == 1
        uid = (await p.get("noise-1"))["metadata"]["uid"]
        assert tries[0].key == f"{uid}:false_positive"
        body = tries[1].json()
        assert body["verdict"]["classification"] == "false_positive" and body["job"]["name"] == "noise-1"
        assert body["alert"]["labels"]["instance"] == "db-1" and body["policy"] == "tell-oncall"
        assert not r.to("/slack"), "slack is for valid verdicts only"

        # valid: the webhook and Slack's incoming-webhook format
        await p.job("real-1", alert_spec("ApiDown", severity="critical", labels={"instance": "api-1"}))
        await wait_action(p, "real-1", "slack", "Succeeded")
        [slack] = r.to("/slack")
        assert slack.json()["text"].startswith("*valid* (0.95) for alert ApiDown (critical)")
        assert slack.json()["blocks"][0]["type"] == "section"

        # a graceful restart while a delivery is in flight: it completes and is recorded, never sent again
        r.gate.clear()
        r.arrived.clear()
        await p.job("noise-2", job_spec("db-2"))
        await p.wait(lambda: r.arrived.is_set(), "the delivery of noise-2 waiting at the receiver")
        op.popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # the operator is stopping now, with the delivery in flight
        r.gate.set()
        await p.wait(lambda: not op.alive(), "the operator to stop", timeout=60)
        await wait_action(p, "noise-2", "webhook", "Succeeded")
        op = start(p, "operator-2")
        await p.job("noise-3", job_spec("db-3"))  # the new operator at work: it has seen noise-2 by then
        await wait_action(p, "noise-3", "webhook", "Succeeded")
        uid2 = (await p.get("noise-2"))["metadata"]["uid"]
        assert [d.key for d in r.to("/hook")].count(f"{uid2}:false_positive") == 1

        # a crash after the request was sent but before the result was written: sent again, same key
        r.gate.clear()
        r.arrived.clear()
        await p.job("noise-4", job_spec("db-4"))
        await p.wait(lambda: r.arrived.is_set(), "the delivery of noise-4 waiting at the receiver")
        os.killpg(op.popen.pid, signal.SIGKILL)
        await p.wait(lambda: not op.alive(), "the operator to die")
        r.gate.set()
        assert [a["result"] for a in actions_of(await p.get("noise-4"))] == ["Pending"]
        start(p, "operator-3")
        await wait_action(p, "noise-4", "webhook", "Succeeded")
        uid4 = (await p.get("noise-4"))["metadata"]["uid"]
        again = [d for d in r.to("/hook") if d.key == f"{uid4}:false_positive"]
        assert len(again) == 2 and all(d.signed for d in again)
        assert again[0].json() == again[1].json()


async def test_shadow_mode_sends_nothing_and_records_everything(
        pipeline: Pipeline, alertmanager: devenv.Alertmanager, am_receiver: Receiver) -> None:
    p, am = pipeline, alertmanager
    metrics_port = devenv.free_port()
    with Receiver(SECRET) as r:
        secrets_dir(p, signing=SECRET)
        await p.pool("default")
        start(p, metrics_port=metrics_port)
        await fp_rule(p, "disk-noise", {"alertNames": ["DiskPressure"]})
        await policy(p, "try-me", {  # no mode: shadow is the default
            "match": {"alertNames": ["DiskPressure"]},
            "silence": {"alertmanager": {"url": am.url, "allowHTTP": True, "allowPrivateEndpoints": True}},
            "notify": [{"name": "oncall", "webhook": {"url": r.url("/hook"), "allowHTTP": True,
                                                      "allowPrivateEndpoints": True,
                                                      "signingSecretRef": {"name": "hooks", "key": "signing"}}}]})
        # a policy naming a Secret its namespace may not use says so
        await policy(p, "borrowed-secret", {"match": {"alertNames": ["Elsewhere"]}, "notify": [{
            "name": "x", "webhook": {"url": "https://hooks.example/x",
                                     "signingSecretRef": {"name": "other-team", "key": "k"}}}]})
        assert (await wait_policy(p, "try-me"))["spec"]["mode"] == "shadow"
        cond = (await wait_policy(p, "borrowed-secret"))["status"]["conditions"][0]
        assert (cond["status"], cond["reason"]) == ("False", "SecretUnavailable"), cond

        names = ["shadow-1", "other-1", "other-2"]
        await p.job("shadow-1", job_spec("db-1"))
        await p.job("other-1", alert_spec("CpuHigh", labels={"instance": "db-9"}))
        await p.job("other-2", alert_spec("CpuHigh", labels={"instance": "db-8"}))
        jobs = await p.wait_terminal(names)
        assert jobs["shadow-1"]["status"]["verdict"]["classification"] == "false_positive"
        entries = {a["action"]: a for a in actions_of(jobs["shadow-1"])}
        assert {k: a["result"] for k, a in entries.items()} == {"silence": "Shadow", "webhook": "Shadow"}
        assert entries["silence"]["message"].startswith('would silence alertname="DiskPressure"')
        assert entries["webhook"]["message"].startswith("would notify false_positive")
        assert not actions_of(jobs["other-1"]) and not actions_of(jobs["other-2"])

        async def shadow_event() -> list[dict[str, Any]]:
            return [e for e in await p.events_for("shadow-1") if e["reason"] == "PolicyShadow"]

        [event] = await p.wait(shadow_event, "the PolicyShadow Event")
        assert "would silence" in event["message"] and "would notify" in event["message"]
        assert metric(metrics_port, "kubetriage_actions_total", mode="shadow", result="Shadow") == 2
        # nothing was sent: no silence in Alertmanager, no request at the receiver
        assert await silences(am) == []
        assert r.deliveries == []

        # and no status write more than without a policy: two per job after creation
        log = await flush_audit_log(p)
        writes = {n: 0 for n in names}
        for ev in audit_events(log):
            ref = ev.get("objectRef") or {}
            if (ref.get("namespace") == p.ns and ref.get("resource") == "triagejobs"
                    and ref.get("subresource") == "status" and ref.get("name") in writes):
                writes[ref["name"]] += 1
        assert max(writes.values()) <= 2, writes


async def test_an_enforced_action_costs_one_status_write_and_none_for_jobs_it_leaves_alone(
        pipeline: Pipeline) -> None:
    p = pipeline
    with Receiver(SECRET) as r:
        secrets_dir(p, signing=SECRET)
        await p.pool("default")
        start(p)
        await fp_rule(p, "disk-noise", {"alertNames": ["DiskPressure"]})
        await policy(p, "hook", {"mode": "enforce", "match": {"alertNames": ["DiskPressure"]},
                                 "notify": [{"name": "oncall", "webhook": {
                                     "url": r.url("/hook"), "allowHTTP": True, "allowPrivateEndpoints": True,
                                     "signingSecretRef": {"name": "hooks", "key": "signing"}}}]})
        await wait_policy(p, "hook")
        names = ["acted", *(f"left-{i}" for i in range(4))]
        await p.job("acted", job_spec("db-1"))
        for i in range(4):
            await p.job(f"left-{i}", alert_spec("CpuHigh", labels={"instance": f"db-{i}"}))
        await p.wait_terminal(names)
        await wait_action(p, "acted", "webhook", "Succeeded")
        assert len(r.to("/hook")) == 1
        log = await flush_audit_log(p)
        writes = {n: 0 for n in names}
        for ev in audit_events(log):
            ref = ev.get("objectRef") or {}
            if (ref.get("namespace") == p.ns and ref.get("resource") == "triagejobs"
                    and ref.get("subresource") == "status" and ref.get("name") in writes):
                writes[ref["name"]] += 1
        assert writes["acted"] <= 3, writes  # queued, verdict with the plan, the action's result
        assert max(writes[n] for n in names[1:]) <= 2, writes

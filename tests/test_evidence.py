"""Evidence gatherers: their summaries, and what they do with hostile input, against real HTTP servers.

The summaries are pure functions, fed series and API answers directly. Everything that talks HTTP runs
against real servers on loopback (``LocalHTTPServer``), playing a Prometheus or an Alertmanager that is
slow, huge, wrong or hostile, and recording every request: "never queried" is an assertion on what a
server saw. The scenarios with the real Prometheus and Alertmanager are in test_evidence_scenarios.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.evidence import AlertmanagerSummary, Evidence, PrometheusSummary
from kubetriage.api.models import MAX_EXPR, Alert, Source, verdict_from_classification
from kubetriage.api.urlpolicy import URLPolicy
from kubetriage.infra.config import Settings
from kubetriage.worker import evidence
from kubetriage.worker.evidence import alertmanager as am
from kubetriage.worker.evidence import prometheus as prom
from kubetriage.worker.evidence.base import Endpoint, EndpointClient, EvidenceRunner, job_fingerprint
from kubetriage.worker.runner import unavailable_note
from tests.localhttp import LocalHTTPServer, Route

RULE = 'http_errors{service="checkout"} > 0'
LOCAL = URLPolicy(allow_http=True, allow_private=True)
POOL = "ns/evidence-test"


def request(name: str = "CheckoutErrors", *, expr: str | None = None, generator: str | None = None,
            namespace: str = "shop", labels: dict[str, str] | None = None,
            starts: dt.datetime | None = None) -> AnalysisRequest:
    alert = Alert(name=name, labels=labels if labels is not None else {"service": "checkout", "namespace": "shop"},
                  expr=expr, generator_url=generator,
                  starts_at=starts or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2))
    return AnalysisRequest(uid="u1", name="j1", namespace=namespace, source=Source(type="alert"), alert=alert)


def generator_url(host: str, expr: str) -> str:
    return f"{host}/graph?{urllib.parse.urlencode({'g0.expr': expr, 'g0.tab': '1'})}"


def ok(data: Any) -> Route:
    return Route(json.dumps({"status": "success", "data": data}).encode(), headers={"Content-Type": "application/json"})


def rules(*pairs: tuple[str, str]) -> Route:
    return ok({"groups": [{"name": "g", "rules": [{"type": "alerting", "name": n, "query": q} for n, q in pairs]}]})


def vector(*values: float, at: float = 0) -> Route:
    return ok({"resultType": "vector", "result": [
        {"metric": {"i": str(i)}, "value": [at, str(v)]} for i, v in enumerate(values)]})


def matrix(series: list[list[tuple[float, float]]]) -> Route:
    return ok({"resultType": "matrix", "result": [
        {"metric": {"i": str(i)}, "values": [[t, str(v)] for t, v in s]} for i, s in enumerate(series)]})


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as s:
        yield s


def prometheus(server: LocalHTTPServer, *, timeout: float = 2, any_expression: bool = False,
               policy: URLPolicy = LOCAL, **auth: str) -> prom.PrometheusGatherer:
    ep = Endpoint("Prometheus", "spec.evidence.prometheus", server.url(""), policy, **auth)
    return prom.PrometheusGatherer(EndpointClient(ep, timeout), any_expression=any_expression)


def runner(*gatherers: Any, budget: float = 5, cache: float = 30) -> EvidenceRunner:
    return EvidenceRunner(list(gatherers), budget=budget, cache_seconds=cache, pool=POOL)


def queries(server: LocalHTTPServer) -> list[str]:
    return [p for p in server.paths() if p.startswith("/api/v1/query")]


def counted(source: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("kubetriage_evidence_total",
                                     {"pool": POOL, "source": source, "outcome": outcome}) or 0


# --------------------------------------------------------------------------- Prometheus summary (pure)


def test_a_blip_that_recovered_is_summarised_with_its_recovery() -> None:
    start, step = 1000.0, 4
    end = start + 499 * step
    # true for 30 s (steps 400..407), false since
    blip = [(start + i * step, 3.0) for i in range(400, 408)]
    s = prom.summarise([], [blip], start, end, step)
    assert s.firing_now is False
    assert s.recovered_after_s == 32.0  # from the first true step to the first false one
    assert s.since_change_s == end - (start + 408 * step)
    assert s.true_share == round(8 / 500, 4) and s.series == 1 and (s.min, s.max, s.last) == (3, 3, 3)
    assert "recovered on its own after 32s" in s.summary() and s.headline() == "recovered"


def test_a_sustained_condition_is_firing_for_the_whole_window() -> None:
    start, step = 0.0, 2
    end = start + 100 * step
    series = [[(start + i * step, 5.0 + i % 2) for i in range(101)], [(start + i * step, 1.0) for i in range(50, 101)]]
    s = prom.summarise([[(end, 6.0)], [(end, 1.0)]], series, start, end, step)
    assert s.firing_now is True and s.true_share == 1 and s.series == 2
    assert s.since_change_s == end - start  # nothing changed in the window: a lower bound
    assert s.recovered_after_s is None and (s.min, s.max, s.last) == (1, 6, 6)


def test_never_true_in_the_window_and_not_now() -> None:
    s = prom.summarise([], [], 0, 100, 1)
    assert s.firing_now is False and s.true_share == 0 and s.recovered_after_s is None and s.series == 0
    assert s.last is None and s.min is None


def test_the_window_is_bounded_and_has_at_most_500_points() -> None:
    now = 1_800_000_000.0
    started_long_ago = dt.datetime.fromtimestamp(now - 30 * 86400, dt.UTC)
    start, end, step = prom.window(started_long_ago, now)
    assert end - start == prom.MAX_WINDOW and (end - start) // step + 1 <= prom.MAX_POINTS
    start, end, step = prom.window(dt.datetime.fromtimestamp(now - 60, dt.UTC), now)
    assert end - start == 60 + prom.LOOKBACK and (end - start) // step + 1 <= prom.MAX_POINTS
    future = dt.datetime.fromtimestamp(now + 3600, dt.UTC)  # a clock-skewed or forged startsAt
    assert prom.window(future, now)[0] == now - prom.LOOKBACK


def test_the_expression_comes_from_spec_then_generator_url_whatever_its_host() -> None:
    assert prom.expression_of(request(generator=generator_url("http://evil.example:1", RULE))) == RULE
    assert prom.expression_of(request(expr="up == 0", generator=generator_url("http://x", RULE))) == "up == 0"
    assert prom.expression_of(request(generator="http://prometheus:9090/graph")) is None


# --------------------------------------------------------------------------- Alertmanager summary (pure)


def _am_alert(name: str, fp: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, **labels}, "fingerprint": fp, "status": {"state": "active"}}


def _silence(sid: str, author: str, comment: str, *matchers: dict[str, Any], state: str = "active") -> dict[str, Any]:
    return {"id": sid, "createdBy": author, "comment": comment, "status": {"state": state},
            "matchers": list(matchers)}


def m(name: str, value: str, regex: bool = False, equal: bool = True) -> dict[str, Any]:
    return {"name": name, "value": value, "isRegex": regex, "isEqual": equal}


def test_co_firing_is_the_group_and_the_namespace_not_the_whole_cluster() -> None:
    mine = {"alertname": "ApiDown", "namespace": "shop", "service": "api", "cluster": "prod"}
    groups = [
        {"labels": {"alertname": "ApiDown"}, "alerts": [
            _am_alert("ApiDown", "a", **{k: v for k, v in mine.items() if k != "alertname"}),
            _am_alert("ApiDown", "b", namespace="other", service="api2", cluster="prod", severity="critical")]},
        {"labels": {"alertname": "CartErrors"}, "alerts": [
            _am_alert("CartErrors", "c", namespace="shop", service="cart", cluster="prod", severity="warning"),
            _am_alert("CartErrors", "d", namespace="shop", service="cart", cluster="dev"),  # another cluster
            _am_alert("DiskFull", "e", namespace="infra", service="node", cluster="prod")]},  # only the cluster
    ]
    s = am.summarise(mine, groups, [])
    assert s.co_firing == 2 and s.co_firing_alerts == ["ApiDown", "CartErrors"]
    assert s.co_firing_services == 2 and s.co_firing_severities == {"critical": 1, "warning": 1}
    # without a namespace, the cluster is the scope
    s = am.summarise({"alertname": "NodeDown", "cluster": "prod"}, groups, [])
    assert s.co_firing == 4 and "DiskFull" in s.co_firing_alerts


def test_silences_that_cover_the_alert_and_who_made_them() -> None:
    mine = {"alertname": "ApiDown", "namespace": "shop", "service": "api"}
    silences = [
        _silence("1", "alice@example.com", "failover drill OPS-1", m("service", "api|web", regex=True)),
        _silence("2", "kubetriage", "auto-silenced noise", m("alertname", "ApiDown")),
        _silence("3", "bob", "other service", m("service", "cart")),
        _silence("4", "carol", "expired", m("alertname", "ApiDown"), state="expired"),
        _silence("5", "dave", "not this team", m("namespace", "shop", equal=False)),
        _silence("6", "erin", "missing label is empty", m("team", "")),
        _silence("7", "mallory", "broken regex matches nothing", m("service", "(", regex=True)),
        _silence("8", "frank", "no matchers at all"),
    ]
    s = am.summarise(mine, [], silences)
    assert [(x.created_by, x.by_kubetriage) for x in s.silences] == [
        ("alice@example.com", False), ("erin", False), ("kubetriage", True)]
    assert [x.created_by for x in s.human_silences()] == ["alice@example.com", "erin"]
    assert "silenced by alice@example.com: failover drill OPS-1" in s.summary()


def test_alertmanager_s_own_silenced_by_counts_too() -> None:
    mine = {"alertname": "ApiDown", "service": "api"}
    alert = _am_alert("ApiDown", "a", service="api")
    alert["status"] = {"state": "suppressed", "silencedBy": ["9"]}
    # matchers written in a way this process would judge differently: Alertmanager's word wins
    silence = _silence("9", "alice", "maintenance", m("service", "API"))
    assert [x.created_by for x in am.summarise(mine, [{"alerts": [alert]}], [silence]).silences] == ["alice"]


# --------------------------------------------------------------------------- hostile input, real HTTP


async def test_the_configured_prometheus_is_queried_never_the_generator_url_host(server: LocalHTTPServer) -> None:
    with LocalHTTPServer() as decoy:
        decoy.route("/api/v1/rules", rules(("CheckoutErrors", RULE)))
        server.route("/api/v1/rules", rules(("CheckoutErrors", RULE)))
        server.route("/api/v1/query", vector(4.0)).route("/api/v1/query_range", matrix([[(1.0, 4.0)]]))
        found = await runner(prometheus(server)).gather(request(generator=generator_url(decoy.url(""), RULE)))
        assert decoy.paths() == []
    (e,) = found
    assert e.error is None and PrometheusSummary.model_validate(e.value).firing_now is True
    sent = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query) for p in queries(server)]
    assert len(sent) == 2 and all(q["query"] == [RULE] for q in sent)
    assert {q["timeout"][0] for q in sent} == {"2s"}  # Prometheus stops evaluating when we stop waiting
    (rng,) = [q for q in sent if "step" in q]
    points = (float(rng["end"][0]) - float(rng["start"][0])) / float(rng["step"][0].rstrip("s")) + 1
    assert points <= prom.MAX_POINTS


async def test_an_expression_that_is_not_the_rules_is_never_queried(server: LocalHTTPServer) -> None:
    server.route("/api/v1/rules", rules(("CheckoutErrors", RULE)))
    hostile = 'count({__name__=~".+"}) or vector(1)'
    (e,) = await runner(prometheus(server)).gather(request(expr=hostile))
    assert e.error and "not the one of the alerting rule 'CheckoutErrors'" in e.error and "anyExpression" in e.error
    (e,) = await runner(prometheus(server)).gather(request("NoSuchRule", expr=RULE))
    assert e.error and "no alerting rule named 'NoSuchRule'" in e.error
    assert queries(server) == []
    # the pool may allow any expression; then it runs (whitespace differences never matter for the rule check)
    server.route("/api/v1/query", vector()).route("/api/v1/query_range", matrix([]))
    (e,) = await runner(prometheus(server, any_expression=True)).gather(request(expr=hostile))
    assert e.error is None and len(queries(server)) == 2


async def test_a_job_without_an_expression_gets_its_rules(server: LocalHTTPServer) -> None:
    server.route("/api/v1/rules", rules(("CheckoutErrors", RULE), ("Twice", "a > 1"), ("Twice", "b > 1")))
    server.route("/api/v1/query", vector()).route("/api/v1/query_range", matrix([]))
    (e,) = await runner(prometheus(server)).gather(request())
    assert e.error is None and all(urllib.parse.parse_qs(p.split("?", 1)[1])["query"] == [RULE]
                                   for p in queries(server))
    (e,) = await runner(prometheus(server)).gather(request("Twice"))
    assert e.error and "2 alerting rules are named 'Twice'" in e.error
    assert await runner(prometheus(server)).gather(request("NotAPrometheusAlert")) == []  # nothing to ask


async def test_an_over_long_or_control_character_expression_is_refused_before_any_request(
        server: LocalHTTPServer) -> None:
    long = RULE + " or " + " or ".join(["up"] * (MAX_EXPR // 4))
    (e,) = await runner(prometheus(server, any_expression=True)).gather(request(
        generator=generator_url("http://prometheus:9090", long)))
    assert e.error and f"over the {MAX_EXPR}-character limit" in e.error
    (e,) = await runner(prometheus(server, any_expression=True)).gather(request(
        generator=generator_url("http://prometheus:9090", "up\x00== 0")))
    assert e.error and "control characters" in e.error
    assert server.paths() == []


@pytest.mark.parametrize("route, message", [
    (Route(b"[" + b"1," * (6 << 20) + b"1]", chunked=True), "exceeds the 4194304-byte cap"),  # no length given
    (Route(b"x" * (5 << 20)), "is 5242880 bytes, over the 4194304-byte cap; not read"),
])
async def test_a_huge_answer_is_not_read(server: LocalHTTPServer, route: Route, message: str) -> None:
    server.route("/api/v1/rules", route)
    before = counted("prometheus", "too_large")
    (e,) = await runner(prometheus(server)).gather(request(expr=RULE))
    assert e.error and message in e.error
    assert counted("prometheus", "too_large") == before + 1


async def test_too_many_series_are_not_summarised(server: LocalHTTPServer) -> None:
    server.route("/api/v1/query", vector(*([1.0] * (prom.MAX_SERIES + 1))))
    server.route("/api/v1/query_range", matrix([]))
    (e,) = await runner(prometheus(server, any_expression=True)).gather(request(expr=RULE))
    assert e.error and f"over the {prom.MAX_SERIES}-series limit" in e.error


async def test_a_slow_prometheus_is_bounded_by_the_timeout_and_a_stuck_one_by_the_budget(
        server: LocalHTTPServer) -> None:
    server.route("/api/v1/rules", Route(b"{}", delay=30))
    before = counted("prometheus", "timeout")
    (e,) = await runner(prometheus(server, timeout=0.3)).gather(request(expr=RULE))
    assert e.error == "Prometheus did not answer within 0.3s"
    assert counted("prometheus", "timeout") == before + 1
    # a gatherer that takes longer than the budget (here: a long per-request timeout) is given up on
    before = counted("prometheus", "budget")
    (e,) = await runner(prometheus(server, timeout=30), budget=0.3).gather(request(expr=RULE))
    assert e.error == "no answer within the 0.3s evidence budget"
    assert counted("prometheus", "budget") == before + 1
    # and the budget never takes more than half of a job's analysis deadline
    short = request(expr=RULE).model_copy(update={"deadline_seconds": 0.4})
    (e,) = await runner(prometheus(server, timeout=30), budget=10).gather(short)
    assert e.error == "no answer within the 0.2s evidence budget"


@pytest.mark.parametrize("url, policy, message", [
    ("http://127.0.0.1:{port}", URLPolicy(allow_http=True), "a loopback address; refused"),
    ("http://127.0.0.1:{port}", URLPolicy(allow_private=True), "plain http is not allowed"),
    ("http://169.254.169.254:{port}", LOCAL, "cloud metadata endpoint"),
    ("http://localhost:{port}", URLPolicy(allow_http=True), "loopback name"),
])
async def test_the_outbound_url_policy_holds_before_anything_is_sent(
        server: LocalHTTPServer, url: str, policy: URLPolicy, message: str) -> None:
    ep = Endpoint("Prometheus", "spec.evidence.prometheus", url.format(port=server.port), policy)
    gatherer = prom.PrometheusGatherer(EndpointClient(ep, 1))
    (e,) = await runner(gatherer).gather(request(expr=RULE))
    assert e.error and "refused by the outbound-URL policy, nothing sent" in e.error and message in e.error
    assert server.paths() == []


async def test_credentials_are_sent_and_a_refusal_says_which_secret_to_check(server: LocalHTTPServer) -> None:
    server.route("/api/v1/rules", Route(b'{"status":"error","error":"unauthorized"}', status=401))
    (e,) = await runner(prometheus(server, bearer_token="t0ken")).gather(request(expr=RULE))
    assert e.error and "answered 401" in e.error and "bearerTokenSecretRef or basicAuth" in e.error
    assert server.seen[-1].headers["authorization"] == "Bearer t0ken"
    await runner(prometheus(server, username="u", password="p")).gather(request(expr=RULE))
    assert server.seen[-1].headers["authorization"] == "Basic dTpw"


async def test_redirects_and_non_json_are_errors_not_followed(server: LocalHTTPServer) -> None:
    with LocalHTTPServer() as elsewhere:
        server.route("/api/v1/rules", Route(b"", status=302, headers={"Location": elsewhere.url("/api/v1/rules")}))
        (e,) = await runner(prometheus(server)).gather(request(expr=RULE))
        assert e.error and "redirects are not followed" in e.error and elsewhere.paths() == []
    server.route("/api/v1/rules", Route(b"<html>login</html>"))
    (e,) = await runner(prometheus(server)).gather(request(expr=RULE))
    assert e.error == "Prometheus answered something that is not JSON"


async def test_evidence_is_cached_per_namespace_source_type_and_fingerprint(server: LocalHTTPServer) -> None:
    server.route("/api/v1/rules", rules(("CheckoutErrors", RULE)))
    server.route("/api/v1/query", vector(1.0)).route("/api/v1/query_range", matrix([[(1.0, 1.0)]]))
    r = runner(prometheus(server))
    first = await r.gather(request(expr=RULE))
    again = await asyncio.gather(*(r.gather(request(expr=RULE)) for _ in range(5)))
    assert all(found == first for found in again) and len(queries(server)) == 2  # asked once
    await r.gather(request(expr=RULE, namespace="other-team"))  # another namespace never shares an answer
    await r.gather(request(expr=RULE, labels={"service": "cart"}))  # another alert neither
    assert len(queries(server)) == 6
    # a caller-chosen source.fingerprint does not make two alerts share evidence
    a, b = request(expr=RULE), request(expr=RULE, labels={"service": "payments"})
    a.source.fingerprint = b.source.fingerprint = "same"
    assert job_fingerprint(a) != job_fingerprint(b)
    # failures are not cached: the next job asks again
    server.route("/api/v1/rules", Route(b"down", status=503))
    r2 = runner(prometheus(server))
    for _ in range(2):
        (e,) = await r2.gather(request(expr="x > 1"))
        assert e.error == "Prometheus answered 503"
    assert server.paths().count("/api/v1/rules?type=alert") >= 3
    # and with no time to live, nothing is kept
    server.route("/api/v1/rules", rules(("CheckoutErrors", RULE)))
    r3 = runner(prometheus(server), cache=0)
    n = len(queries(server))
    await r3.gather(request(expr=RULE))
    await r3.gather(request(expr=RULE))
    assert len(queries(server)) == n + 4


async def test_alertmanager_gatherer_reads_groups_and_silences(server: LocalHTTPServer) -> None:
    server.route("/api/v2/alerts/groups", Route(json.dumps([{"labels": {}, "alerts": [
        _am_alert("CheckoutErrors", "a", service="checkout", namespace="shop"),
        _am_alert("CartErrors", "b", service="cart", namespace="shop")]}]).encode()))
    server.route("/api/v2/silences", Route(json.dumps([
        _silence("1", "alice", "planned", m("service", "checkout"))]).encode()))
    ep = Endpoint("Alertmanager", "spec.evidence.alertmanager", server.url(""), LOCAL)
    (e,) = await runner(am.AlertmanagerGatherer(EndpointClient(ep, 2))).gather(request())
    s = AlertmanagerSummary.model_validate(e.value)
    assert s.co_firing == 1 and s.co_firing_alerts == ["CartErrors"] and s.silences[0].created_by == "alice"
    # a script result has nothing to ask Alertmanager
    script = AnalysisRequest.model_validate({"uid": "u", "name": "n", "namespace": "shop",
                                             "source": {"type": "scriptResult"},
                                             "script_result": {"script_name": "e2e", "success": False}})
    n = len(server.paths())
    assert await runner(am.AlertmanagerGatherer(EndpointClient(ep, 2))).gather(script) == []
    assert len(server.paths()) == n


def test_the_pool_settings_make_the_gatherers_and_a_bad_ca_does_not_stop_the_worker() -> None:
    s = Settings(pool="ns/p", evidence_prometheus_url="https://prometheus.example", evidence_prometheus_ca="junk",
                 evidence_alertmanager_url="http://alertmanager:9093", evidence_alertmanager_allow_http=True)
    r = evidence.from_settings(s)
    assert [g.source for g in r.gatherers] == ["prometheus", "alertmanager"]
    bad = r.gatherers[0]
    assert isinstance(bad, evidence.Misconfigured) and "CA bundle is not PEM" in bad.reason
    assert evidence.from_settings(Settings(pool="ns/p")).gatherers == []


def test_a_verdict_says_which_evidence_it_did_without() -> None:
    v = verdict_from_classification("valid", "3 services failing together", 0.8, "rules")
    noted = unavailable_note(v, [Evidence(source="prometheus", error="Prometheus did not answer within 2s"),
                                 Evidence(source="alertmanager", value={"co_firing": 3})])
    assert noted.reason == ("3 services failing together [evidence unavailable: prometheus: Prometheus did not "
                            "answer within 2s]")
    assert noted.confidence == v.confidence and noted.classification == v.classification
    assert unavailable_note(v, [Evidence(source="history", value={})]) is v


def test_the_pool_spec_reaches_the_worker_as_environment_with_secrets_by_reference() -> None:
    from kubetriage.api.models import PoolEvidence
    from kubetriage.controller.pools import evidence_env

    spec = PoolEvidence.model_validate({
        "prometheus": {"url": "http://prometheus:9090", "allowHTTP": True, "allowPrivateEndpoints": True,
                       "anyExpression": True, "bearerTokenSecretRef": {"name": "prom", "key": "token"}},
        "alertmanager": {"url": "https://am:9093", "basicAuth": {"username": {"name": "am", "key": "u"},
                                                                  "password": {"name": "am", "key": "p"}},
                         "tls": {"caConfigMapRef": {"name": "ca", "key": "ca.crt"}}},
        "timeoutSeconds": 3})
    env = {e["name"]: e for e in evidence_env(spec)}
    unknown = {n for n in env if n.removeprefix("KUBETRIAGE_").lower() not in Settings.model_fields}
    assert not unknown, unknown
    assert env["KUBETRIAGE_EVIDENCE_PROMETHEUS_BEARER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "prom", "key": "token", "optional": True}}
    assert env["KUBETRIAGE_EVIDENCE_ALERTMANAGER_CA"]["valueFrom"]["configMapKeyRef"]["name"] == "ca"
    assert all("value" not in env[n] for n in env if n.endswith(("TOKEN", "USERNAME", "PASSWORD", "_CA")))
    # what the pod would get once the kubelet resolved the references
    plain = {n: e.get("value", f"from-{n.lower()}") for n, e in env.items() if not n.endswith("_CA")}
    s = Settings.from_env({**plain, "KUBETRIAGE_POOL": "ns/p"})
    assert (s.evidence_timeout_seconds, s.evidence_prometheus_any_expression) == (3, True)
    r = evidence.from_settings(s)
    prom_ep = r.gatherers[0].client.endpoint  # type: ignore[attr-defined]
    assert prom_ep.policy == URLPolicy(allow_http=True, allow_private=True) and prom_ep.bearer_token
    am_ep = r.gatherers[1].client.endpoint  # type: ignore[attr-defined]
    assert am_ep.policy == URLPolicy() and am_ep.username and am_ep.password
    assert evidence_env(None) == []

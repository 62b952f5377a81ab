"""A pool's LLM base URL under the outbound-URL policy, on the real API server with the real operator and workers:
the pool says what is wrong and which opt-in would allow it, and the workers never send the API key there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubetriage.infra.kube import triagepool_path
from tests.fakellm import FakeLLM, verdict_content
from tests.pipeline import Pipeline, script_spec

pytestmark = pytest.mark.cluster

KEY = "sk-or-v1-THE-POOL-KEY-MUST-NOT-LEAK-0123456789"


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(default=verdict_content("valid", "the product is broken", 0.92)).start()
    try:
        yield fake
    finally:
        fake.stop()


def conditions(pool: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (pool.get("status") or {}).get("conditions") or []}


async def wait_condition(p: Pipeline, name: str, type_: str, status: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        got = conditions(await p.kube.get(triagepool_path(p.ns, name))).get(type_)
        return got if got and got["status"] == status else None

    return await p.wait(found, f"pool {name}: {type_}={status}")


async def test_pool_conditions_name_the_problem_and_the_opt_in(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    p.start_operator()
    # no workers for the pools that point outside this machine: nothing could ever connect there
    none = {"min": 0, "max": 0}
    await p.pool("metadata", analyzer={"baseURL": "http://169.254.169.254/latest", "allowHTTP": True,
                                       "allowPrivateEndpoints": True, "model": "m"}, replicas=none)
    await p.pool("loopback", analyzer={"baseURL": llm.url, "allowHTTP": True, "model": "m"})
    await p.pool("plain", analyzer={"baseURL": "http://models.example.com/v1", "model": "m"}, replicas=none)
    await p.pool("inside", analyzer={"baseURL": llm.url, "allowHTTP": True, "allowPrivateEndpoints": True,
                                     "model": "m", "redactPatterns": [r"customer-id=(\d+)", "(unclosed"]})
    metadata = await wait_condition(p, "metadata", "LLMEndpointAllowed", "False")
    assert metadata["reason"] == "BaseURLRefused" and "cloud metadata endpoint" in metadata["message"]
    assert "allowPrivateEndpoints" not in metadata["message"]  # no opt-in allows it
    loopback = await wait_condition(p, "loopback", "LLMEndpointAllowed", "False")
    assert "loopback" in loopback["message"] and "spec.analyzer.allowPrivateEndpoints: true" in loopback["message"]
    plain = await wait_condition(p, "plain", "LLMEndpointAllowed", "False")
    assert "plain http" in plain["message"] and "spec.analyzer.allowHTTP: true" in plain["message"]
    inside = await wait_condition(p, "inside", "LLMEndpointAllowed", "True")
    assert inside["reason"] == "Allowed"
    bad = await wait_condition(p, "inside", "RedactionPatternsValid", "False")
    assert "redactPatterns[1] does not compile" in bad["message"]
    # the Ready condition of the same writes is kept next to these
    assert "Ready" in conditions(await p.kube.get(triagepool_path(p.ns, "inside")))

    # fixed by the opt-in: the condition follows the spec
    await p.patch_pool("loopback", {"analyzer": {"allowPrivateEndpoints": True}})
    await wait_condition(p, "loopback", "LLMEndpointAllowed", "True")
    deployment = await p.kube.get(f"/apis/apps/v1/namespaces/{p.ns}/deployments/kubetriage-worker-inside")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETRIAGE_LLM_ALLOW_PRIVATE_ENDPOINTS"] == "true" and env["KUBETRIAGE_LLM_ALLOW_HTTP"] == "true"
    assert env["KUBETRIAGE_REDACT_PATTERNS"] == '["customer-id=(\\\\d+)", "(unclosed"]'


async def test_workers_never_send_the_key_to_a_refused_endpoint(pipeline: Pipeline, llm: FakeLLM) -> None:
    """Two pools on the same fake (127.0.0.1): without the private opt-in every attempt is refused before
    connecting, and the job still gets the offline verdict saying why the LLM was not asked; with it, the LLM
    answers, and receives the key."""
    p = pipeline
    p.cluster.kubectl("create", "secret", "generic", "llm", "-n", p.ns, f"--from-literal=api-key={KEY}")
    analyzer = {"baseURL": llm.url, "allowHTTP": True, "model": "fake/triage-text", "timeoutSeconds": 5,
                "apiKeySecretRef": {"name": "llm", "key": "api-key"}}
    await p.pool("closed", analyzer=analyzer, replicas={"min": 1, "max": 1})
    await p.pool("open", analyzer={**analyzer, "allowPrivateEndpoints": True}, replicas={"min": 1, "max": 1})
    p.start_operator()
    await p.job("refused", script_spec("checkout", "AssertionError: total was 0",
                                       spec={"pool": "closed", "analysis": {"maxAttempts": 2}}))
    # another script: the same one would make one of the two jobs a duplicate of the other
    await p.job("allowed", script_spec("search", "AssertionError: no results", spec={"pool": "open"}))
    jobs = await p.wait_terminal(["refused", "allowed"], timeout=120)
    refused = jobs["refused"]["status"]["verdict"]
    assert refused["analyzer"] != "llm" and "LLM unavailable after 2 attempt(s)" in refused["reason"]
    assert "loopback" in refused["reason"] and "allowPrivateEndpoints" in refused["reason"]
    assert jobs["allowed"]["status"]["verdict"]["analyzer"] == "llm"
    assert llm.received and all(r.headers["authorization"] == f"Bearer {KEY}" for r in llm.received)
    # every request the fake saw came from the open pool's job
    assert all(b"allowed" in r.body and b"refused" not in r.body for r in llm.received)

"""Secrets in a job's text never reach a sink: the prompt the LLM receives, the status, the Event, the audit table
row, nor Redis; and redaction does not change the fingerprint. The real operator, workers, API server and Redis,
with the fake LLM (whose answer quotes a secret, as a model that read a screenshot might)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from kubetriage.api import fingerprint
from tests.fakellm import FakeLLM, verdict_content
from tests.pipeline import Pipeline, alert_spec, script_spec

pytestmark = pytest.mark.cluster

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM_BODY = "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi"
SECRETS = {
    "jwt": JWT,
    "password": "hunter2-Pa55",
    "url": "S3cr3t-dbpass",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "pem": PEM_BODY,
    "email": "alice.oncall@example.com",
    "pool-pattern": "48151623",
    "from-the-model": "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",
    "human": "xoxb-2222222222-3333333333333-abcdefghijklmnop",
}
ERROR = (f"LoginError: POST https://api.example.com/login failed for customer-id={SECRETS['pool-pattern']} "
         f"with password={SECRETS['password']}; page showed {SECRETS['email']}")
LOGS = (f"connecting to postgres://app:{SECRETS['url']}@db.internal:5432/shop\n"
        f"Authorization: Bearer {JWT}\nAWS_ACCESS_KEY_ID={SECRETS['aws']}\n"
        f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----\nstep 3 failed")


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    reply = verdict_content("valid", f"the screenshot shows the token {SECRETS['from-the-model']} on the page", 0.95,
                            title=f"leaked {SECRETS['from-the-model']}")
    fake = FakeLLM(default=reply).start()
    try:
        yield fake
    finally:
        fake.stop()


def leaks(what: Any) -> list[str]:
    text = what if isinstance(what, str) else json.dumps(what)
    return [name for name, secret in SECRETS.items() if secret in text]


async def test_no_secret_reaches_the_prompt_status_event_database_or_redis(pipeline: Pipeline, llm: FakeLLM) -> None:
    p = pipeline
    await p.pool("default", analyzer={"baseURL": llm.url, "allowHTTP": True, "allowPrivateEndpoints": True,
                                      "model": "fake/triage-text", "timeoutSeconds": 5,
                                      "redactPatterns": [r"customer-id=(\d+)"]})
    p.start_operator()
    spec = script_spec("login-e2e", ERROR, logsExcerpt=LOGS, spec={"analysis": {"analyzer": "llm"}})
    alert = alert_spec("DBAuthFailing", severity="critical", labels={"dsn": f"postgres://app:{SECRETS['url']}@db"},
                       annotations={"description": f"owner {SECRETS['email']}, token={SECRETS['password']}"},
                       spec={"analysis": {"analyzer": "llm"}})
    await p.job("leaky-script", spec)
    await p.job("leaky-alert", alert)
    jobs = await p.wait_terminal(["leaky-script", "leaky-alert"])

    # the prompt the LLM received: redacted, and still saying what was there
    assert len(llm.requests) == 2
    prompts = json.dumps(llm.requests)
    assert leaks(prompts) == []
    for marker in ("[REDACTED:jwt]", "[REDACTED:url-credentials]", "[REDACTED:aws-access-key-id]",
                   "[REDACTED:private-key]", "[REDACTED:email]", "password=[REDACTED]", "customer-id=[REDACTED]"):
        assert marker in prompts, marker

    for name in ("leaky-script", "leaky-alert"):
        job = jobs[name]
        status = job["status"]
        assert status["phase"] == "Succeeded" and status["verdict"]["analyzer"] == "llm"
        assert leaks(status) == [], name
        assert "[REDACTED:github-token]" in status["verdict"]["reason"]  # what the model quoted
        # the fingerprint is the job's as submitted (redaction came after it)
        assert status["fingerprint"] == fingerprint.derive(job["spec"])
        events = await p.wait(lambda n=name: p.events_for(n), f"the Event of {name}")
        assert leaks(events) == [] and any("[REDACTED:github-token]" in e["message"] for e in events)
    rows = await p.wait(lambda: p.audit_rows() if len(p.audit_rows()) == 2 else None, "two audit rows")
    assert leaks(rows) == []
    assert "[REDACTED:github-token]" in rows[0]["reason"]
    script_row = next(r for r in rows if r["job_name"] == "leaky-script")
    assert "password=[REDACTED]" in script_row["summary"] and "customer-id=[REDACTED]" in script_row["summary"]

    # a human verdict's reason is redacted the same way (status, audit row, the memory in Redis)
    p.cluster.kubectl("annotate", "tj", "leaky-script", "-n", p.ns, "kubetriage.io/verdict=false_positive",
                      f"kubetriage.io/verdict-reason=test account; its token {SECRETS['human']} was rotated",
                      "kubetriage.io/verdict-by=alice")

    async def human() -> dict[str, Any] | None:
        st = (await p.get("leaky-script"))["status"]
        return st if st["verdict"]["checkType"] == "user" else None

    st = await p.wait(human, "the human verdict")
    assert leaks(st) == [] and "[REDACTED:slack-token]" in st["verdict"]["reason"]
    rows = await p.wait(lambda: p.audit_rows() if len(p.audit_rows()) == 3 else None, "three audit rows")
    assert leaks(rows) == []
    stored = await redis_text(p)
    assert "alice" in stored and leaks(stored) == []  # the memory's case is there, without the token


async def redis_text(p: Pipeline) -> str:
    """Everything this test's operator and workers keep in Redis (queues, payloads, results, memory), as text."""
    client = aioredis.from_url(p.redis.url, decode_responses=True)
    out: list[str] = []
    try:
        async for key in client.scan_iter(f"{p.prefix}:*"):
            kind = await client.type(key)
            if kind == "string":
                out.append(str(await client.get(key)))
            elif kind == "hash":
                out.append(json.dumps(await client.hgetall(key)))
            elif kind == "list":
                out.extend(await client.lrange(key, 0, -1))
            elif kind == "set":
                out.extend(await client.smembers(key))
            elif kind == "zset":
                out.extend(await client.zrange(key, 0, -1))
            elif kind == "stream":
                out.extend(json.dumps(fields) for _, fields in await client.xrange(key))
    finally:
        await client.aclose()
    return "\n".join(out)

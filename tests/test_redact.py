"""Redaction (``kubetriage.api.redact``) on known secret formats; the sinks are checked end to end in
tests/test_redaction_pipeline.py."""

from __future__ import annotations

import json

import pytest

from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import MAX_ERROR, Alert, AttemptRecord, EvidenceItem, ScriptResult, Source, Verdict
from kubetriage.api.redact import BUILTIN, REDACTED, pattern_problems, redactor
from kubetriage.infra.config import Settings

# Well-known example credentials (vendors' documentation values, or made up in their format): none is real.
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\nZ1BjP5CE/Wm/Rr500P\n"
       "-----END RSA PRIVATE KEY-----")
CASES = [
    # (text, the secret that must go, what must stay, the marker)
    (f"curl -H 'Authorization: Bearer {JWT}' https://api.example.com", JWT, "curl -H", "[REDACTED:jwt]"),
    ("Authorization: Bearer 0123456789abcdefABCDEF.xyz", "0123456789abcdefABCDEF", "Authorization: Bearer",
     "[REDACTED:"),
    ("proxy-authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy", "proxy-authorization: Basic",
     "[REDACTED:authorization]"),
    ("request failed with bearer abcdefghijklmnop1234 after 3 tries", "abcdefghijklmnop1234", "after 3 tries",
     "[REDACTED:bearer]"),
    ("aws: AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE", "used", "[REDACTED:aws-access-key-id]"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI", "AWS_SECRET_ACCESS_KEY=",
     REDACTED),
    ("maps key=AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "AIzaSyDaGmWKa4JsXZ", "maps", "[REDACTED"),
    ("gcloud token ya29.a0AfH6SMC1234567890abcdefghijkl", "ya29.a0AfH6SMC", "gcloud token",
     "[REDACTED:gcp-oauth-token]"),
    ('{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC'
     '\\n-----END PRIVATE KEY-----\\n", "project_id": "shop"}', "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
     '"project_id": "shop"', REDACTED),
    (f"config dump:\n{PEM}\nthen the test failed", "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi", "then the test failed",
     "[REDACTED:private-key]"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU", "",
     "[REDACTED:private-key]"),
    ("psycopg.OperationalError: postgresql://app:S3cr3t-pw@db.internal:5432/orders", "S3cr3t-pw",
     "@db.internal:5432/orders", "postgresql://[REDACTED:url-credentials]@"),
    ("git clone https://x-access-token:ghs_16C7e42F292c6912E7710c838347Ae178B4a@github.com/org/repo",
     "ghs_16C7e42F292c6912E7710c838347Ae178B4a", "github.com/org/repo", "[REDACTED"),
    ("login failed: password=hunter2 user=bob", "hunter2", "user=bob", "password=[REDACTED]"),
    ("DB_PASSWORD: 'correct horse battery staple'", "correct horse", "DB_PASSWORD:", REDACTED),
    ('{"api_key": "k-123456", "region": "eu"}', "k-123456", '"region": "eu"', REDACTED),
    ("Server=db;User Id=sa;Password=Pa55w0rd!;Database=shop", "Pa55w0rd!", "Database=shop", REDACTED),
    ("GET /callback?code=1&access_token=tok_abc123&state=x", "tok_abc123", "state=x", REDACTED),
    ("X-Amz-Security-Token: FwoGZXIvYXdzEJr//////////wEaDN", "FwoGZXIvYXdzEJr", "X-Amz-Security-Token:", REDACTED),
    ("token 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 leaked", "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", "leaked",
     "[REDACTED:github-token]"),
    ("slack xoxb-2222222222-3333333333333-abcdefghijklmnop", "xoxb-2222222222", "slack", "[REDACTED:slack-token]"),
    ("OPENROUTER sk-or-v1-0123456789abcdef0123456789abcdef", "sk-or-v1-0123456789abcdef", "OPENROUTER",
     "[REDACTED:api-key]"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe", "[REDACTED:stripe-key]"),
    ("notify alice.smith+oncall@example.com now", "alice.smith+oncall@example.com", "notify", "[REDACTED:email]"),
]


@pytest.mark.parametrize(("text", "secret", "kept", "marker"), CASES, ids=[c[3] + str(i) for i, c in enumerate(CASES)])
def test_known_secret_formats_are_redacted(text: str, secret: str, kept: str, marker: str) -> None:
    out = BUILTIN(text)
    assert secret not in out, out
    assert kept in out and marker in out, out
    assert BUILTIN(out) == out  # twice is once: the operator and the worker both redact


@pytest.mark.parametrize("text", [
    "AssertionError: expected total 42, got 0",
    "TimeoutError: page.goto: Timeout 30000ms exceeded.",
    "tokens_total=5 password_hash_algorithm=argon2",
    "connection refused to http://10.0.0.5:8080/health",
    "image registry.example.com/shop/api@sha256:0123456789abcdef",
])
def test_ordinary_failure_text_is_left_alone(text: str) -> None:
    assert BUILTIN(text) == text


def test_the_pools_own_patterns_add_to_the_built_ins() -> None:
    r = redactor([r"customer-id=(\d+)", r"ORD-[0-9]{6}", "(unclosed", "x*"])
    out = r("customer-id=48151623 placed ORD-123456 for bob@example.com; xxx")
    assert out == "customer-id=[REDACTED] placed [REDACTED] for [REDACTED:email]; xxx"
    assert redactor([r"customer-id=(\d+)"]) is redactor([r"customer-id=(\d+)"])  # compiled once per list
    assert pattern_problems([r"ok-\d+", "(unclosed", "x*"]) == [
        "redactPatterns[1] does not compile (RE2 syntax): missing ): (unclosed",
        "redactPatterns[2] matches the empty string, so it would redact nothing useful",
    ]


def test_a_request_is_redacted_field_by_field_within_the_field_limits() -> None:
    emails = " ".join(f"u{i}@x.io" for i in range(3000))  # each marker is longer than what it replaces
    request = AnalysisRequest(
        uid="u", name="j", namespace="n", source=Source(type="scriptResult"),
        script_result=ScriptResult(
            script_name="checkout", success=False, error_message=emails[:MAX_ERROR],
            logs_excerpt=f"step 1\nAuthorization: Bearer {JWT}\nstep 2: failed",
            report_url="https://r2.example.com/run/1.html?X-Amz-Signature=abc123",
            history=[AttemptRecord(success=False, error_message="password=hunter2")],
        ),
    )
    out = AnalysisRequest.model_validate(BUILTIN.request(request).model_dump(mode="json"))  # still valid
    sr = out.script_result
    assert sr is not None and sr.history is not None
    assert "@x.io" not in (sr.error_message or "") and len(sr.error_message or "") <= MAX_ERROR
    assert JWT not in (sr.logs_excerpt or "") and (sr.logs_excerpt or "").endswith("step 2: failed")
    assert sr.history[0].error_message == "password=[REDACTED]"
    # the worker fetches the report with its URL as given; the prompt shows it without the query
    assert sr.report_url == "https://r2.example.com/run/1.html?X-Amz-Signature=abc123"
    assert sr.script_name == "checkout"

    alert = AnalysisRequest(uid="u", name="j", namespace="n", source=Source(type="alert"), alert=Alert(
        name="DBDown", labels={"instance": "postgres://app:pw123@db:5432"},
        annotations={"description": "owner alice@example.com, token=abc123"},
        generator_url="http://prom:9090/graph?g0.expr=up&token=abc123"))
    a = BUILTIN.request(alert).alert
    assert a is not None and a.name == "DBDown"
    assert a.labels == {"instance": "postgres://[REDACTED:url-credentials]@db:5432"}
    assert a.annotations == {"description": "owner [REDACTED:email], token=[REDACTED]"}
    assert a.generator_url == "http://prom:9090/graph?g0.expr=up&token=[REDACTED]"


def test_a_verdict_and_evidence_are_redacted() -> None:
    verdict = Verdict(discard=False, classification="valid", confidence=0.9, analyzer="llm",
                      reason=f"the screenshot shows the token {JWT}", title="key AKIAIOSFODNN7EXAMPLE",
                      next_steps=["rotate password=hunter2"])
    out = BUILTIN.verdict(verdict)
    assert JWT not in out.reason and "AKIAIOSFODNN7EXAMPLE" not in (out.title or "")
    assert out.next_steps == ["rotate password=[REDACTED]"]
    found = BUILTIN.evidence([EvidenceItem(source="alertmanager", summary="silenced by bob@example.com")])
    assert found[0].summary == "silenced by [REDACTED:email]"


def test_the_workers_patterns_come_as_a_json_list() -> None:
    """A regular expression may hold any comma, so the pool's list reaches the worker as JSON."""
    settings = Settings.from_env({"KUBETRIAGE_REDACT_PATTERNS": json.dumps([r"id=(\d{2,5})", "a,b"])})
    assert settings.redact_pattern_list == (r"id=(\d{2,5})", "a,b")
    assert Settings.from_env({}).redact_pattern_list == ()
    with pytest.raises(SystemExit, match="KUBETRIAGE_REDACT_PATTERNS"):
        Settings.from_env({"KUBETRIAGE_REDACT_PATTERNS": "id=(\\d+)"})

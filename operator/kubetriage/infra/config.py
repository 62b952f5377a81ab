"""Every setting of the operator and the worker, in one place, from ``KUBETRIAGE_*`` variables.

The README's configuration table is checked against ``Settings.model_fields``
by a test, so a setting cannot exist without being documented.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "KUBETRIAGE_"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL_RE = re.compile(DNS_LABEL)


class Settings(BaseModel):
    """Operator and worker settings. Environment: ``KUBETRIAGE_<FIELD_NAME_UPPER>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for queues, leases and results.")
    redis_prefix: str = Field("kt", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Key prefix in Redis.")
    redis_max_connections: int = Field(
        64, ge=2, le=10000, description="Operator: Redis connections at most; a request waits for a free one."
    )
    redis_pool_timeout_seconds: float = Field(
        20, gt=0, description="Operator: longest wait for a free Redis connection; then the request fails (and "
        "is retried)."
    )
    database_url: str = Field(
        "sqlite:///kubetriage.db", description="Verdict sink: sqlite:///path or postgresql://user@host/db."
    )
    namespaces: str = Field("", description="Comma-separated namespaces to watch; empty = all namespaces.")
    pool_namespace: str = Field(
        "", description="Namespace searched for a job's TriagePool after the job's own (usually the operator's)."
    )
    default_pool: str = Field("default", description="TriagePool for jobs without spec.pool.")
    alert_priority_class: str = Field("kubetriage-p1", description="PriorityClass for alerts without one.")
    script_priority_class: str = Field("kubetriage-p2", description="PriorityClass for script results without one.")
    dedup_window_seconds: int = Field(300, ge=0, le=7 * 86400, description="Same fingerprint inside it = Duplicate.")
    lease_seconds: float = Field(30, gt=0, le=3600, description="A worker's claim on a job, renewed while it runs.")
    retry_backoff_seconds: float = Field(2, ge=0, description="First retry delay; doubles per attempt.")
    retry_backoff_max_seconds: float = Field(300, ge=0, description="Cap of the retry delay.")
    running_status_delay_seconds: float = Field(
        2.0, ge=0, description="Write phase Running only for jobs still running after this (saves API writes)."
    )
    scale_down_delay_seconds: float = Field(60, ge=0, description="Backlog must stay low this long to scale down.")
    resync_seconds: float = Field(
        60, ge=0, description="Operator: how often the active replica lists TriageJobs to admit any missing from "
        "the queue (0 = never)."
    )
    worker_image: str = Field("ghcr.io/kubetriage/kubetriage:0.1.0", description="Image of worker pods.")
    redis_url_secret: str = Field(
        "", description="name/key of a Secret holding the Redis URL for workers (else redis_url is passed as is)."
    )
    metrics_port: int = Field(8080, ge=0, le=65535, description="Prometheus /metrics port (0 = off).")
    health_port: int = Field(8081, ge=0, le=65535, description="Liveness /healthz port of the operator (0 = off).")
    peering: str = Field("kubetriage", description="kopf peering name: replicas with it elect one active.")
    standalone: bool = Field(False, description="Run without peering (single replica, tests).")
    peering_lifetime_seconds: int = Field(
        60, ge=2, le=3600, description="A silent replica counts as gone after this (standby takeover time)."
    )
    # worker
    pool: str = Field("", description="Worker: the pool it serves, as namespace/name.")
    concurrency: int = Field(8, ge=1, le=1024, description="Worker: jobs analysed at once.")
    analyzer_chain: str = Field("auto", description="Worker: auto, rules, memory, llm or vision.")
    confidence_threshold: float = Field(0.7, ge=0, le=1, description="Worker: first verdict at or above wins.")
    shutdown_grace_seconds: float = Field(10, ge=0, description="Worker: time to finish jobs on SIGTERM.")
    llm_base_url: str = Field("https://openrouter.ai/api/v1", description="OpenAI-compatible endpoint.")
    llm_allow_http: bool = Field(
        False, description="Worker: the LLM base URL may be plain http (from the pool's spec.analyzer.allowHTTP)."
    )
    llm_allow_private_endpoints: bool = Field(
        False, description="Worker: the LLM base URL may be a loopback, private or link-local address (from the "
        "pool's spec.analyzer.allowPrivateEndpoints); metadata addresses never."
    )
    llm_model: str = Field("", description="Text model; empty = no LLM (offline analyzers only).")
    llm_vision_model: str = Field("", description="Vision model for screenshots.")
    llm_api_key: str = Field("", repr=False, description="API key (from a Secret in the chart).")
    llm_timeout_seconds: float = Field(60, gt=0, description="Per LLM request.")
    llm_max_retries: int = Field(3, ge=0, le=10, description="Retries of one LLM request on 429/5xx/timeouts.")
    llm_price_per_1k_prompt: float = Field(0, ge=0, description="USD per 1000 prompt tokens (cost accounting).")
    llm_price_per_1k_completion: float = Field(0, ge=0, description="USD per 1000 completion tokens.")
    vision_allow_hosts: str = Field(
        "", description="Worker: comma-separated hosts screenshots/reports may come from; empty = any public host."
    )
    memory_min_similarity: float = Field(
        0.8, ge=0, le=1, description="Worker: how alike a past human-verdict case must be to be reused."
    )
    redact_patterns: str = Field(
        "", description="Worker: JSON list of RE2 expressions redacted on top of the built-in secret patterns "
        "(from the pool's spec.analyzer.redactPatterns)."
    )
    identity_labels: str = Field(
        "", description="Worker: comma-separated alert labels that name a target (default: namespace, job, "
        "service, instance, target, host, node); from the pool's spec.analyzer.identityLabels."
    )
    # evidence (worker): the pool's spec.evidence, passed by the operator in the worker Deployment's environment
    evidence_prometheus_url: str = Field("", description="Worker: Prometheus to ask before a verdict; empty = none.")
    evidence_prometheus_any_expression: bool = Field(
        False, description="Worker: query any expression a job carries, not only its alerting rule's."
    )
    evidence_alertmanager_url: str = Field(
        "", description="Worker: Alertmanager to ask before a verdict; empty = none."
    )
    evidence_prometheus_allow_http: bool = Field(False, description="Worker: let the Prometheus URL be plain http.")
    evidence_prometheus_allow_private_endpoints: bool = Field(
        False, description="Worker: let the Prometheus URL be a loopback, private or link-local address."
    )
    evidence_alertmanager_allow_http: bool = Field(
        False, description="Worker: let the Alertmanager URL be plain http."
    )
    evidence_alertmanager_allow_private_endpoints: bool = Field(
        False, description="Worker: let the Alertmanager URL be a loopback, private or link-local address."
    )
    evidence_prometheus_bearer_token: str = Field("", repr=False, description="Worker: bearer token (from a Secret).")
    evidence_prometheus_username: str = Field("", repr=False, description="Worker: basic auth user (from a Secret).")
    evidence_prometheus_password: str = Field(
        "", repr=False, description="Worker: basic auth password (from a Secret)."
    )
    evidence_prometheus_ca: str = Field("", repr=False, description="Worker: PEM CA bundle to trust for Prometheus.")
    evidence_prometheus_insecure_skip_verify: bool = Field(
        False, description="Worker: do not check Prometheus's certificate (tests only)."
    )
    evidence_alertmanager_bearer_token: str = Field("", repr=False, description="Worker: bearer token (from a Secret).")
    evidence_alertmanager_username: str = Field("", repr=False, description="Worker: basic auth user (from a Secret).")
    evidence_alertmanager_password: str = Field(
        "", repr=False, description="Worker: basic auth password (from a Secret)."
    )
    evidence_alertmanager_ca: str = Field(
        "", repr=False, description="Worker: PEM CA bundle to trust for Alertmanager."
    )
    evidence_alertmanager_insecure_skip_verify: bool = Field(
        False, description="Worker: do not check Alertmanager's certificate (tests only)."
    )
    evidence_timeout_seconds: float = Field(5, gt=0, le=60, description="Worker: per evidence request.")
    evidence_budget_seconds: float = Field(10, gt=0, le=120, description="Worker: all evidence of one job together.")
    evidence_cache_seconds: float = Field(
        30, ge=0, le=600, description="Worker: reuse evidence for jobs of the same fingerprint this long."
    )
    history_default_branches: str = Field(
        "main,master", description="Comma-separated branch names whose script runs count as the default branch."
    )
    # ingest (HTTP endpoints for Alertmanager, script results and JUnit uploads; in the operator process)
    ingest_port: int = Field(8000, ge=0, le=65535, description="Ingest HTTP port (0 = off).")
    ingest_token: str = Field(
        "", repr=False, description="Bearer token for ingest (from a Secret); empty and no tokens file = refuse all."
    )
    ingest_tokens_file: str = Field(
        "", description="JSON/YAML file mapping token -> allowed namespaces (first = default), for per-team tokens."
    )
    ingest_namespace: str = Field(
        "default", pattern=DNS_LABEL, description="Namespace of ingested TriageJobs when the request names none."
    )
    ingest_allowed_namespaces: str = Field(
        "", description="Comma list of further namespaces ingest_token may write to (ingest_namespace always)."
    )
    ingest_max_body_bytes: int = Field(
        1048576, ge=1024, le=64 * 1048576, description="Largest ingest request body; larger gets 413."
    )
    ingest_rate_per_second: float = Field(
        50, ge=0, description="Ingest requests per second per token, per replica (0 = unlimited); over it 429."
    )
    ingest_burst: int = Field(100, ge=1, description="Ingest requests a token may send at once above the rate.")
    alert_priority_map: str = Field(
        "critical=kubetriage-p1,warning=kubetriage-p2,info=kubetriage-p3",
        description="Alert severity label -> PriorityClass, as value=class pairs; unmapped = alert_priority_class.",
    )
    # actions on verdicts (TriagePolicies) and TTL: the operator (kubetriage.controller.actions, controller.ttl)
    actions_secrets_dir: str = Field(
        "/etc/kubetriage/action-secrets", description="Operator: where the chart mounts the Secrets TriagePolicies "
        "name (one folder per Secret, one file per key); the operator reads no Secret from the API."
    )
    actions_secret_namespaces: str = Field(
        "", description="Operator: JSON object Secret name -> namespaces whose TriagePolicies may use it (from the "
        "chart's actions.secrets); a Secret not listed is refused."
    )
    actions_max_attempts: int = Field(5, ge=1, le=20, description="Operator: tries of one action before it is Failed.")
    actions_retry_backoff_seconds: float = Field(
        2, ge=0, le=600, description="Operator: first retry delay of a failed action; doubles per try."
    )
    actions_timeout_seconds: float = Field(10, gt=0, le=120, description="Operator: per action request.")
    ttl_deletions_per_second: int = Field(
        20, ge=1, le=1000, description="Operator: most finished TriageJobs deleted per second when their TTL ends."
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``KUBETRIAGE_*``; a bad value raises SystemExit naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            lines = [
                f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
            ]
            raise SystemExit("invalid configuration:\n  " + "\n  ".join(lines)) from None

    @field_validator("ingest_allowed_namespaces")
    @classmethod
    def _namespaces_are_dns_labels(cls, value: str) -> str:
        bad = [n for n in _split(value) if not _DNS_LABEL_RE.match(n)]
        if bad:
            raise ValueError(f"not a namespace name: {', '.join(bad)}")
        return value

    @field_validator("actions_secret_namespaces")
    @classmethod
    def _secret_namespaces_are_a_json_object(cls, value: str) -> str:
        parse_secret_namespaces(value)
        return value

    @field_validator("alert_priority_map")
    @classmethod
    def _priority_map_is_pairs(cls, value: str) -> str:
        parse_priority_map(value)
        return value

    @field_validator("redact_patterns")
    @classmethod
    def _redact_patterns_are_a_json_list(cls, value: str) -> str:
        _json_strings(value)
        return value

    @property
    def redact_pattern_list(self) -> tuple[str, ...]:
        """The pool's own redaction expressions (a JSON list: a regular expression may hold any comma)."""
        return _json_strings(self.redact_patterns)

    @property
    def identity_label_list(self) -> tuple[str, ...] | None:
        """The pool's identity labels, or None for the default set."""
        return tuple(_split(self.identity_labels)) or None

    @property
    def default_branches(self) -> list[str]:
        return _split(self.history_default_branches)

    @property
    def ingest_namespaces(self) -> list[str]:
        """Where ``ingest_token`` may write; its first entry is the default (``ingest_namespace``)."""
        extra = [n for n in _split(self.ingest_allowed_namespaces) if n != self.ingest_namespace]
        return [self.ingest_namespace, *extra]

    @property
    def alert_priorities(self) -> dict[str, str]:
        return parse_priority_map(self.alert_priority_map)

    @property
    def secret_namespaces(self) -> dict[str, frozenset[str]]:
        return parse_secret_namespaces(self.actions_secret_namespaces)

    @property
    def watched_namespaces(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]


def _json_strings(value: str) -> tuple[str, ...]:
    if not value.strip():
        return ()
    try:
        found = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"expected a JSON list of strings: {exc}") from None
    if not isinstance(found, list) or not all(isinstance(x, str) for x in found):
        raise ValueError("expected a JSON list of strings")
    return tuple(found)


def _split(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def parse_priority_map(value: str) -> dict[str, str]:
    """``critical=kubetriage-p1,warning=kubetriage-p2`` -> dict; a malformed pair raises ValueError naming it."""
    out: dict[str, str] = {}
    for pair in _split(value):
        key, sep, cls = pair.partition("=")
        if not sep or not key.strip() or not cls.strip():
            raise ValueError(f"expected severity=PriorityClass pairs separated by commas, got {pair!r}")
        out[key.strip()] = cls.strip()
    return out


def parse_secret_namespaces(value: str) -> dict[str, frozenset[str]]:
    """``{"team-a-hooks": ["team-a"]}`` -> Secret name -> namespaces allowed to use it."""
    if not value.strip():
        return {}
    try:
        found = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"expected a JSON object of Secret name -> list of namespaces: {exc}") from None
    if not isinstance(found, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(n, str) for n in v)
            for k, v in found.items()):
        raise ValueError("expected a JSON object of Secret name -> list of namespaces")
    return {k: frozenset(v) for k, v in found.items()}

"""Every setting of the operator and the worker, in one place, from ``KUBETRIAGE_*`` variables.

The README's configuration table is checked against ``Settings.model_fields``
by a test, so a setting cannot exist without being documented.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "KUBETRIAGE_"


class Settings(BaseModel):
    """Operator and worker settings. Environment: ``KUBETRIAGE_<FIELD_NAME_UPPER>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for queues, leases and results.")
    redis_prefix: str = Field("kt", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Key prefix in Redis.")
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
        1.0, ge=0, description="Write phase Running only for jobs still running after this (saves API writes)."
    )
    scale_down_delay_seconds: float = Field(60, ge=0, description="Backlog must stay low this long to scale down.")
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
    llm_model: str = Field("", description="Text model; empty = no LLM (offline analyzers only).")
    llm_vision_model: str = Field("", description="Vision model for screenshots.")
    llm_api_key: str = Field("", repr=False, description="API key (from a Secret in the chart).")
    llm_timeout_seconds: float = Field(60, gt=0, description="Per LLM request.")
    llm_max_retries: int = Field(3, ge=0, le=10, description="Retries of one LLM request on 429/5xx/timeouts.")
    llm_price_per_1k_prompt: float = Field(0, ge=0, description="USD per 1000 prompt tokens (cost accounting).")
    llm_price_per_1k_completion: float = Field(0, ge=0, description="USD per 1000 completion tokens.")

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

    @property
    def watched_namespaces(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]

    def env(self) -> dict[str, str]:
        """The settings as environment variables (for worker pods and local processes)."""
        out = {}
        for name, value in self.model_dump().items():
            out[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

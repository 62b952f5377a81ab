"""The one definition of the TriageJob and TriagePool contracts.

The CRD manifests in ``crds/`` are generated from these models by
``devharness.crdgen`` and a test fails when they drift, so a field added here
cannot be silently pruned by the API server, and a field in the YAML cannot be
invisible to the code. Limits live here too: the API server enforces them
before the operator ever sees an object.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetriage.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Size caps. etcd refuses objects over ~1.5 MiB; these keep a TriageJob well
# below that even with every field full, and keep prompts bounded.
MAX_NAME = 253
MAX_SHORT = 256
MAX_URL = 2048
MAX_LABELS = 64
MAX_LABEL_VALUE = 1024
MAX_ANNOTATION_VALUE = 8192
MAX_ERROR = 16384
MAX_LOGS = 32768
MAX_REASON = 4096
MAX_SCREENSHOTS = 10
MAX_INLINE_IMAGE = 262144  # base64 characters per inline screenshot
MAX_HISTORY = 50
MAX_CONDITIONS = 16
MAX_NEXT_STEPS = 10

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
FINGERPRINT = r"^[A-Za-z0-9._:/-]+$"
HTTP_URL = r"^https?://"


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes convention), snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _str(max_length: int, **kw: Any) -> Any:
    return Field(None, max_length=max_length, **kw)


Labels = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_LABEL_VALUE)]],
    Field(max_length=MAX_LABELS),
]
Annotations = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_ANNOTATION_VALUE)]],
    Field(max_length=MAX_LABELS),
]


# --------------------------------------------------------------------------- enums


class SourceType(StrEnum):
    ALERT = "alert"
    SCRIPT_RESULT = "scriptResult"


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class AnalyzerName(StrEnum):
    AUTO = "auto"
    RULES = "rules"
    MEMORY = "memory"
    LLM = "llm"
    VISION = "vision"


class Classification(StrEnum):
    FALSE_POSITIVE = "false_positive"
    VALID = "valid"
    INCONCLUSIVE = "inconclusive"


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DUPLICATE = "Duplicate"


# A finished job never runs again. (Duplicate is not here: a duplicate may still wait for its verdict.)
FINISHED_PHASES = frozenset({Phase.SUCCEEDED.value, Phase.FAILED.value})


class CheckType(StrEnum):
    AI = "ai"
    USER = "user"


# --------------------------------------------------------------------------- TriageJob spec


class Source(_Model):
    """Where the job came from; ``id`` ties the verdict to the user's own table row."""

    type: SourceType = Field(description="alert or scriptResult; selects which body is required.")
    id: str | None = _str(128, description="Row id in the user's alerts / script_results table.")
    fingerprint: str | None = Field(
        None,
        max_length=128,
        pattern=FINGERPRINT,
        description="Dedup key; derived from the body when absent.",
    )


class Alert(_Model):
    """A monitoring alert, shaped after Alertmanager's webhook alert."""

    name: str = Field(min_length=1, max_length=MAX_NAME, description="Alert name (alertname label).")
    status: AlertStatus = Field(AlertStatus.FIRING, description="firing or resolved.")
    severity: str | None = _str(64)
    labels: Labels | None = None
    annotations: Annotations | None = None
    starts_at: dt.datetime | None = None
    ends_at: dt.datetime | None = None
    host: str | None = _str(MAX_NAME)
    device: str | None = _str(MAX_NAME)
    consecutive_count: int | None = Field(None, ge=0, le=1_000_000)
    generator_url: str | None = Field(None, alias="generatorURL", max_length=MAX_URL, pattern=HTTP_URL)
    value: str | None = _str(MAX_SHORT, description="The metric value that fired, as text.")


class Screenshot(_Model):
    """An image that shows the failure: by URL (fetched with SSRF guards) or inline base64."""

    name: str | None = _str(MAX_SHORT)
    url: str | None = Field(None, max_length=MAX_URL, pattern=HTTP_URL)
    data: str | None = Field(None, max_length=MAX_INLINE_IMAGE, pattern=r"^[A-Za-z0-9+/=\s]*$")
    media_type: Literal["image/png", "image/jpeg", "image/webp", "image/gif"] | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.url) != has(self.data)", "message": "set exactly one of url or data"}
            ]
        }
    )


class AttemptRecord(_Model):
    """One earlier run of the same script, for flakiness evidence."""

    success: bool
    finished_at: dt.datetime | None = None
    error_message: str | None = _str(1024)
    commit: str | None = _str(64)


class ScriptResult(_Model):
    """A test or script run, shaped after the original system's script_results row."""

    script_name: str = Field(min_length=1, max_length=MAX_NAME)
    success: bool
    test_case: str | None = _str(MAX_NAME * 2)
    error_message: str | None = _str(MAX_ERROR)
    logs_excerpt: str | None = _str(MAX_LOGS)
    report_url: str | None = Field(None, alias="reportURL", max_length=MAX_URL, pattern=HTTP_URL)
    screenshots: list[Screenshot] | None = Field(None, max_length=MAX_SCREENSHOTS)
    duration_seconds: float | None = Field(None, ge=0, le=7 * 24 * 3600)
    attempt: int | None = Field(None, ge=1, le=1000)
    commit: str | None = _str(64)
    history: list[AttemptRecord] | None = Field(None, max_length=MAX_HISTORY)


class Analysis(_Model):
    """How to analyse: which chain, how long, how many tries."""

    analyzer: AnalyzerName = AnalyzerName.AUTO
    deadline_seconds: int = Field(300, ge=1, le=86400, description="Per-attempt analysis deadline.")
    max_attempts: int = Field(3, ge=1, le=10)


class TriageJobSpec(_Model):
    source: Source
    priority_class_name: str | None = Field(
        None,
        max_length=MAX_NAME,
        pattern=DNS_SUBDOMAIN,
        description="Kubernetes PriorityClass; defaults by source type.",
    )
    pool: str | None = Field(
        None, max_length=63, pattern=DNS_LABEL, description="TriagePool; the default pool when absent."
    )
    alert: Alert | None = None
    script_result: ScriptResult | None = None
    analysis: Analysis | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.source.type != 'alert' || (has(self.alert) && !has(self.scriptResult))",
                    "message": "source.type alert needs spec.alert and no spec.scriptResult",
                },
                {
                    "rule": "self.source.type != 'scriptResult' || (has(self.scriptResult) && !has(self.alert))",
                    "message": "source.type scriptResult needs spec.scriptResult and no spec.alert",
                },
            ]
        }
    )


# --------------------------------------------------------------------------- TriageJob status


class Tokens(_Model):
    prompt: int = Field(0, ge=0)
    completion: int = Field(0, ge=0)
    total: int = Field(0, ge=0)


class Verdict(_Model):
    """What an analyzer concluded. ``discard`` is true only for a false positive."""

    discard: bool
    classification: Classification
    reason: str = Field(max_length=MAX_REASON)
    confidence: float = Field(ge=0, le=1)
    analyzer: str = Field(max_length=64)
    model: str | None = _str(MAX_SHORT)
    title: str | None = _str(MAX_SHORT)
    next_steps: list[Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=MAX_NEXT_STEPS)
    tokens: Tokens | None = None
    cost_usd: float | None = Field(None, ge=0)
    check_type: CheckType = CheckType.AI


class Condition(_Model):
    """Kubernetes condition conventions (metav1.Condition)."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024)
    message: str | None = _str(32768)
    last_transition_time: dt.datetime
    observed_generation: int | None = Field(None, ge=0)


MAX_EVIDENCE = 16


class EvidenceItem(_Model):
    """One compact fact gathered before the verdict (Prometheus, Alertmanager, history), as users see it."""

    source: str = Field(max_length=64, description="prometheus, alertmanager, history, ...")
    summary: str = Field(max_length=512, description="One line a human can check.")
    value: str | None = Field(None, max_length=256, description="The headline figure, as text.")


class TriageJobStatus(_Model):
    phase: Phase | None = None
    verdict: Verdict | None = None
    evidence: list[EvidenceItem] | None = Field(None, max_length=MAX_EVIDENCE)
    attempts: int | None = Field(None, ge=0)
    pool: str | None = _str(MAX_NAME * 2 + 1, description="namespace/name of the TriagePool.")
    priority_class_name: str | None = _str(MAX_NAME)
    priority: int | None = None
    fingerprint: str | None = _str(128)
    queued_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    duplicate_of: str | None = _str(MAX_NAME)
    message: str | None = _str(MAX_REASON)
    observed_generation: int | None = Field(None, ge=0)
    recorded: bool | None = Field(None, description="The verdict is in the database.")
    conditions: list[Condition] | None = Field(None, max_length=MAX_CONDITIONS)


# --------------------------------------------------------------------------- TriagePool


class Replicas(_Model):
    min: int = Field(1, ge=0, le=1000)
    max: int = Field(4, ge=0, le=1000)

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min must be <= max"}]
        }
    )


class SecretKeyRef(_Model):
    name: str = Field(max_length=MAX_NAME, pattern=DNS_SUBDOMAIN)
    key: str = Field(max_length=MAX_NAME)


class PoolAnalyzer(_Model):
    """Analyzer chain and model settings for the pool's workers."""

    chain: AnalyzerName = AnalyzerName.AUTO
    confidence_threshold: float = Field(0.7, ge=0, le=1)
    base_url: str | None = Field(None, alias="baseURL", max_length=MAX_URL, pattern=HTTP_URL)
    model: str | None = _str(MAX_SHORT)
    vision_model: str | None = _str(MAX_SHORT)
    api_key_secret_ref: SecretKeyRef | None = None
    timeout_seconds: float = Field(60, gt=0, le=600)
    identity_labels: list[Annotated[str, Field(max_length=MAX_NAME)]] | None = Field(
        None,
        max_length=16,
        description="Alert labels that name the target: a remembered human verdict or a duplicate's verdict "
        "applies only when these match. Default: namespace, job, service, instance, target, host, node.",
    )


class RateLimit(_Model):
    """Token buckets: jobs started per second, and LLM tokens per minute."""

    jobs_per_second: float | None = Field(None, gt=0, le=100000)
    burst: int | None = Field(None, ge=1, le=1000000)
    llm_tokens_per_minute: int | None = Field(None, ge=1)


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class ResourceList(_Model):
    cpu: str | None = Field(None, max_length=32, pattern=QUANTITY)
    memory: str | None = Field(None, max_length=32, pattern=QUANTITY)


class Resources(_Model):
    requests: ResourceList | None = None
    limits: ResourceList | None = None


class TriagePoolSpec(_Model):
    priority_class_name: str | None = Field(None, max_length=MAX_NAME, pattern=DNS_SUBDOMAIN)
    # a schema default lets the API server fill these in, so kubectl shows them
    replicas: Replicas = Field(default_factory=Replicas, json_schema_extra={"default": {"min": 1, "max": 4}})
    concurrency: int = Field(8, ge=1, le=1024, description="Jobs analysed at once per worker pod.")
    analyzer: PoolAnalyzer = Field(default_factory=PoolAnalyzer, json_schema_extra={"default": {}})
    rate_limit: RateLimit | None = None
    image: str | None = _str(512)
    resources: Resources | None = None


class TriagePoolStatus(_Model):
    replicas: int | None = Field(None, ge=0)
    backlog: int | None = Field(None, ge=0)
    running: int | None = Field(None, ge=0)
    deployment: str | None = _str(MAX_NAME)
    observed_generation: int | None = Field(None, ge=0)
    conditions: list[Condition] | None = Field(None, max_length=MAX_CONDITIONS)


# --------------------------------------------------------------------------- TriageRule


class RuleWindow(_Model):
    """A time window (a maintenance window): the rule applies to alerts that started inside it."""

    start: dt.datetime
    end: dt.datetime

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": "self.end > self.start", "message": "end must be after start"}]
        }
    )


class RuleMatch(_Model):
    """What a rule applies to; every field given must match (an empty match applies to every job)."""

    source_type: SourceType | None = None
    alert_names: list[Annotated[str, Field(max_length=MAX_NAME)]] | None = Field(
        None, max_length=32, description="Exact alert names."
    )
    labels: Labels | None = Field(None, description="Alert labels that must be present with exactly these values.")
    script_names: list[Annotated[str, Field(max_length=MAX_NAME)]] | None = Field(
        None, max_length=32, description="Exact script names."
    )
    error_regex: str | None = Field(
        None,
        max_length=256,
        description="RE2 regular expression searched in the error message, the logs and the alert's annotations.",
    )
    window: RuleWindow | None = None


class RuleAction(_Model):
    """Either a classification with a confidence, or a guard that a human must decide."""

    never_discard: bool | None = Field(
        None, description="Jobs this rule matches never become false_positive without a human."
    )
    classification: Literal["false_positive", "valid"] | None = None
    confidence: float | None = Field(None, ge=0, le=1)
    reason: str | None = _str(512)

    @model_validator(mode="after")
    def _one_action(self) -> RuleAction:
        # The same two rules as the CEL below, for manifests checked outside the API server (rule test).
        if bool(self.never_discard) == (self.classification is not None):
            raise ValueError("set exactly one of neverDiscard: true or classification")
        if self.classification is not None and self.confidence is None:
            raise ValueError("a classification needs a confidence")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.neverDiscard) && self.neverDiscard) != has(self.classification)",
                    "message": "set exactly one of neverDiscard: true or classification",
                },
                {
                    "rule": "!has(self.classification) || has(self.confidence)",
                    "message": "a classification needs a confidence",
                },
            ]
        }
    )


class TriageRuleStatus(_Model):
    """Set by the operator: whether the rule is usable (an invalid regular expression is reported here)."""

    observed_generation: int | None = Field(None, ge=0)
    conditions: list[Condition] | None = Field(None, max_length=MAX_CONDITIONS)


class TriageRuleSpec(_Model):
    """A team's own rule, evaluated before any analyzer and cited in the verdict's reason."""

    description: str | None = _str(512)
    match: RuleMatch = Field(default_factory=RuleMatch)
    action: RuleAction


# --------------------------------------------------------------------------- helpers


def verdict_from_classification(
    classification: Classification | str, reason: str, confidence: float, analyzer: str, **extra: Any
) -> Verdict:
    """Build a Verdict whose ``discard`` agrees with its classification, always."""
    c = Classification(classification)
    return Verdict(
        discard=c is Classification.FALSE_POSITIVE,
        classification=c,
        reason=reason[:MAX_REASON],
        confidence=confidence,
        analyzer=analyzer,
        **extra,
    )

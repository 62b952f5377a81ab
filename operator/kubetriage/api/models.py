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
MAX_REDACT_PATTERNS = 32
MAX_REDACT_PATTERN = 512
MAX_EXPR = 1024
MAX_TTL_SECONDS = 366 * 86400
MAX_ACTIONS = 16

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
    expr: str | None = Field(
        None,
        max_length=MAX_EXPR,
        description="The PromQL expression of the alerting rule; when absent it is read from generatorURL. "
        "Queried only in the pool's configured Prometheus (spec.evidence.prometheus), never elsewhere.",
    )


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
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=MAX_TTL_SECONDS,
        description="Delete the job this long after it finished (its verdict stays in the database); "
        "default: its pool's spec.ttlSecondsAfterFinished; neither: kept.",
    )

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


class ActionResult(StrEnum):
    PENDING = "Pending"  # planned with the verdict; the operator has not finished it yet
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # given up after its retries; message says why
    SHADOW = "Shadow"  # the policy is in shadow mode: what would have been done, nothing sent
    SKIPPED = "Skipped"  # the policy matched but this action must not run (message says why)


class JobAction(_Model):
    """What a TriagePolicy did (or would have done) about this job's verdict: one entry per action."""

    policy: str = Field(max_length=MAX_NAME, description="The TriagePolicy, in the job's namespace.")
    action: Literal["silence", "unsilence", "webhook", "slack"]
    target: str | None = _str(63, description="The notification's name (webhook, slack).")
    key: str = Field(max_length=MAX_SHORT, description="Idempotency key: job uid and verdict classification.")
    result: ActionResult
    at: dt.datetime = Field(description="When the result was reached (planned, for Pending).")
    message: str | None = _str(1024)
    silence_id: str | None = Field(None, alias="silenceID", max_length=64)
    silence_until: dt.datetime | None = None
    attempts: int | None = Field(None, ge=0)


class TriageJobStatus(_Model):
    phase: Phase | None = None
    verdict: Verdict | None = None
    evidence: list[EvidenceItem] | None = Field(None, max_length=MAX_EVIDENCE)
    actions: list[JobAction] | None = Field(
        None, max_length=MAX_ACTIONS, description="What TriagePolicies did about the verdict (newest last)."
    )
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
    # The outbound-URL policy's two opt-ins for baseURL (kubetriage.api.urlpolicy); the API key goes there.
    allow_private_endpoints: bool | None = Field(
        None,
        description="Let baseURL be a loopback, private, link-local or CGNAT address (an in-cluster model "
        "server). Cloud metadata addresses stay refused.",
    )
    allow_http: bool | None = Field(
        None, alias="allowHTTP", description="Let baseURL use plain http (default: https only)."
    )
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
    redact_patterns: list[Annotated[str, Field(max_length=MAX_REDACT_PATTERN)]] | None = Field(
        None,
        max_length=MAX_REDACT_PATTERNS,
        description="RE2 expressions redacted from alert and log text, on top of the built-in secret patterns, "
        "before the text reaches the LLM, status, Events or the database (the whole match, or only the "
        "first group when the expression has groups).",
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


class ConfigMapKeyRef(_Model):
    name: str = Field(max_length=MAX_NAME, pattern=DNS_SUBDOMAIN)
    key: str = Field(max_length=MAX_NAME)


class BasicAuth(_Model):
    """HTTP basic auth, both halves from Secrets of the pool's namespace."""

    username: SecretKeyRef
    password: SecretKeyRef


class EndpointTLS(_Model):
    """How a worker checks the endpoint's certificate (https URLs only)."""

    ca_secret_ref: SecretKeyRef | None = Field(None, description="PEM CA bundle to trust, from a Secret.")
    ca_config_map_ref: ConfigMapKeyRef | None = Field(None, description="PEM CA bundle to trust, from a ConfigMap.")
    insecure_skip_verify: bool = Field(
        False, description="Do not check the certificate at all (tests only: anyone on the path can answer)."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!(has(self.caSecretRef) && has(self.caConfigMapRef))",
                 "message": "set at most one of caSecretRef or caConfigMapRef"}
            ]
        }
    )


class EvidenceEndpoint(_Model):
    """A read-only monitoring API the pool's workers ask before a verdict."""

    url: str = Field(max_length=MAX_URL, pattern=HTTP_URL, description="Base URL, e.g. http://prometheus:9090.")
    # The outbound-URL policy's opt-ins (kubetriage.api.urlpolicy): an in-cluster Prometheus is usually both.
    allow_private_endpoints: bool = Field(
        False, description="Let url be a loopback, private, link-local or CGNAT address (an in-cluster service). "
        "Cloud metadata addresses stay refused.")
    allow_http: bool = Field(False, alias="allowHTTP", description="Let url use plain http (default: https only).")
    bearer_token_secret_ref: SecretKeyRef | None = Field(None, description="Sent as Authorization: Bearer.")
    basic_auth: BasicAuth | None = None
    tls: EndpointTLS | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!(has(self.bearerTokenSecretRef) && has(self.basicAuth))",
                 "message": "set at most one of bearerTokenSecretRef or basicAuth"}
            ]
        }
    )


class PrometheusEndpoint(EvidenceEndpoint):
    any_expression: bool = Field(
        False,
        description="Query whatever expression a job carries. Default false: only the expression of an alerting "
        "rule this Prometheus has loaded under the alert's name, so whoever may create a TriageJob cannot run "
        "queries of their own with the pool's credentials.",
    )


class PoolEvidence(_Model):
    """What the pool's workers ask before a verdict; each source is optional, and read-only."""

    prometheus: PrometheusEndpoint | None = None
    alertmanager: EvidenceEndpoint | None = None
    timeout_seconds: float = Field(5, gt=0, le=60, description="Per request to Prometheus or Alertmanager.")
    budget_seconds: float = Field(10, gt=0, le=120, description="All evidence of one job together.")
    cache_seconds: float = Field(
        30, ge=0, le=600, description="Reuse a job's evidence for jobs of the same fingerprint this long."
    )


class TriagePoolSpec(_Model):
    priority_class_name: str | None = Field(None, max_length=MAX_NAME, pattern=DNS_SUBDOMAIN)
    # a schema default lets the API server fill these in, so kubectl shows them
    replicas: Replicas = Field(default_factory=Replicas, json_schema_extra={"default": {"min": 1, "max": 4}})
    concurrency: int = Field(8, ge=1, le=1024, description="Jobs analysed at once per worker pod.")
    analyzer: PoolAnalyzer = Field(default_factory=PoolAnalyzer, json_schema_extra={"default": {}})
    rate_limit: RateLimit | None = None
    image: str | None = _str(512)
    resources: Resources | None = None
    evidence: PoolEvidence | None = None
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=MAX_TTL_SECONDS,
        description="Default of spec.ttlSecondsAfterFinished for this pool's jobs; none: finished jobs are kept.",
    )


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


# --------------------------------------------------------------------------- TriagePolicy


class PolicyMode(StrEnum):
    SHADOW = "shadow"
    ENFORCE = "enforce"


class MountedSecretRef(_Model):
    """A key of a Secret mounted into the operator by the chart (``actions.secrets``): the operator never reads
    Secrets from the API. The chart also says which namespaces' policies may use it."""

    name: str = Field(max_length=MAX_NAME, pattern=DNS_SUBDOMAIN)
    key: str = Field(max_length=MAX_NAME, pattern=r"^[-._a-zA-Z0-9]+$")


class MountedBasicAuth(_Model):
    username: MountedSecretRef
    password: MountedSecretRef


class AlertmanagerTarget(_Model):
    """Where silences go. Without url: the Alertmanager of the job's pool (spec.evidence.alertmanager)."""

    url: str | None = Field(None, max_length=MAX_URL, pattern=HTTP_URL)
    allow_private_endpoints: bool = Field(False, description="Let url be a loopback, private or link-local address.")
    allow_http: bool = Field(False, alias="allowHTTP", description="Let url use plain http (default: https only).")
    bearer_token_secret_ref: MountedSecretRef | None = None
    basic_auth: MountedBasicAuth | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!(has(self.bearerTokenSecretRef) && has(self.basicAuth))",
                 "message": "set at most one of bearerTokenSecretRef or basicAuth"}
            ]
        }
    )


MAX_SILENCE_SECONDS = 86400


class SilenceAction(_Model):
    """An Alertmanager silence for a false_positive alert: exact matchers on alertname, severity and the
    identity labels; one per target, renewed by later false_positive verdicts."""

    alertmanager: AlertmanagerTarget | None = None
    duration_seconds: int = Field(7200, ge=60, le=MAX_SILENCE_SECONDS, description="Default 2 h, at most 24 h.")


class WebhookNotification(_Model):
    """A JSON POST signed with HMAC-SHA256 (header X-Kubetriage-Signature), with an Idempotency-Key."""

    url: str = Field(max_length=MAX_URL, pattern=HTTP_URL)
    allow_private_endpoints: bool = False
    allow_http: bool = Field(False, alias="allowHTTP")
    signing_secret_ref: MountedSecretRef


class SlackNotification(_Model):
    """A Slack incoming webhook; its URL is a credential, so it comes from a mounted Secret."""

    url_secret_ref: MountedSecretRef
    allow_private_endpoints: bool = False
    allow_http: bool = Field(False, alias="allowHTTP")


class Notification(_Model):
    name: str = Field(max_length=63, pattern=DNS_LABEL)
    webhook: WebhookNotification | None = None
    slack: SlackNotification | None = None
    classifications: list[Classification] | None = Field(
        None, max_length=3, description="Verdict classes to notify on; default: the policy's.")
    min_confidence: float | None = Field(None, ge=0, le=1, description="Default: the policy's.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.webhook) != has(self.slack)", "message": "set exactly one of webhook or slack"}
            ]
        }
    )


class TriagePolicySpec(_Model):
    """What the operator does with the verdicts of the jobs it matches, in its own namespace only."""

    description: str | None = _str(512)
    mode: PolicyMode = Field(
        PolicyMode.SHADOW, json_schema_extra={"default": "shadow"},
        description="shadow (default): record what would be done, send nothing; enforce: do it.")
    match: RuleMatch = Field(default_factory=RuleMatch)
    classifications: list[Classification] = Field(
        default_factory=lambda: [Classification.FALSE_POSITIVE], min_length=1, max_length=3,
        json_schema_extra={"default": ["false_positive"]}, description="Verdict classes the policy acts on.")
    min_confidence: float = Field(0.9, ge=0, le=1, description="Verdicts below this confidence are left alone.")
    silence: SilenceAction | None = Field(None, description="Silence false_positive alerts in Alertmanager.")
    notify: list[Notification] | None = Field(None, max_length=8)


class TriagePolicyStatus(_Model):
    observed_generation: int | None = Field(None, ge=0)
    conditions: list[Condition] | None = Field(None, max_length=MAX_CONDITIONS)


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

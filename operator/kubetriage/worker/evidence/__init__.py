"""Evidence gatherers the worker runs before the analyzers: one module per source, one interface (``base``)."""

from __future__ import annotations

from kubetriage.analyzers.fetch import Resolver
from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.evidence import ALERTMANAGER, PROMETHEUS, Evidence
from kubetriage.api.urlpolicy import URLPolicy
from kubetriage.infra.config import Settings
from kubetriage.worker.evidence.alertmanager import AlertmanagerGatherer
from kubetriage.worker.evidence.base import Endpoint, EndpointClient, EvidenceRunner, Gatherer, GatherFailed
from kubetriage.worker.evidence.prometheus import PrometheusGatherer


def endpoint(settings: Settings, source: str, name: str) -> Endpoint | None:
    """The pool's ``spec.evidence.<source>`` as the worker's environment carries it; None when not configured."""
    url = getattr(settings, f"evidence_{source}_url")
    if not url:
        return None
    return Endpoint(
        name=name, field=f"the pool's spec.evidence.{source}", url=url,
        policy=URLPolicy(allow_http=getattr(settings, f"evidence_{source}_allow_http"),
                         allow_private=getattr(settings, f"evidence_{source}_allow_private_endpoints")),
        bearer_token=getattr(settings, f"evidence_{source}_bearer_token"),
        username=getattr(settings, f"evidence_{source}_username"),
        password=getattr(settings, f"evidence_{source}_password"),
        ca_pem=getattr(settings, f"evidence_{source}_ca"),
        insecure_skip_verify=getattr(settings, f"evidence_{source}_insecure_skip_verify"),
    )


class Misconfigured:
    """A source whose configuration cannot work (a CA that is not PEM): every job says so, the worker runs on."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason

    def key(self, request: AnalysisRequest) -> str:
        return ""

    async def gather(self, request: AnalysisRequest, now: float) -> Evidence | None:
        if request.alert is None:
            return None
        raise GatherFailed(self.reason, "invalid")

    async def aclose(self) -> None:
        return None


def from_settings(settings: Settings, *, resolver: Resolver | None = None) -> EvidenceRunner:
    """The gatherers of the worker's pool (none when the pool configures no evidence)."""
    gatherers: list[Gatherer] = []
    timeout = settings.evidence_timeout_seconds
    prom = endpoint(settings, "prometheus", "Prometheus")
    am = endpoint(settings, "alertmanager", "Alertmanager")
    try:
        if prom is not None:
            gatherers.append(PrometheusGatherer(EndpointClient(prom, timeout, resolver=resolver),
                                                any_expression=settings.evidence_prometheus_any_expression,
                                                rules_ttl=max(1.0, settings.evidence_cache_seconds)))
    except ValueError as exc:
        gatherers.append(Misconfigured(PROMETHEUS, str(exc)))
    try:
        if am is not None:
            gatherers.append(AlertmanagerGatherer(EndpointClient(am, timeout, resolver=resolver)))
    except ValueError as exc:
        gatherers.append(Misconfigured(ALERTMANAGER, str(exc)))
    return EvidenceRunner(gatherers, budget=settings.evidence_budget_seconds,
                          cache_seconds=settings.evidence_cache_seconds, pool=settings.pool)


__all__ = ["EvidenceRunner", "from_settings"]

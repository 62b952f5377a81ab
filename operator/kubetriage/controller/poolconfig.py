"""A TriagePool's analyzer settings that concern the outside world, judged when the pool is reconciled.

Two conditions on the pool, next to ``Ready``, written in the same status patch:

- ``LLMEndpointAllowed``: whether ``spec.analyzer.baseURL`` passes the outbound-URL policy
  (``kubetriage.api.urlpolicy``). The API key goes to that URL, so a pool pointing it at the cloud metadata
  address, a private address or plain http is told so here, naming the opt-in that would allow it
  (``allowPrivateEndpoints``, ``allowHTTP``). The workers check again at every connection (the name's
  addresses may change, and this check cannot resolve names), and never send the key to a refused address.
- ``RedactionPatternsValid``: whether every ``spec.analyzer.redactPatterns`` expression compiles (RE2); an
  expression that does not is skipped, the built-in patterns and the others still apply.

Both only depend on the spec, so they are rewritten when its generation changes, and kept otherwise
(their ``lastTransitionTime`` included). The workers receive the same settings in their environment.
"""

from __future__ import annotations

import json
from typing import Any

from kubetriage.api.models import Condition, TriagePoolSpec
from kubetriage.api.redact import pattern_problems
from kubetriage.api.urlpolicy import URLPolicy, URLRefused, check, describe
from kubetriage.controller.status import condition

LLM_ENDPOINT = "LLMEndpointAllowed"
REDACTION = "RedactionPatternsValid"
TYPES = (LLM_ENDPOINT, REDACTION)

_OPT_IN_HINTS = {
    "private": " Set spec.analyzer.allowPrivateEndpoints: true if it is a model server inside the cluster.",
    "http": " Set spec.analyzer.allowHTTP: true to allow plain http (a model server inside the cluster).",
}


def llm_policy(spec: TriagePoolSpec) -> URLPolicy:
    return URLPolicy(allow_http=bool(spec.analyzer.allow_http),
                     allow_private=bool(spec.analyzer.allow_private_endpoints))


def llm_endpoint(spec: TriagePoolSpec, generation: int | None) -> Condition:
    url = spec.analyzer.base_url
    if not url:
        return condition(LLM_ENDPOINT, True, "DefaultEndpoint",
                         "no spec.analyzer.baseURL: the workers use their default endpoint", generation)
    try:
        check(url, llm_policy(spec))
    except URLRefused as refused:
        return condition(LLM_ENDPOINT, False, "BaseURLRefused",
                         f"spec.analyzer.baseURL {describe(url)} is refused by the outbound-URL policy: "
                         f"{refused.reason}. The workers will not connect to it, nor send it the API key."
                         + _OPT_IN_HINTS.get(refused.opt_in or "", ""), generation)
    return condition(LLM_ENDPOINT, True, "Allowed",
                     f"spec.analyzer.baseURL {describe(url)} is allowed; the workers check its addresses again at "
                     "every connection", generation)


def redaction(spec: TriagePoolSpec, generation: int | None) -> Condition:
    problems = pattern_problems(spec.analyzer.redact_patterns or [])
    if problems:
        return condition(REDACTION, False, "InvalidPattern",
                         "; ".join(problems) + ". Those expressions are skipped; the built-in patterns and the "
                         "others still apply.", generation)
    n = len(spec.analyzer.redact_patterns or [])
    return condition(REDACTION, True, "Valid", f"built-in secret patterns and {n} expression(s) of this pool",
                     generation)


def _same(new: Condition, old: dict[str, Any] | None) -> bool:
    return old is not None and (old.get("status"), old.get("reason"), old.get("message")) == (
        new.status, new.reason, new.message)


def _existing(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in status.get("conditions") or [] if isinstance(c, dict)}


def current(spec: TriagePoolSpec, status: dict[str, Any], generation: int | None) -> bool:
    """True when the pool's status already says what these checks say (nothing to write)."""
    have = _existing(status)
    return all(_same(c, have.get(c.type)) for c in (llm_endpoint(spec, generation), redaction(spec, generation)))


def conditions(spec: TriagePoolSpec, status: dict[str, Any], generation: int | None,
               *others: Condition) -> list[Condition]:
    """The pool's whole condition list for one status write: ``others`` (``Ready``), then these checks.

    A merge patch replaces the list, so every writer of pool status builds it here. A check whose outcome
    did not change keeps its ``lastTransitionTime``.
    """
    have = _existing(status)
    out = list(others)
    for new in (llm_endpoint(spec, generation), redaction(spec, generation)):
        old = have.get(new.type)
        if _same(new, old) and old is not None and old.get("lastTransitionTime"):
            new = Condition.model_validate({**new.wire(), "lastTransitionTime": old["lastTransitionTime"]})
        out.append(new)
    return out


def worker_env(spec: TriagePoolSpec) -> list[dict[str, Any]]:
    """What the pool's workers need of these settings: the policy's opt-ins and the extra patterns."""
    a = spec.analyzer
    env = [
        {"name": "KUBETRIAGE_LLM_ALLOW_HTTP", "value": "true" if a.allow_http else "false"},
        {"name": "KUBETRIAGE_LLM_ALLOW_PRIVATE_ENDPOINTS", "value": "true" if a.allow_private_endpoints else "false"},
    ]
    if a.redact_patterns:
        env.append({"name": "KUBETRIAGE_REDACT_PATTERNS", "value": json.dumps(a.redact_patterns)})
    return env

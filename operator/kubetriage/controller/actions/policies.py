"""TriagePolicies: the per-namespace cache the recording of verdicts plans from, and each policy's
``Accepted`` condition (what would keep it from working: a Secret not mounted for its namespace, a URL the
outbound policy refuses, an expression that does not compile).

Like TriageRules: ``on.event`` (no annotations, no finalizer), one status write per generation, none for
the echo of our own write. The cache is also listed once before the first verdict is planned
(``ensure_loaded``), so a verdict recorded right after a restart is not planned without its policies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubetriage.api.models import API_VERSION, MountedSecretRef, TriagePolicyStatus
from kubetriage.api.policy import Policy
from kubetriage.api.regex import regex_problem
from kubetriage.api.urlpolicy import URLPolicy, URLRefused, check
from kubetriage.controller.actions import secrets
from kubetriage.controller.runtime import Runtime
from kubetriage.controller.status import condition, write_policy_status
from kubetriage.infra.kube import ApiError

log = logging.getLogger("kubetriage.controller.actions")

ACCEPTED = "Accepted"
LIST_TRIES = 10


async def ensure_loaded(rt: Runtime) -> None:
    """List the policies of the watched namespaces once (a missing CRD means there are none)."""
    cache = rt.policies
    if cache.loaded:
        return
    async with cache.lock:
        if cache.loaded:
            return
        namespaces = rt.settings.watched_namespaces
        paths = ([f"/apis/{API_VERSION}/namespaces/{ns}/triagepolicies" for ns in namespaces] if namespaces
                 else [f"/apis/{API_VERSION}/triagepolicies"])
        for path in paths:
            try:
                items = await _list(rt, path)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                log.warning("TriagePolicies not served by the API server (%s): no actions on verdicts until the "
                            "CRD is applied: kubectl apply --server-side -f crds/", exc)
                break
            for item in items:
                cache.observe(item)
        cache.loaded = True


async def _list(rt: Runtime, path: str) -> list[dict[str, Any]]:
    """The items at ``path``. The API server answers 429 "storage is (re)initializing" to the first requests
    for a resource whose cache is still being filled (right after it starts, or the CRD is applied): retried."""
    for attempt in range(LIST_TRIES):
        try:
            return list((await rt.kube.get(path)).get("items", []))
        except ApiError as exc:
            if exc.status != 429 or attempt == LIST_TRIES - 1:
                raise
            await asyncio.sleep(1.0)
    return []


def problems(rt: Runtime, policy: Policy) -> tuple[str, str] | None:
    """(reason, message) of the first thing that keeps the policy's actions from working; None: nothing."""
    spec, ns = policy.spec, policy.namespace
    if spec.match.error_regex is not None and (why := regex_problem(spec.match.error_regex)):
        return "InvalidRegex", f"{why}; the policy selects no job until spec.match.errorRegex is fixed"
    refs: list[tuple[str, MountedSecretRef]] = []
    urls: list[tuple[str, str, URLPolicy]] = []
    am = spec.silence.alertmanager if spec.silence else None
    if am is not None:
        if am.bearer_token_secret_ref:
            refs.append(("spec.silence.alertmanager.bearerTokenSecretRef", am.bearer_token_secret_ref))
        if am.basic_auth:
            refs += [("spec.silence.alertmanager.basicAuth.username", am.basic_auth.username),
                     ("spec.silence.alertmanager.basicAuth.password", am.basic_auth.password)]
        if am.url:
            urls.append(("spec.silence.alertmanager.url", am.url,
                         URLPolicy(allow_http=am.allow_http, allow_private=am.allow_private_endpoints)))
    for i, n in enumerate(spec.notify or []):
        if n.webhook is not None:
            refs.append((f"spec.notify[{i}].webhook.signingSecretRef", n.webhook.signing_secret_ref))
            urls.append((f"spec.notify[{i}].webhook.url", n.webhook.url,
                         URLPolicy(allow_http=n.webhook.allow_http, allow_private=n.webhook.allow_private_endpoints)))
        if n.slack is not None:
            refs.append((f"spec.notify[{i}].slack.urlSecretRef", n.slack.url_secret_ref))
    for where, ref in refs:
        if (why := secrets.problem(rt.settings, ns, ref)) is not None:
            return "SecretUnavailable", f"{where}: {why}"
    for where, url, url_policy in urls:
        try:
            check(url, url_policy)
        except URLRefused as refused:
            return "URLRefused", f"{where}: {refused.reason}"
    return None


async def reconcile(rt: Runtime, body: dict[str, Any]) -> None:
    """A policy was created, changed or re-listed: cache it, then write its Accepted condition if not yet done."""
    await ensure_loaded(rt)
    meta = body["metadata"]
    ns, name, uid, generation = meta["namespace"], meta["name"], meta.get("uid", ""), meta.get("generation")
    found = rt.policies.observe(body)
    if isinstance(found, str):
        ok, reason, message = False, "InvalidSpec", (f"{found}. This operator cannot use the policy; fix the "
                                                     "field, or upgrade the operator to the installed CRD")
    elif (problem := problems(rt, found)) is not None:
        ok, (reason, message) = False, problem
    else:
        spec = found.spec
        ok, reason = True, "Valid"
        message = (f"{spec.mode}: acts on {', '.join(spec.classifications)} verdicts at confidence >= "
                   f"{spec.min_confidence:g} of TriageJobs in namespace {ns} recorded from now on")
    if not ok:
        log.warning("TriagePolicy %s/%s: %s", ns, name, message)
    status = body.get("status") or {}
    if status.get("observedGeneration") == generation or rt.policies.written.get(uid) == generation:
        return
    if await write_policy_status(rt, ns, name, TriagePolicyStatus(
            observed_generation=generation, conditions=[condition(ACCEPTED, ok, reason, message, generation)])):
        rt.policies.written[uid] = generation


def forget(rt: Runtime, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    rt.policies.forget(meta["namespace"], meta["name"], meta.get("uid"))

"""Alertmanager silences (API v2) for false_positive alerts, and lifting them.

One silence per target: before creating one, the silences kubetriage made (``createdBy: kubetriage``) are
listed and an active one with exactly the same matchers is renewed in place (same id, a later end)
instead, so a re-firing alert, a crash between the POST and the status write, or two policies never make
a second one. Matchers are exact (``isRegex: false``), built by ``api.policy.silence_for``.

The Alertmanager and its credentials come from the policy's ``silence.alertmanager``, else from the job's
pool (``spec.evidence.alertmanager``, whose Secret must then be mounted into the operator as well: the
operator reads no Secret from the API).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from kubetriage.api import policy as pol
from kubetriage.api.contract import AnalysisRequest
from kubetriage.api.models import MountedBasicAuth, MountedSecretRef, TriageJobSpec
from kubetriage.api.timeutil import rfc3339
from kubetriage.api.urlpolicy import URLPolicy, describe
from kubetriage.controller.actions import secrets
from kubetriage.controller.actions.http import ActionFailed, request
from kubetriage.controller.actions.sinks import ActionSkipped, Context, Done

MAX_COMMENT = 1000


@dataclass(frozen=True)
class Target:
    url: str
    policy: URLPolicy
    headers: dict[str, str]
    auth: httpx.Auth | None


def target(ctx: Context) -> Target:
    """The Alertmanager to use and how to authenticate; ``ActionFailed`` when there is none."""
    ns = ctx.namespace
    am = ctx.policy.spec.silence.alertmanager if ctx.policy and ctx.policy.spec.silence else None
    if am is not None and am.url:
        bearer, basic = am.bearer_token_secret_ref, am.basic_auth
        url, url_policy = am.url, URLPolicy(allow_http=am.allow_http, allow_private=am.allow_private_endpoints)
        where = f"TriagePolicy {ctx.entry.policy} spec.silence.alertmanager"
    elif ctx.pool is not None and ctx.pool.evidence is not None and ctx.pool.evidence.alertmanager is not None:
        ep = ctx.pool.evidence.alertmanager
        # the pool names Secrets by the same name/key; the operator can only use them if they are mounted
        bearer = MountedSecretRef(name=ep.bearer_token_secret_ref.name, key=ep.bearer_token_secret_ref.key) \
            if ep.bearer_token_secret_ref else None
        basic = None
        if ep.basic_auth is not None:
            basic = MountedBasicAuth(
                username=MountedSecretRef(name=ep.basic_auth.username.name, key=ep.basic_auth.username.key),
                password=MountedSecretRef(name=ep.basic_auth.password.name, key=ep.basic_auth.password.key))
        url, url_policy = ep.url, URLPolicy(allow_http=ep.allow_http, allow_private=ep.allow_private_endpoints)
        where = "the pool's spec.evidence.alertmanager"
    else:
        raise ActionFailed("no Alertmanager: set spec.silence.alertmanager.url on the TriagePolicy, or "
                           "spec.evidence.alertmanager on the job's TriagePool", retry=False)
    headers: dict[str, str] = {"Accept": "application/json"}
    auth: httpx.Auth | None = None
    try:
        if bearer is not None:
            headers["Authorization"] = f"Bearer {secrets.read(ctx.settings, ns, bearer).strip()}"
        elif basic is not None:
            auth = httpx.BasicAuth(secrets.read(ctx.settings, ns, basic.username),
                                   secrets.read(ctx.settings, ns, basic.password))
    except secrets.SecretUnavailable as exc:
        raise ActionFailed(f"{where}: {exc}", retry=False) from None
    return Target(url.rstrip("/"), url_policy, headers, auth)


async def _call(ctx: Context, t: Target, method: str, path: str, body: object | None = None) -> object:
    content = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
    headers = {**t.headers, **({"Content-Type": "application/json"} if content is not None else {})}
    answer = await request(method, t.url + path, t.policy, timeout=ctx.settings.actions_timeout_seconds,
                           content=content, headers=headers, auth=t.auth, what="Alertmanager")
    return answer.json() if answer.body.strip() else None


def _comment(ctx: Context) -> str:
    reason = ctx.redact(ctx.verdict.reason) if ctx.verdict is not None else "false_positive"
    ref = f"TriageJob {ctx.namespace}/{ctx.name} (uid {ctx.job['metadata']['uid']}), TriagePolicy {ctx.entry.policy}"
    head = f"kubetriage: false positive: {ref}. "
    return (head + reason)[:MAX_COMMENT]


async def find(ctx: Context, t: Target, wanted: pol.SilenceSpec) -> dict[str, object] | None:
    """The active (or pending) silence kubetriage made with exactly these matchers, if there is one."""
    query = urllib.parse.urlencode([("filter", f'alertname="{wanted.alertname}"')])
    found = await _call(ctx, t, "GET", f"/api/v2/silences?{query}")
    for s in found if isinstance(found, list) else []:
        if not isinstance(s, dict) or s.get("createdBy") != pol.CREATED_BY:
            continue
        if (s.get("status") or {}).get("state") not in ("active", "pending"):
            continue
        if pol.silence_from_wire(s.get("matchers") or []) == wanted:
            return s
    return None


def _start(now: dt.datetime) -> str:
    """A start Alertmanager stores as sent, so that a renewal can send it back unchanged.

    Alertmanager renews a silence in place (same id) only when the start is unchanged, and it replaces a
    start in the past by its own clock (nanoseconds), which its API then returns rounded to milliseconds:
    a renewal would never match. A start a second ahead, in whole milliseconds, is stored as is.
    """
    ahead = now + dt.timedelta(seconds=1)
    return ahead.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ahead.microsecond // 1000:03d}Z"


class SilenceSink:
    action = "silence"

    async def run(self, ctx: Context) -> Done:
        try:
            alert = TriageJobSpec.model_validate(ctx.job.get("spec") or {}).alert
        except ValidationError:
            alert = None
        if alert is None or ctx.policy is None or ctx.policy.spec.silence is None:
            raise ActionSkipped("no silence: the job is not an alert, or the policy no longer silences")
        request_now = AnalysisRequest(uid=ctx.job["metadata"]["uid"], name=ctx.name, namespace=ctx.namespace,
                                      source=TriageJobSpec.model_validate(ctx.job["spec"]).source, alert=alert)
        guard = pol.guarded_by(ctx.rules, request_now, ctx.now)
        if guard is not None:  # a guard added after the verdict still wins: never a silence it covers
            raise ActionSkipped(f"no silence: TriageRule {guard} guards this job (neverDiscard)")
        identity = ctx.pool.analyzer.identity_labels if ctx.pool is not None else None
        wanted = pol.silence_for(alert, identity)
        if isinstance(wanted, str):
            raise ActionSkipped(f"no silence: {wanted}")
        t = target(ctx)
        until = ctx.now + dt.timedelta(seconds=ctx.policy.spec.silence.duration_seconds)
        body: dict[str, object] = {"matchers": wanted.wire(), "startsAt": _start(ctx.now),
                                   "endsAt": rfc3339(until), "createdBy": pol.CREATED_BY, "comment": _comment(ctx)}
        existing = await find(ctx, t, wanted)
        if existing is not None:
            # renewed in place: Alertmanager keeps the id when matchers and start are unchanged
            body["id"] = existing["id"]
            body["startsAt"] = existing["startsAt"]
        answer = await _call(ctx, t, "POST", "/api/v2/silences", body)
        sid = str((answer or {}).get("silenceID") or "") if isinstance(answer, dict) else ""
        if not sid:
            raise ActionFailed(f"Alertmanager answered no silenceID: {answer!r}"[:300], retry=True)
        verb = "renewed silence" if existing is not None and existing.get("id") == sid else "silenced"
        return Done(f"{verb} {ctx.redact(wanted.describe())} until {rfc3339(until)[:19]}Z in {describe(t.url)} "
                    f"(silence {sid})", silence_id=sid, silence_until=until)


class UnsilenceSink:
    action = "unsilence"

    async def run(self, ctx: Context) -> Done:
        sid = ctx.entry.silence_id
        if not sid:
            raise ActionSkipped("no silence id to lift")
        return Done(await expire(ctx, target(ctx), sid), silence_id=sid)


async def expire(ctx: Context, t: Target, sid: str) -> str:
    """Lift silence ``sid``; one that already ended, or is gone, counts as lifted."""
    quoted = urllib.parse.quote(sid, safe="")
    try:
        await _call(ctx, t, "DELETE", f"/api/v2/silence/{quoted}")
    except ActionFailed as failed:
        try:
            state = await _call(ctx, t, "GET", f"/api/v2/silence/{quoted}")
        except ActionFailed as lookup:
            if "answered 404" in lookup.message:
                return f"silence {sid} is gone from {describe(t.url)}"
            raise failed from None
        if isinstance(state, dict) and (state.get("status") or {}).get("state") == "expired":
            return f"silence {sid} had already ended"
        raise
    return f"lifted silence {sid} in {describe(t.url)}: {ctx.entry.message or ''}"[:1024]

"""Slack notifications through an incoming webhook (``{"text": ..., "blocks": [...]}``).

The webhook URL is itself the credential, so it comes from a Secret mounted into the operator
(``urlSecretRef``), never from the policy's spec. Retries as for the generic webhook; Slack has no
idempotency key, so a resend after a crash may post the message twice (never more than the retries).
"""

from __future__ import annotations

import json

from kubetriage.api.urlpolicy import URLPolicy
from kubetriage.controller.actions import secrets
from kubetriage.controller.actions.http import ActionFailed, request
from kubetriage.controller.actions.sinks import ActionSkipped, Context, Done, notification_payload, subject

MAX_TEXT = 2900  # Slack truncates a section's text at 3000 characters


def message(payload: dict[str, object]) -> dict[str, object]:
    v = payload.get("verdict") or {}
    assert isinstance(v, dict)
    job = payload["job"]
    assert isinstance(job, dict)
    head = (f"*{v.get('classification', '?')}* ({float(v.get('confidence') or 0):.2f}) for {subject(payload)} "
            f"by {v.get('analyzer', '?')}: TriageJob `{job['namespace']}/{job['name']}`")
    text = f"{head}\n{v.get('reason', '')}"[:MAX_TEXT]
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}


class SlackSink:
    action = "slack"

    async def run(self, ctx: Context) -> Done:
        if ctx.policy is None:
            raise ActionSkipped(f"TriagePolicy {ctx.entry.policy} was deleted before the notification was sent")
        n = next((n for n in ctx.policy.spec.notify or [] if n.name == ctx.entry.target and n.slack), None)
        if n is None or n.slack is None:
            raise ActionSkipped(f"TriagePolicy {ctx.policy.name} no longer has slack {ctx.entry.target}")
        try:
            url = secrets.read(ctx.settings, ctx.namespace, n.slack.url_secret_ref).strip()
        except secrets.SecretUnavailable as exc:
            raise ActionFailed(f"slack {n.name}: {exc}", retry=False) from None
        body = json.dumps(message(notification_payload(ctx)), separators=(",", ":")).encode()
        url_policy = URLPolicy(allow_http=n.slack.allow_http, allow_private=n.slack.allow_private_endpoints)
        # the URL is a credential: messages name the notification, never the URL
        answer = await request("POST", url, url_policy, timeout=ctx.settings.actions_timeout_seconds,
                               content=body, headers={"Content-Type": "application/json"}, what=f"slack {n.name}",
                               secret_url=True)
        return Done(f"posted to slack {n.name} ({answer.status})")

"""Generic webhook notifications: a JSON POST signed with HMAC-SHA256.

Headers a receiver checks:

- ``X-Kubetriage-Signature: sha256=<hex>``: HMAC-SHA256 with the policy's signing Secret over
  ``<X-Kubetriage-Timestamp>.<raw body>`` (the timestamp inside the MAC, so a captured request cannot be
  replayed later under a new time);
- ``X-Kubetriage-Timestamp``: Unix seconds when this try was sent;
- ``Idempotency-Key``: the job's uid and the verdict's classification. Every try of one verdict carries
  the same key (retries, and a resend after an operator crash), so a receiver that remembers keys acts once.

A 5xx, 408, 429, timeout or unreachable receiver is retried with backoff by the executor; any other
answer outside 2xx fails the action at once (a retry would get the same answer).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from kubetriage.api.urlpolicy import URLPolicy, describe
from kubetriage.controller.actions import secrets
from kubetriage.controller.actions.http import ActionFailed, request
from kubetriage.controller.actions.sinks import ActionSkipped, Context, Done, notification_payload

SIGNATURE_HEADER = "X-Kubetriage-Signature"
TIMESTAMP_HEADER = "X-Kubetriage-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class WebhookSink:
    action = "webhook"

    async def run(self, ctx: Context) -> Done:
        if ctx.policy is None:
            raise ActionSkipped(f"TriagePolicy {ctx.entry.policy} was deleted before the notification was sent")
        n = next((n for n in ctx.policy.spec.notify or [] if n.name == ctx.entry.target and n.webhook), None)
        if n is None or n.webhook is None:
            raise ActionSkipped(f"TriagePolicy {ctx.policy.name} no longer has webhook {ctx.entry.target}")
        try:
            key = secrets.read(ctx.settings, ctx.namespace, n.webhook.signing_secret_ref)
        except secrets.SecretUnavailable as exc:
            raise ActionFailed(f"webhook {n.name}: {exc}", retry=False) from None
        body = json.dumps(notification_payload(ctx), separators=(",", ":"), sort_keys=True).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: ctx.entry.key, TIMESTAMP_HEADER: ts,
                   SIGNATURE_HEADER: sign(key, ts, body)}
        url_policy = URLPolicy(allow_http=n.webhook.allow_http, allow_private=n.webhook.allow_private_endpoints)
        answer = await request("POST", n.webhook.url, url_policy, timeout=ctx.settings.actions_timeout_seconds,
                               content=body, headers=headers, what=f"webhook {n.name}")
        return Done(f"delivered to webhook {n.name} at {describe(n.webhook.url)} ({answer.status})")

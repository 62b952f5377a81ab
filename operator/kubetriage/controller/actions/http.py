"""Outbound requests of actions (Alertmanager, webhooks, Slack), under the shared outbound-URL policy.

The URL is checked, its name resolved and every address vetted (``kubetriage.api.urlpolicy``), then the
connection goes to the vetted address with the original name as Host and TLS server name, so a DNS answer
that changes in between cannot move it (the same scheme as the workers' ``analyzers.fetch.pin``, which the
operator may not import). No redirects, no proxy from the environment, answers read under a byte cap.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import httpx

from kubetriage.api import urlpolicy
from kubetriage.api.urlpolicy import URLPolicy, URLRefused, describe

USER_AGENT = "kubetriage-actions/0.1"
MAX_ANSWER_BYTES = 1024 * 1024


class ActionFailed(Exception):
    """An action could not be done. ``retry``: it may work later (5xx, timeout, unreachable)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        import json

        try:
            return json.loads(self.body)
        except ValueError:
            raise ActionFailed(f"the answer is not JSON: {self.body[:200]!r}", retry=False) from None


async def _pinned(url: str, policy: URLPolicy) -> tuple[str, dict[str, str], dict[str, Any]]:
    target = urlpolicy.check(url, policy)
    if target.literal is not None:
        address = target.literal
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                           proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise ActionFailed(f"DNS lookup of {target.host} failed: {exc}", retry=True) from None
        if not infos:
            raise ActionFailed(f"{target.host} does not resolve to any address", retry=True)
        address = urlpolicy.vet_addresses(target, [str(i[4][0]) for i in infos], policy)
    extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.literal is None else {}
    return target.pinned_url(address), {"Host": target.host_header}, extensions


async def request(method: str, url: str, policy: URLPolicy, *, timeout: float, content: bytes | None = None,
                  headers: dict[str, str] | None = None, auth: httpx.Auth | None = None,
                  what: str = "endpoint", secret_url: bool = False) -> Answer:
    """One request; ``ActionFailed`` for a refused URL (no retry), a network failure or a 5xx/429 (retry)
    and any other non-2xx answer (no retry). ``secret_url``: the URL is a credential (Slack's), so messages
    name ``what`` only."""
    shown = "" if secret_url else f" {describe(url)}"
    try:
        pinned, host, extensions = await _pinned(url, policy)
    except URLRefused as refused:
        hint = {"private": "; set allowPrivateEndpoints: true for an in-cluster endpoint",
                "http": "; set allowHTTP: true for plain http"}.get(refused.opt_in or "", "")
        raise ActionFailed(f"{what} URL{shown} refused by the outbound-URL policy, nothing sent: "
                           f"{refused.reason}{hint}", retry=False) from None
    sent = {"User-Agent": USER_AGENT, **(headers or {}), **host}
    try:
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=httpx.Timeout(timeout),
                                     auth=auth) as client:
            async with client.stream(method, pinned, content=content, headers=sent,
                                     extensions=extensions) as response:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        break
    except httpx.TimeoutException:
        raise ActionFailed(f"{what}{shown} did not answer within {timeout:g}s", retry=True) from None
    except httpx.HTTPError as exc:
        detail = "" if secret_url else f": {str(exc)[:200]}"
        raise ActionFailed(f"{what}{shown} unreachable: {type(exc).__name__}{detail}", retry=True) from None
    if response.status_code >= 300:
        retry = response.status_code >= 500 or response.status_code in (408, 429)
        detail = body[:200].decode(errors="replace").strip()
        raise ActionFailed(f"{what}{shown} answered {response.status_code}: {detail}", retry=retry)
    return Answer(response.status_code, body)

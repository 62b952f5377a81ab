"""Fetching untrusted URLs (report pages, screenshots) without becoming an SSRF proxy.

The URLs come from alert text and test output, which anyone who can make an
alert fire or a test print controls. Fetched naively from inside the cluster,
``http://169.254.169.254/latest/meta-data/`` hands out cloud credentials and
``http://10.0.0.5:6379/`` talks to internal services. So:

* the URL must pass the shared outbound-URL policy (``kubetriage.api.urlpolicy``,
  with plain ``http`` allowed here and internal addresses not): no userinfo
  (``http://example.com@127.0.0.1/`` is a classic parser-confusion trick, and
  credentials have no business in a report link); no backslashes, whitespace
  or control characters; no numeric host forms other than canonical IP
  literals (``http://2130706433/``, ``http://0x7f.1/`` are 127.0.0.1 to some
  resolvers);
* the host is resolved FIRST and every address it resolves to must be
  globally routable: loopback, RFC 1918, unique-local, link-local (the cloud
  metadata endpoint), CGNAT, unspecified, multicast, reserved and
  documentation ranges are refused, and so are IPv6 forms that embed such an
  IPv4 address (mapped, compatible, NAT64, 6to4) and Teredo;
* the connection goes to the vetted IP itself (the URL is rewritten to it,
  with the ``Host`` header and TLS SNI/certificate name of the original host),
  so a DNS answer that changes between the check and the connect (DNS
  rebinding) cannot move the request; environment proxies are ignored for the
  same reason. This step is ``pin``, which the LLM client uses for its base
  URL too, under the pool's own policy;
* redirects are followed by hand, at most ``max_redirects``, and every hop is
  vetted like the first; an ``https`` -> ``http`` downgrade is refused;
* the body is streamed under a byte cap and the whole exchange (DNS,
  redirects, body) under one deadline; the content type must be allowed.

Every failure is a ``FetchRefused`` with a reason fit for a verdict note or a
log line; it never echoes a whole URL's query string (it may carry tokens).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import httpx

from kubetriage.api import urlpolicy
from kubetriage.api.urlpolicy import Target, URLPolicy, URLRefused

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
IPAddress = urlpolicy.IPAddress

DEFAULT_MAX_REDIRECTS = 3
USER_AGENT = "kubetriage-fetch/0.1"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = urlpolicy.MAX_URL_LENGTH
# Report and screenshot links: plain http is common there, internal addresses never are.
FETCH_POLICY = URLPolicy(allow_http=True, allow_private=False)

# The address classification and the URL shape rules are the shared outbound-URL policy's.
address_problem = urlpolicy.address_problem
describe = urlpolicy.describe


class FetchRefused(Exception):
    """The URL was not fetched, or its answer was not accepted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LookupFailed(Exception):
    """The host name did not resolve (DNS down or the name unknown): a fault that may pass, not a refusal."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A fetched body: where it finally came from, what it is, and the hops taken to get there."""

    url: str
    content_type: str
    data: bytes
    address: str
    redirects: tuple[str, ...] = field(default_factory=tuple)
    charset: str | None = None


@dataclass(frozen=True, slots=True)
class Pinned:
    """A URL that passed the policy, bound to the one vetted address the connection must go to."""

    target: Target
    address: IPAddress

    @property
    def url(self) -> str:
        """What to hand the HTTP client: the URL with the vetted IP in place of the host."""
        return self.target.pinned_url(self.address)

    @property
    def headers(self) -> dict[str, str]:
        """The ``Host`` the server expects (the original name, not the IP)."""
        return {"Host": self.target.host_header}

    @property
    def extensions(self) -> dict[str, str]:
        """httpx/httpcore request extensions: TLS SNI and certificate check against the original name."""
        if self.target.scheme == "https" and self.target.literal is None:
            return {"sni_hostname": self.target.host}
        return {}


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's getaddrinfo, as a ``Resolver``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


async def pin(
    url: str,
    policy: URLPolicy,
    *,
    resolver: Resolver | None = None,
    exempt: Collection[tuple[str, int]] = frozenset(),
) -> Pinned:
    """The connect-time half of the outbound-URL policy: check, resolve, vet every address, pin one.

    Raises ``urlpolicy.URLRefused`` when the policy refuses the URL or any address its host resolves to,
    and ``LookupFailed`` when the name does not resolve. Connect to ``Pinned.url`` with
    ``Pinned.headers`` and ``Pinned.extensions``: the URL names the vetted address, so a DNS answer that
    changes between this check and the connection (DNS rebinding) cannot move the request, and TLS still
    checks the certificate against the original name. ``exempt``: exact ``(ip, port)`` pairs for tests only.
    """
    target = urlpolicy.check(url, policy, exempt)
    if target.literal is not None:
        return Pinned(target, target.literal)
    try:
        answers = await (resolver or system_resolver)(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        raise LookupFailed(f"DNS lookup of {target.host} failed: {exc}") from None
    if not answers:
        raise LookupFailed(f"{target.host} does not resolve to any address")
    return Pinned(target, urlpolicy.vet_addresses(target, answers, policy, exempt))


def _host_allowed(host: str, allow_hosts: Collection[str]) -> bool:
    """Exact names, or ``*.example.com`` for any subdomain (not the apex itself)."""
    for pattern in allow_hosts:
        p = pattern.strip().lower().rstrip(".")
        if p.startswith("*."):
            if host.endswith(p[1:]) and host != p[2:]:
                return True
        elif host == p:
            return True
    return False


def _caused_by_tls(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore, which wraps ssl
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _charset(value: str | None) -> str | None:
    for param in (value or "").split(";")[1:]:
        key, _, found = param.partition("=")
        if key.strip().lower() == "charset" and found.strip():
            return found.strip().strip('"').lower()[:40]
    return None


def _type_allowed(media_type: str, allowed: Collection[str]) -> bool:
    for pattern in allowed:
        p = pattern.strip().lower()
        if p == media_type or (p.endswith("/*") and media_type.startswith(p[:-1])):
            return True
    return False


async def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    allowed_content_types: Collection[str],
    allow_hosts: Collection[str] | None = None,
    resolver: Resolver | None = None,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    ssl_context: ssl.SSLContext | None = None,
    allow_private_for_tests: Collection[tuple[str, int]] = frozenset(),
) -> Fetched:
    """GET an untrusted URL under the rules in the module docstring, or raise ``FetchRefused``.

    ``allowed_content_types``: media types such as ``image/png`` or ``image/*``.
    ``allow_hosts``: when given, every hop's host must be listed (exact, or
    ``*.example.com``); it narrows what is fetched and never lifts the
    address checks. ``resolver(host, port)`` returns IP strings (default: the
    system's getaddrinfo). ``ssl_context``: a custom trust store for https.
    ``allow_private_for_tests``: exact ``(ip, port)`` pairs exempt from the
    address checks, so tests can serve files from loopback; production code
    must leave it empty, and a redirect to any other port or address is still
    refused.
    """
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    exempt = frozenset((str(ipaddress.ip_address(ip)), int(port)) for ip, port in allow_private_for_tests)
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(
                url, max_bytes, timeout, allowed_content_types, allow_hosts, resolver, max_redirects,
                ssl_context, exempt,
            )  # fmt: skip
    except TimeoutError:
        raise FetchRefused(f"timed out after {timeout:g}s fetching {describe(url)}") from None


async def _fetch(
    url: str,
    max_bytes: int,
    timeout: float,
    allowed_content_types: Collection[str],
    allow_hosts: Collection[str] | None,
    resolver: Resolver | None,
    max_redirects: int,
    ssl_context: ssl.SSLContext | None,
    exempt: frozenset[tuple[str, int]],
) -> Fetched:
    hops: list[str] = []
    current = url
    previous_scheme: str | None = None
    # trust_env=False: an HTTP(S)_PROXY from the environment would resolve the name itself,
    # and reach whatever it resolves to, behind the checks' back.
    async with httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        verify=ssl_context if ssl_context is not None else True,
        timeout=httpx.Timeout(timeout),
    ) as client:
        while True:
            try:
                target = urlpolicy.parse(current, FETCH_POLICY)
            except URLRefused as exc:
                raise FetchRefused(exc.reason) from None
            if previous_scheme == "https" and target.scheme == "http":
                raise FetchRefused(f"redirect downgrades https to http: {describe(current)}")
            if allow_hosts is not None and not _host_allowed(target.host, allow_hosts):
                raise FetchRefused(f"host {target.host} is not in the allowed hosts")
            try:
                pinned = await pin(current, FETCH_POLICY, resolver=resolver, exempt=exempt)
            except (URLRefused, LookupFailed) as exc:
                raise FetchRefused(str(exc)) from None
            ip = pinned.address
            headers = {
                **pinned.headers,
                "User-Agent": USER_AGENT,
                "Accept": ", ".join(allowed_content_types) or "*/*",
                # Compressed bodies would be inflated past the byte cap's intent before we count them.
                "Accept-Encoding": "identity",
            }
            try:
                async with client.stream("GET", pinned.url, headers=headers,
                                         extensions=pinned.extensions) as response:
                    if response.status_code in REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise FetchRefused(f"HTTP {response.status_code} redirect without a Location")
                        if len(hops) >= max_redirects:
                            raise FetchRefused(f"more than {max_redirects} redirects, last to {describe(location)}")
                        hops.append(current)
                        previous_scheme = target.scheme
                        # Joined against the URL as the user wrote it, not the pinned IP form.
                        current = urllib.parse.urljoin(current, location)
                        continue
                    if response.status_code != 200:
                        raise FetchRefused(f"HTTP {response.status_code} from {describe(current)}")
                    media_type = _media_type(response.headers.get("content-type"))
                    if not media_type or not _type_allowed(media_type, allowed_content_types):
                        raise FetchRefused(
                            f"content type {media_type or '(none)'!r} is not allowed "
                            f"(allowed: {', '.join(sorted(allowed_content_types))}): {describe(current)}"
                        )
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise FetchRefused(f"body of {declared} bytes exceeds the {max_bytes}-byte cap")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise FetchRefused(f"body exceeds the {max_bytes}-byte cap: {describe(current)}")
                    return Fetched(
                        url=current,
                        content_type=media_type,
                        data=bytes(body),
                        address=str(ip),
                        redirects=tuple(hops),
                        charset=_charset(response.headers.get("content-type")),
                    )
            except httpx.HTTPError as exc:
                kind = "TLS verification failed" if _caused_by_tls(exc) else "request failed"
                detail = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise FetchRefused(f"{kind} for {describe(current)}: {detail}") from None

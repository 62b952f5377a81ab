"""Fetching untrusted URLs (report pages, screenshots) without becoming an SSRF proxy.

The URLs come from alert text and test output, which anyone who can make an
alert fire or a test print controls. Fetched naively from inside the cluster,
``http://169.254.169.254/latest/meta-data/`` hands out cloud credentials and
``http://10.0.0.5:6379/`` talks to internal services. So:

* only ``http`` and ``https``; no userinfo (``http://example.com@127.0.0.1/``
  is a classic parser-confusion trick, and credentials have no business in a
  report link); no backslashes, whitespace or control characters; no numeric
  host forms other than canonical IP literals (``http://2130706433/``,
  ``http://0x7f.1/`` are 127.0.0.1 to some resolvers);
* the host is resolved FIRST and every address it resolves to must be
  globally routable: loopback, RFC 1918, unique-local, link-local (the cloud
  metadata endpoint), CGNAT, unspecified, multicast, reserved and
  documentation ranges are refused, and so are IPv6 forms that embed such an
  IPv4 address (mapped, compatible, NAT64, 6to4) and Teredo;
* the connection goes to the vetted IP itself (the URL is rewritten to it,
  with the ``Host`` header and TLS SNI/certificate name of the original host),
  so a DNS answer that changes between the check and the connect (DNS
  rebinding) cannot move the request; environment proxies are ignored for the
  same reason;
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
import re
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import httpx

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_MAX_REDIRECTS = 3
USER_AGENT = "kubetriage-fetch/0.1"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = 2048

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_METADATA = ipaddress.ip_address("169.254.169.254")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_HOST_CHARS = re.compile(r"^[a-z0-9_.-]{1,253}$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class FetchRefused(Exception):
    """The URL was not fetched, or its answer was not accepted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
class _Target:
    scheme: str
    host: str  # IDNA ASCII, lower case, or the IP literal without brackets
    port: int
    path: str  # path and query, never empty
    literal: IPAddress | None

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.literal, ipaddress.IPv6Address) else self.host
        return host if self.default_port else f"{host}:{self.port}"


def describe(url: str) -> str:
    """The URL without userinfo, query or fragment: enough to name it, nothing secret."""
    try:
        parts = urllib.parse.urlsplit(url[:MAX_URL_LENGTH])
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparseable URL)"
    path = parts.path[:120]
    return f"{parts.scheme}://{host}{port}{path}" if parts.scheme else path or "(empty URL)"


def address_problem(ip: IPAddress) -> str | None:
    """Why a connection to ``ip`` is refused ("a loopback address", ...), or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: tuple[str, ipaddress.IPv4Address] | None = None
        if ip.ipv4_mapped is not None:
            embedded = ("an IPv4-mapped IPv6 form", ip.ipv4_mapped)
        elif ip in _IPV4_COMPATIBLE and not ip.is_unspecified and not ip.is_loopback:
            return "a deprecated IPv4-compatible IPv6 address"
        elif any(ip in net for net in _NAT64):
            embedded = ("a NAT64 form", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        elif ip.sixtofour is not None:
            embedded = ("a 6to4 form", ip.sixtofour)
        elif ip.teredo is not None:
            return "a Teredo tunnel address"
        if embedded is not None:
            form, inner = embedded
            problem = address_problem(inner)
            return f"{form} of {inner}, {problem}" if problem else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip == _METADATA:
        return "a link-local address (the cloud metadata endpoint)"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if ip.is_private:
        return "a private or special-purpose address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-global address"
    return None


def _parse(url: str) -> _Target:
    """Split and check a URL with one parser; the request is built from these parts only."""
    if len(url) > MAX_URL_LENGTH:
        raise FetchRefused(f"URL longer than {MAX_URL_LENGTH} characters")
    if _BAD_URL_CHARS.search(url):
        raise FetchRefused(f"URL contains whitespace, a control character or a backslash: {describe(url)}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchRefused(f"malformed URL ({exc}): {describe(url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(f"scheme {scheme or '(none)'!r} is not allowed; only http and https")
    if "@" in parts.netloc:
        raise FetchRefused(f"URL carries userinfo (user@host), refused: {describe(url)}")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise FetchRefused("URL has no host")
    literal: IPAddress | None = None
    if raw_host.startswith("[") or ":" in raw_host or "%" in raw_host:
        try:
            literal = ipaddress.IPv6Address(raw_host.strip("[]"))
        except ValueError:
            raise FetchRefused(f"invalid IPv6 host: {describe(url)}") from None
        if literal.scope_id:
            raise FetchRefused("IPv6 host with a zone id, refused")
        host = str(literal)
    else:
        try:
            host = raw_host.encode("idna").decode("ascii").lower().rstrip(".")
        except UnicodeError:
            raise FetchRefused(f"host is not a valid internationalised name: {describe(url)}") from None
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = None
        if literal is None:
            if not _HOST_CHARS.match(host) or ".." in host or host.startswith((".", "-")):
                raise FetchRefused(f"invalid host name {host[:80]!r}")
            labels = host.split(".")
            # Shorthand, octal, hex and integer IPv4 forms are resolved differently by different
            # libraries; only the canonical dotted quad is an IP here, anything numeric-looking is refused.
            if _NUMERIC_LABEL.match(labels[-1]) or all(_NUMERIC_LABEL.match(lab) for lab in labels):
                raise FetchRefused(f"ambiguous numeric host {host[:80]!r}; use a dotted-quad IP or a name")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path, literal)


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


async def _system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


async def _vetted_address(
    target: _Target, resolver: Resolver | None, exempt: Collection[tuple[str, int]]
) -> IPAddress:
    """The address to connect to; every address the host has must pass, not just the first."""
    if target.literal is not None:
        candidates: list[IPAddress] = [target.literal]
    else:
        try:
            answers = await (resolver or _system_resolver)(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise FetchRefused(f"DNS lookup of {target.host} failed: {exc}") from None
        candidates = []
        for answer in answers:
            try:
                # A scope id (fe80::1%eth0) only ever comes with link-local, refused below anyway.
                candidates.append(ipaddress.ip_address(str(answer).split("%", 1)[0]))
            except ValueError:
                raise FetchRefused(f"resolver returned a non-address for {target.host}") from None
        if not candidates:
            raise FetchRefused(f"{target.host} does not resolve to any address")
    for ip in candidates:
        problem = address_problem(ip)
        if problem and (str(ip), target.port) not in exempt:
            via = "" if target.literal is not None else f"{target.host} resolves to "
            raise FetchRefused(f"{via}{ip}: {problem}; refused")
    return candidates[0]


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
            target = _parse(current)
            if previous_scheme == "https" and target.scheme == "http":
                raise FetchRefused(f"redirect downgrades https to http: {describe(current)}")
            if allow_hosts is not None and not _host_allowed(target.host, allow_hosts):
                raise FetchRefused(f"host {target.host} is not in the allowed hosts")
            ip = await _vetted_address(target, resolver, exempt)
            pinned = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
            request_url = f"{target.scheme}://{pinned}:{target.port}{target.path}"
            headers = {
                "Host": target.host_header,
                "User-Agent": USER_AGENT,
                "Accept": ", ".join(allowed_content_types) or "*/*",
                # Compressed bodies would be inflated past the byte cap's intent before we count them.
                "Accept-Encoding": "identity",
            }
            extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.literal is None else {}
            try:
                async with client.stream("GET", request_url, headers=headers, extensions=extensions) as response:
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

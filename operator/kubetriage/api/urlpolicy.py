"""The one outbound-URL policy: which URLs kubetriage may connect to, decided without any I/O.

Every URL kubetriage connects to that a user or an alert can influence goes through here: a pool's
LLM base URL (``spec.analyzer.baseURL``), report and screenshot links (``analyzers.fetch``), and the
evidence endpoints (Prometheus, Alertmanager). The rules:

* **scheme**: ``https`` only, unless the policy allows ``http`` (``URLPolicy.allow_http``); nothing else
  ever (``file:``, ``gopher:``, ...);
* **shape**: no userinfo (``http://example.com@10.0.0.1/`` is a parser-confusion trick, and
  credentials belong in a Secret); no backslash, whitespace or control character; no numeric host
  other than a canonical IP literal (``http://2130706433/`` and ``http://0x7f.1/`` are 127.0.0.1 to some
  resolvers); no IPv6 zone id;
* **addresses**: the host's address, or every address its name resolves to, must be public unicast.
  Loopback, RFC 1918, unique-local, link-local and carrier-grade NAT addresses are *internal*: refused
  unless the policy opts in (``URLPolicy.allow_private``, for an in-cluster model server or Prometheus).
  Cloud metadata endpoints (169.254.169.254 and its kin), unspecified, multicast, reserved and
  documentation addresses are refused even then. IPv6 forms that embed an IPv4 address (IPv4-mapped,
  NAT64, 6to4) are judged by the address they embed; IPv4-compatible and Teredo forms are refused.

This module is pure: ``check(url, policy)`` judges what can be known from the URL alone (the scheme, its
shape, an IP literal, and the well-known names ``localhost`` and ``metadata.google.internal``), which is
what a controller validates when a resource is reconciled. The connect-time half (resolve the name, vet
*every* address with ``vet_addresses``, then connect to the vetted address itself so a changed DNS answer
cannot move the request) needs the network, so it lives with the HTTP clients:
``kubetriage.analyzers.fetch.pin``.

Every refusal is a ``URLRefused`` whose ``reason`` is fit for a status condition or a log line (it never
echoes a query string, which may carry a token) and whose ``opt_in`` says which opt-in would allow the
URL (``"http"`` or ``"private"``), or ``None`` when nothing would. Callers name their own field for it::

    try:
        urlpolicy.check(url, URLPolicy(allow_http=spec.allow_http, allow_private=spec.allow_private))
    except URLRefused as refused:
        hint = {"http": "set allowHTTP: true", "private": "set allowPrivateEndpoints: true"}.get(refused.opt_in)
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
OptIn = Literal["http", "private"]

MAX_URL_LENGTH = 2048

_METADATA = ipaddress.ip_address("169.254.169.254")
# Instance and task metadata services: credentials for the asking, never a model server or a Prometheus.
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.170.23",  # AWS EKS Pod Identity agent
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "fd00:ec2::23",  # AWS EKS Pod Identity agent over IPv6
))
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog"})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_INTERNAL_V4 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_HOST_CHARS = re.compile(r"^[a-z0-9_.-]{1,253}$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


class URLRefused(ValueError):
    """A URL the policy does not allow; ``reason`` says why, ``opt_in`` what would allow it (or None)."""

    def __init__(self, reason: str, opt_in: OptIn | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.opt_in: OptIn | None = opt_in


@dataclass(frozen=True, slots=True)
class URLPolicy:
    """What a caller allows beyond public ``https``. Both opt-ins are off by default."""

    allow_http: bool = False
    # Loopback, private, link-local and CGNAT addresses (an in-cluster server); never metadata endpoints.
    allow_private: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """A URL as the policy read it: the request is built from these parts only, never from the raw text."""

    scheme: str
    host: str  # IDNA ASCII in lower case, or the IP literal without brackets
    port: int
    path: str  # path and query, never empty
    literal: IPAddress | None  # the host, when it is an IP literal

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def host_header(self) -> str:
        """The ``Host`` header for this target (what the server sees when we connect to a pinned address)."""
        host = f"[{self.host}]" if isinstance(self.literal, ipaddress.IPv6Address) else self.host
        return host if self.default_port else f"{host}:{self.port}"

    def pinned_url(self, ip: IPAddress) -> str:
        """The URL with its host replaced by the vetted address: the connection can go nowhere else."""
        host = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)
        return f"{self.scheme}://{host}:{self.port}{self.path}"


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


# --------------------------------------------------------------------------- addresses


def _classify(ip: IPAddress) -> tuple[str, bool] | None:
    """(why the address is not public, whether it is internal, i.e. allowed by the private opt-in); None if public."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: tuple[str, ipaddress.IPv4Address] | None = None
        if ip in _METADATA_ADDRESSES:
            return "a cloud metadata endpoint", False
        if ip.ipv4_mapped is not None:
            embedded = ("an IPv4-mapped IPv6 form", ip.ipv4_mapped)
        elif ip in _IPV4_COMPATIBLE and not ip.is_unspecified and not ip.is_loopback:
            return "a deprecated IPv4-compatible IPv6 address", False
        elif any(ip in net for net in _NAT64):
            embedded = ("a NAT64 form", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        elif ip.sixtofour is not None:
            embedded = ("a 6to4 form", ip.sixtofour)
        elif ip.teredo is not None:
            return "a Teredo tunnel address", False
        if embedded is not None:
            form, inner = embedded
            found = _classify(inner)
            return (f"{form} of {inner}, {found[0]}", found[1]) if found else None
    if ip.is_unspecified:
        return "an unspecified address", False
    if ip.is_loopback:
        return "a loopback address", True
    if ip == _METADATA:
        return "a link-local address (the cloud metadata endpoint)", False
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata endpoint", False
    if ip.is_link_local:
        return "a link-local address", True
    if ip.is_multicast:
        return "a multicast address", False
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)", True
    if (any(ip in net for net in _INTERNAL_V4) if isinstance(ip, ipaddress.IPv4Address) else ip in _UNIQUE_LOCAL):
        return "a private address", True
    if ip.is_private:
        return "a private or special-purpose address", False
    if ip.is_reserved:
        return "a reserved address", False
    if not ip.is_global:
        return "a non-global address", False
    return None


def address_problem(ip: IPAddress, policy: URLPolicy | None = None) -> str | None:
    """Why ``policy`` refuses a connection to ``ip`` ("a loopback address", ...); None when it allows it.

    Without a policy: the strict one, which allows public unicast addresses only.
    """
    found = _classify(ip)
    if found is None:
        return None
    problem, internal = found
    return None if internal and policy is not None and policy.allow_private else problem


def _refusal(ip: IPAddress, policy: URLPolicy, via: str) -> URLRefused | None:
    found = _classify(ip)
    if found is None or (found[1] and policy.allow_private):
        return None
    return URLRefused(f"{via}{ip}: {found[0]}; refused", "private" if found[1] else None)


def vet_addresses(target: Target, addresses: Iterable[str | IPAddress], policy: URLPolicy,
                  exempt: Collection[tuple[str, int]] = ()) -> IPAddress:
    """The address to connect to, after checking *every* address the host has (a client may pick any).

    ``addresses``: the IP literal, or what the name resolved to (a scope id such as ``%eth0`` is dropped:
    it only comes with link-local addresses, judged as such). ``exempt``: exact ``(ip, port)`` pairs the
    address checks skip, for tests serving from loopback; production callers pass nothing.
    Raises ``URLRefused`` naming the first refused address.
    """
    candidates: list[IPAddress] = []
    for answer in addresses:
        try:
            candidates.append(answer if isinstance(answer, ipaddress.IPv4Address | ipaddress.IPv6Address)
                              else ipaddress.ip_address(str(answer).split("%", 1)[0]))
        except ValueError:
            raise URLRefused(f"resolver returned a non-address for {target.host}") from None
    if not candidates:
        raise URLRefused(f"{target.host} does not resolve to any address")
    via = "" if target.literal is not None else f"{target.host} resolves to "
    for ip in candidates:
        refused = _refusal(ip, policy, via)
        if refused is not None and (str(ip), target.port) not in exempt:
            raise refused
    return candidates[0]


# --------------------------------------------------------------------------- URLs


def parse(url: str, policy: URLPolicy) -> Target:
    """Split and check a URL with one parser: scheme and shape, no address check. Raises ``URLRefused``."""
    if len(url) > MAX_URL_LENGTH:
        raise URLRefused(f"URL longer than {MAX_URL_LENGTH} characters")
    if _BAD_URL_CHARS.search(url):
        raise URLRefused(f"URL contains whitespace, a control character or a backslash: {describe(url)}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise URLRefused(f"malformed URL ({exc}): {describe(url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise URLRefused(f"scheme {scheme or '(none)'!r} is not allowed; only http and https")
    if scheme == "http" and not policy.allow_http:
        raise URLRefused(f"plain http is not allowed, only https: {describe(url)}", "http")
    if "@" in parts.netloc:
        raise URLRefused(f"URL carries userinfo (user@host), refused: {describe(url)}")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise URLRefused("URL has no host")
    literal: IPAddress | None = None
    if raw_host.startswith("[") or ":" in raw_host or "%" in raw_host:
        try:
            literal = ipaddress.IPv6Address(raw_host.strip("[]"))
        except ValueError:
            raise URLRefused(f"invalid IPv6 host: {describe(url)}") from None
        if literal.scope_id:
            raise URLRefused("IPv6 host with a zone id, refused")
        host = str(literal)
    else:
        try:
            host = raw_host.encode("idna").decode("ascii").lower().rstrip(".")
        except UnicodeError:
            raise URLRefused(f"host is not a valid internationalised name: {describe(url)}") from None
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            literal = None
        if literal is None:
            if not _HOST_CHARS.match(host) or ".." in host or host.startswith((".", "-")):
                raise URLRefused(f"invalid host name {host[:80]!r}")
            labels = host.split(".")
            # Shorthand, octal, hex and integer IPv4 forms are resolved differently by different
            # libraries; only the canonical dotted quad is an IP here, anything numeric-looking is refused.
            if _NUMERIC_LABEL.match(labels[-1]) or all(_NUMERIC_LABEL.match(lab) for lab in labels):
                raise URLRefused(f"ambiguous numeric host {host[:80]!r}; use a dotted-quad IP or a name")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path, literal)


def _known_name(target: Target, policy: URLPolicy) -> None:
    """Names whose address is known without asking DNS (RFC 6761 ``localhost``, the GCP metadata server)."""
    if target.host in _METADATA_NAMES:
        raise URLRefused(f"{target.host} is the cloud metadata endpoint; refused")
    if (target.host == "localhost" or target.host.endswith(".localhost")) and not policy.allow_private:
        raise URLRefused(f"{target.host} is a loopback name; refused", "private")


def check(url: str, policy: URLPolicy, exempt: Collection[tuple[str, int]] = ()) -> Target:
    """Everything the policy can say about ``url`` without DNS; the connect-time check must still follow.

    For configuration time (a resource being reconciled): the scheme and shape, an IP literal's address,
    and the well-known names. A name that passes here is resolved and vetted when connecting (the
    connect-time check starts with this one). ``exempt``: as for ``vet_addresses``.
    """
    target = parse(url, policy)
    if target.literal is not None:
        vet_addresses(target, [target.literal], policy, exempt)
    else:
        _known_name(target, policy)
    return target

"""SSRF-safe fetching against real local HTTP(S) servers, with every outgoing connection observed.

"No request left" is checked three ways: the trap server (a real listener on
loopback that a bypass would reach) records nothing, the injected resolver
records what was looked up, and a Python audit hook records every
``socket.connect`` and ``socket.getaddrinfo`` the process makes (stdlib
instrumentation, not a mock: the sockets are real). Every refusal test runs
with ``allow_private_for_tests`` empty; only the tests that need a first hop
on loopback exempt exactly that server's (ip, port).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kubetriage.analyzers.fetch import Fetched, FetchRefused, address_problem, fetch
from tests.localhttp import LocalHTTPServer, Route

PNG_TYPES = ("image/png", "image/jpeg")
BODY = b"\x89PNG\r\n\x1a\n not really, but the fetcher does not decode"


# --------------------------------------------------------------------------- observation


class _Audit:
    """Process-wide record of socket connects and DNS lookups while ``active``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = False
        self.connects: list[Any] = []
        self.lookups: list[str] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "socket.connect":
            with self.lock:
                self.connects.append(args[1])
        elif event == "socket.getaddrinfo":
            with self.lock:
                self.lookups.append(str(args[0]))


_AUDIT = _Audit()
sys.addaudithook(_AUDIT.hook)  # cannot be removed; it records only while a test has it active


@pytest.fixture
def net() -> Iterator[_Audit]:
    with _AUDIT.lock:
        _AUDIT.connects.clear()
        _AUDIT.lookups.clear()
    _AUDIT.active = True
    try:
        yield _AUDIT
    finally:
        _AUDIT.active = False


class RecordingResolver:
    """A DNS stand-in for names the test machine cannot resolve: answers from a table, records each question."""

    def __init__(self, table: dict[str, Sequence[str] | list[Sequence[str]]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise OSError(f"no such host {host}")
        if answer and isinstance(answer[0], list | tuple):
            # A list of answers: one per lookup, in order (DNS rebinding).
            index = min(self.asked.count(host) - 1, len(answer) - 1)
            return list(answer[index])
        return list(answer)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as s:
        s.route("/shot.png", Route(BODY, headers={"Content-Type": "image/png"}))
        yield s


@pytest.fixture
def trap() -> Iterator[LocalHTTPServer]:
    """A listener a bypass would reach; every test using it asserts it saw nothing."""
    with LocalHTTPServer() as s:
        s.route("/", Route(b"secret", headers={"Content-Type": "image/png"}))
        yield s


async def get(url: str, **kw: Any) -> Fetched:
    options: dict[str, Any] = {"max_bytes": 1 << 20, "timeout": 10, "allowed_content_types": PNG_TYPES}
    options.update(kw)
    return await fetch(url, **options)


def connected_ports(audit: _Audit) -> set[int]:
    return {addr[1] for addr in audit.connects if isinstance(addr, tuple) and len(addr) >= 2}


# --------------------------------------------------------------------------- the happy path


async def test_fetches_from_the_exempted_test_server_with_host_header(server: LocalHTTPServer, net: _Audit) -> None:
    got = await get(server.url("/shot.png"), allow_private_for_tests=server.exempt)
    assert got.data == BODY
    assert got.content_type == "image/png"
    assert got.address == "127.0.0.1"
    assert got.redirects == ()
    assert server.seen[-1].headers["host"] == f"127.0.0.1:{server.port}"
    assert server.seen[-1].headers["accept-encoding"] == "identity"
    assert connected_ports(net) == {server.port}


async def test_exemption_is_exact_to_the_port(server: LocalHTTPServer, trap: LocalHTTPServer, net: _Audit) -> None:
    with pytest.raises(FetchRefused, match="loopback"):
        await get(trap.url("/"), allow_private_for_tests=server.exempt)
    assert trap.seen == []
    assert net.connects == []


# --------------------------------------------------------------------------- address refusals


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("http://127.0.0.1:{trap}/", "loopback"),
        ("http://10.1.2.3/report.png", "private"),
        ("http://192.168.1.10/report.png", "private"),
        ("http://172.16.5.4/report.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://169.254.10.1/", "link-local"),
        ("http://[::1]:{trap}/", "loopback"),
        ("http://[::ffff:127.0.0.1]:{trap}/", "IPv4-mapped"),
        ("http://[::ffff:169.254.169.254]/latest/meta-data", "IPv4-mapped"),
        ("http://0.0.0.0:{trap}/", "unspecified"),
        ("http://[::]:{trap}/", "unspecified"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fc00::1]/", "private"),
        ("http://[fd12:3456::1]/", "private"),
        ("http://192.0.2.10/", "special-purpose"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://240.0.0.1/", "special-purpose|reserved"),
        ("http://[64:ff9b::7f00:1]/", "NAT64"),
        ("http://[2002:7f00:1::]/", "6to4"),
        ("http://[::127.0.0.1]/", "IPv4-compatible"),
        ("http://2130706433:{trap}/", "ambiguous numeric"),
        ("http://0x7f.0.0.1:{trap}/", "ambiguous numeric"),
        ("http://127.1:{trap}/", "ambiguous numeric"),
        ("http://017700000001:{trap}/", "ambiguous numeric"),
        ("http://0177.0.0.1:{trap}/", "ambiguous numeric"),
    ],
)
async def test_private_and_special_addresses_are_refused_before_any_connection(
    template: str, why: str, trap: LocalHTTPServer, net: _Audit
) -> None:
    resolver = RecordingResolver({})
    with pytest.raises(FetchRefused, match=why):
        await get(template.format(trap=trap.port), resolver=resolver)
    assert trap.seen == []
    assert net.connects == []
    assert resolver.asked == []  # IP literals and numeric tricks are never sent to DNS


@pytest.mark.parametrize(
    "answers",
    [
        ["10.0.0.7"],
        ["127.0.0.1"],
        ["169.254.169.254"],
        ["::1"],
        ["::ffff:10.0.0.1"],
        # One bad address among good ones is enough: the client may pick any of them.
        ["93.184.216.34", "127.0.0.1"],
        ["2606:4700::6810:84e5", "fd00::1"],
    ],
)
async def test_public_looking_name_resolving_to_a_private_address_is_refused(
    answers: list[str], net: _Audit
) -> None:
    resolver = RecordingResolver({"reports.example.com": answers})
    with pytest.raises(FetchRefused, match=r"reports\.example\.com resolves to") as refused:
        await get("https://reports.example.com/run/42/report.png", resolver=resolver)
    assert resolver.asked == ["reports.example.com"]
    assert net.connects == []
    bad = ipaddress.ip_address(next(a for a in answers if address_problem(ipaddress.ip_address(a))))
    assert str(bad) in refused.value.reason


async def test_unresolvable_and_empty_answers_are_refused(net: _Audit) -> None:
    resolver = RecordingResolver({"empty.example.com": []})
    with pytest.raises(FetchRefused, match="does not resolve"):
        await get("http://empty.example.com/x.png", resolver=resolver)
    with pytest.raises(FetchRefused, match=r"DNS lookup of nowhere\.example\.com failed"):
        await get("http://nowhere.example.com/x.png", resolver=resolver)
    assert net.connects == []


def test_public_addresses_pass_the_address_check() -> None:
    for text in ("93.184.216.34", "8.8.8.8", "2606:4700::6810:84e5", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert address_problem(ipaddress.ip_address(text)) is None, text


# --------------------------------------------------------------------------- URL tricks


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme 'gopher'"),
        ("ftp://files.example.com/report.png", "scheme 'ftp'"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("//127.0.0.1/x.png", "scheme '\\(none\\)'"),
        ("http://example.com@127.0.0.1:{trap}/", "userinfo"),
        ("http://127.0.0.1:{trap}@example.com/", "userinfo"),
        ("http://user:pass@example.com/x.png", "userinfo"),
        ("http://example.com\\@127.0.0.1:{trap}/", "backslash"),
        ("http://example.com /x.png", "whitespace"),
        ("http://exa\x00mple.com/x.png", "control character"),
        ("http://[::1/x.png", "malformed|invalid"),
        ("http://example.com:99999/x.png", "malformed"),
        ("http:///x.png", "no host"),
        ("http://exa$mple.com/x.png", "invalid host"),
        ("http://[fe80::1%25eth0]/x.png", "zone id|link-local|invalid"),
    ],
)
async def test_schemes_userinfo_and_malformed_urls_are_refused(
    url: str, why: str, trap: LocalHTTPServer, net: _Audit
) -> None:
    resolver = RecordingResolver({"example.com": ["93.184.216.34"], "files.example.com": ["93.184.216.34"]})
    with pytest.raises(FetchRefused, match=why):
        await get(url.format(trap=trap.port), resolver=resolver)
    assert trap.seen == []
    assert net.connects == []
    assert resolver.asked == []


async def test_refusal_reason_does_not_echo_query_secrets(net: _Audit) -> None:
    with pytest.raises(FetchRefused) as refused:
        await get("http://10.0.0.1/report.png?token=SECRET-TOKEN-123")
    assert "SECRET-TOKEN-123" not in str(refused.value)


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("http://127.0.0.1:{trap}/", "loopback"),
        ("//127.0.0.1:{trap}/", "loopback"),
        ("http://[::1]:{trap}/", "loopback"),
        ("http://localhost.example.test:{trap}/", "resolves to 127.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "metadata"),
        ("http://10.0.0.5:6379/", "private"),
        ("file:///etc/shadow", "scheme 'file'"),
        ("http://example.com@127.0.0.1:{trap}/", "userinfo"),
    ],
)
async def test_redirect_to_a_private_address_is_refused(
    location: str, why: str, server: LocalHTTPServer, trap: LocalHTTPServer, net: _Audit
) -> None:
    server.route("/moved", Route(status=302, headers={"Location": location.format(trap=trap.port)}))
    resolver = RecordingResolver({"localhost.example.test": ["127.0.0.1"]})
    with pytest.raises(FetchRefused, match=why):
        await get(server.url("/moved"), allow_private_for_tests=server.exempt, resolver=resolver)
    assert server.paths() == ["/moved"]
    assert trap.seen == []
    assert connected_ports(net) == {server.port}


async def test_relative_redirects_are_followed_and_recorded(server: LocalHTTPServer, net: _Audit) -> None:
    server.route("/a", Route(status=301, headers={"Location": "/b"}))
    server.route("/b", Route(status=307, headers={"Location": "shot.png"}))
    got = await get(server.url("/a"), allow_private_for_tests=server.exempt)
    assert got.data == BODY
    assert got.url == server.url("/shot.png")
    assert got.redirects == (server.url("/a"), server.url("/b"))
    assert server.paths() == ["/a", "/b", "/shot.png"]


async def test_at_most_three_redirects(server: LocalHTTPServer) -> None:
    for i in range(4):
        server.route(f"/r{i}", Route(status=302, headers={"Location": f"/r{i + 1}"}))
    server.route("/r4", Route(BODY, headers={"Content-Type": "image/png"}))
    ok = await get(server.url("/r1"), allow_private_for_tests=server.exempt)  # r1 -> r2 -> r3 -> r4
    assert len(ok.redirects) == 3
    with pytest.raises(FetchRefused, match="more than 3 redirects"):
        await get(server.url("/r0"), allow_private_for_tests=server.exempt)
    assert "/r4" not in server.paths()[4:]


async def test_redirect_without_location_is_refused(server: LocalHTTPServer) -> None:
    server.route("/nowhere", Route(status=302))
    with pytest.raises(FetchRefused, match="without a Location"):
        await get(server.url("/nowhere"), allow_private_for_tests=server.exempt)


# --------------------------------------------------------------------------- DNS pinning


async def test_connection_is_pinned_to_the_vetted_address(server: LocalHTTPServer, net: _Audit) -> None:
    """A second lookup would answer the metadata address; there must be no second lookup, by us or by httpx."""
    name = "files.example.test"
    resolver = RecordingResolver({name: [["127.0.0.1"], ["169.254.169.254"]]})
    got = await get(f"http://{name}:{server.port}/shot.png", resolver=resolver, allow_private_for_tests=server.exempt)
    assert got.data == BODY
    assert resolver.asked == [name]
    assert name not in net.lookups
    assert net.connects == [("127.0.0.1", server.port)]
    assert server.seen[-1].headers["host"] == f"{name}:{server.port}"


async def test_each_redirect_hop_is_resolved_and_vetted_again(server: LocalHTTPServer, net: _Audit) -> None:
    server.route("/hop", Route(status=302, headers={"Location": f"http://second.example.test:{server.port}/shot.png"}))
    resolver = RecordingResolver({"first.example.test": ["127.0.0.1"], "second.example.test": ["10.9.8.7"]})
    with pytest.raises(FetchRefused, match=r"second\.example\.test resolves to 10\.9\.8\.7"):
        await get(f"http://first.example.test:{server.port}/hop", resolver=resolver,
                  allow_private_for_tests=server.exempt)
    assert resolver.asked == ["first.example.test", "second.example.test"]
    assert server.paths() == ["/hop"]


# --------------------------------------------------------------------------- allowlist


async def test_host_allowlist_is_checked_before_resolving(server: LocalHTTPServer, net: _Audit) -> None:
    resolver = RecordingResolver({"evil.example.org": ["127.0.0.1"], "ci.reports.example.test": ["127.0.0.1"]})
    allow = {"*.reports.example.test"}
    with pytest.raises(FetchRefused, match="not in the allowed hosts"):
        await get(f"http://evil.example.org:{server.port}/shot.png", resolver=resolver, allow_hosts=allow,
                  allow_private_for_tests=server.exempt)
    with pytest.raises(FetchRefused, match="not in the allowed hosts"):
        await get(f"http://reports.example.test:{server.port}/shot.png", resolver=resolver, allow_hosts=allow,
                  allow_private_for_tests=server.exempt)
    assert resolver.asked == []
    assert net.connects == []
    got = await get(f"http://ci.reports.example.test:{server.port}/shot.png", resolver=resolver, allow_hosts=allow,
                    allow_private_for_tests=server.exempt)
    assert got.data == BODY


async def test_allowlist_does_not_lift_the_address_checks(net: _Audit) -> None:
    resolver = RecordingResolver({"reports.example.test": ["10.0.0.3"]})
    with pytest.raises(FetchRefused, match="private"):
        await get("http://reports.example.test/x.png", resolver=resolver, allow_hosts={"reports.example.test"})
    assert net.connects == []


async def test_redirect_off_the_allowlist_is_refused(server: LocalHTTPServer) -> None:
    server.route("/out", Route(status=302, headers={"Location": "https://elsewhere.example.org/x.png"}))
    resolver = RecordingResolver({"ok.example.test": ["127.0.0.1"], "elsewhere.example.org": ["93.184.216.34"]})
    with pytest.raises(FetchRefused, match=r"elsewhere\.example\.org is not in the allowed hosts"):
        await get(f"http://ok.example.test:{server.port}/out", resolver=resolver, allow_hosts={"ok.example.test"},
                  allow_private_for_tests=server.exempt)
    assert resolver.asked == ["ok.example.test"]


# --------------------------------------------------------------------------- bodies


async def test_declared_oversize_body_is_refused(server: LocalHTTPServer) -> None:
    server.route("/big.png", Route(b"x" * 5000, headers={"Content-Type": "image/png"}))
    with pytest.raises(FetchRefused, match="5000 bytes exceeds the 4096-byte cap"):
        await get(server.url("/big.png"), max_bytes=4096, allow_private_for_tests=server.exempt)


async def test_streamed_body_is_cut_at_the_cap(server: LocalHTTPServer) -> None:
    server.route("/stream.png", Route(b"x" * 200_000, headers={"Content-Type": "image/png"}, chunked=True))
    with pytest.raises(FetchRefused, match="exceeds the 65536-byte cap"):
        await get(server.url("/stream.png"), max_bytes=65536, allow_private_for_tests=server.exempt)
    server.route("/small.png", Route(b"y" * 1000, headers={"Content-Type": "image/png"}, chunked=True))
    got = await get(server.url("/small.png"), max_bytes=65536, allow_private_for_tests=server.exempt)
    assert got.data == b"y" * 1000


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"Content-Type": "text/html; charset=utf-8"}, "'text/html' is not allowed"),
        ({}, r"'\(none\)' is not allowed"),
        ({"Content-Type": "image/svg+xml"}, "'image/svg\\+xml' is not allowed"),
    ],
)
async def test_content_type_must_be_allowed(server: LocalHTTPServer, headers: dict[str, str], why: str) -> None:
    server.route("/thing", Route(b"<html>hello</html>", headers=headers))
    with pytest.raises(FetchRefused, match=why):
        await get(server.url("/thing"), allow_private_for_tests=server.exempt)


async def test_wildcard_content_type(server: LocalHTTPServer) -> None:
    server.route("/w.webp", Route(b"RIFF....WEBP", headers={"Content-Type": "image/webp"}))
    got = await get(server.url("/w.webp"), allowed_content_types=["image/*"], allow_private_for_tests=server.exempt)
    assert got.content_type == "image/webp"


async def test_http_error_status_is_refused(server: LocalHTTPServer) -> None:
    with pytest.raises(FetchRefused, match="HTTP 404"):
        await get(server.url("/missing.png"), allow_private_for_tests=server.exempt)


async def test_total_deadline(server: LocalHTTPServer) -> None:
    server.route("/slow.png", Route(BODY, headers={"Content-Type": "image/png"}, delay=5))
    with pytest.raises(FetchRefused, match=r"timed out after 0\.3s"):
        await get(server.url("/slow.png"), timeout=0.3, allow_private_for_tests=server.exempt)


# --------------------------------------------------------------------------- TLS with a pinned address


def _tls_files(tmp: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``names``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetriage test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[LocalHTTPServer, ssl.SSLContext]]:
    ca, cert, key = _tls_files(tmp_path, ["reports.example.test"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    with LocalHTTPServer(ssl_context=server_ctx) as s:
        s.route("/shot.png", Route(BODY, headers={"Content-Type": "image/png"}))
        yield s, client_ctx


async def test_https_pins_the_address_but_verifies_the_name(
    tls: tuple[LocalHTTPServer, ssl.SSLContext], net: _Audit
) -> None:
    server, ctx = tls
    resolver = RecordingResolver({"reports.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    got = await get(f"https://reports.example.test:{server.port}/shot.png", resolver=resolver, ssl_context=ctx,
                    allow_private_for_tests=server.exempt)
    assert got.data == BODY
    assert net.connects == [("127.0.0.1", server.port)]
    assert server.seen[-1].headers["host"] == f"reports.example.test:{server.port}"
    # Same address, a name the certificate does not cover: SNI/verification use the name, so this fails.
    with pytest.raises(FetchRefused, match="TLS verification failed"):
        await get(f"https://other.example.test:{server.port}/shot.png", resolver=resolver, ssl_context=ctx,
                  allow_private_for_tests=server.exempt)


async def test_https_to_http_downgrade_redirect_is_refused(
    tls: tuple[LocalHTTPServer, ssl.SSLContext], server: LocalHTTPServer
) -> None:
    secure, ctx = tls
    secure.route("/down", Route(status=302, headers={"Location": server.url("/shot.png")}))
    resolver = RecordingResolver({"reports.example.test": ["127.0.0.1"]})
    with pytest.raises(FetchRefused, match="downgrades https to http"):
        await get(f"https://reports.example.test:{secure.port}/down", resolver=resolver, ssl_context=ctx,
                  allow_private_for_tests=secure.exempt | server.exempt)
    assert server.seen == []

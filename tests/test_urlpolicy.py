"""The outbound-URL policy (``kubetriage.api.urlpolicy``): pure classification, no DNS and no sockets.

The connect-time half (resolve, vet every address, pin) is tested where it connects: tests/test_fetch.py
and tests/test_llm.py, with real local servers and resolvers injected for names.
"""

from __future__ import annotations

import ipaddress

import pytest

from kubetriage.api.urlpolicy import URLPolicy, URLRefused, address_problem, check, describe, parse, vet_addresses

STRICT = URLPolicy()
HTTP = URLPolicy(allow_http=True)
IN_CLUSTER = URLPolicy(allow_http=True, allow_private=True)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("::ffff:10.0.0.1", "IPv4-mapped"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("64:ff9b::a00:1", "NAT64"),
        ("2002:a00:1::", "6to4"),
    ],
)
def test_internal_addresses_are_refused_unless_the_policy_opts_in(address: str, why: str) -> None:
    ip = ipaddress.ip_address(address)
    problem = address_problem(ip, STRICT)
    assert problem is not None and why in problem
    assert address_problem(ip) == problem  # no policy: the strict one
    assert address_problem(ip, IN_CLUSTER) is None


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("169.254.169.254", "cloud metadata endpoint"),
        ("::ffff:169.254.169.254", "cloud metadata endpoint"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata endpoint"),  # NAT64 of 169.254.169.254
        ("169.254.170.2", "cloud metadata endpoint"),
        ("100.100.100.200", "cloud metadata endpoint"),
        ("fd00:ec2::254", "cloud metadata endpoint"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("192.0.2.10", "special-purpose"),
        ("240.0.0.1", "special-purpose"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("2001::1", "Teredo"),
    ],
)
def test_metadata_and_special_addresses_are_refused_even_with_the_opt_in(address: str, why: str) -> None:
    ip = ipaddress.ip_address(address)
    for policy in (STRICT, IN_CLUSTER):
        problem = address_problem(ip, policy)
        assert problem is not None and why in problem, (policy, problem)


def test_public_addresses_pass() -> None:
    for text in ("93.184.216.34", "8.8.8.8", "2606:4700::6810:84e5", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert address_problem(ipaddress.ip_address(text), STRICT) is None, text


@pytest.mark.parametrize(
    ("url", "policy", "why", "opt_in"),
    [
        ("http://api.example.com/v1", STRICT, "plain http", "http"),
        ("https://127.0.0.1:8443/v1", STRICT, "loopback", "private"),
        ("https://10.0.0.5/v1", HTTP, "private", "private"),
        ("http://[::ffff:10.0.0.5]/v1", HTTP, "IPv4-mapped", "private"),
        ("https://localhost:8000/v1", STRICT, "loopback name", "private"),
        ("https://ollama.localhost/v1", STRICT, "loopback name", "private"),
        ("http://169.254.169.254/latest/meta-data", IN_CLUSTER, "metadata", None),
        ("http://metadata.google.internal/computeMetadata/v1", IN_CLUSTER, "metadata", None),
        ("https://[fd00:ec2::254]/", IN_CLUSTER, "metadata", None),
        ("file:///etc/passwd", IN_CLUSTER, "scheme 'file'", None),
        ("gopher://10.0.0.1:6379/_FLUSHALL", IN_CLUSTER, "scheme 'gopher'", None),
        ("https://user:pass@api.example.com/v1", IN_CLUSTER, "userinfo", None),
        ("https://api.example.com@10.0.0.1/v1", IN_CLUSTER, "userinfo", None),
        ("https://2130706433/v1", IN_CLUSTER, "ambiguous numeric", None),
        ("https://0x7f.0.0.1/v1", IN_CLUSTER, "ambiguous numeric", None),
        ("https://api.example.com\\@10.0.0.1/", IN_CLUSTER, "backslash", None),
        ("https://[fe80::1%25eth0]/v1", IN_CLUSTER, "zone id", None),
    ],
)
def test_check_refuses_what_it_can_know_without_dns(url: str, policy: URLPolicy, why: str,
                                                    opt_in: str | None) -> None:
    with pytest.raises(URLRefused, match=why) as refused:
        check(url, policy)
    assert refused.value.opt_in == opt_in


@pytest.mark.parametrize(
    ("url", "policy"),
    [
        ("https://openrouter.ai/api/v1", STRICT),
        ("https://api.openai.com/v1", STRICT),
        ("http://vllm.models.svc.cluster.local:8000/v1", IN_CLUSTER),  # a name: judged when connecting
        ("https://vllm.models.svc.cluster.local/v1", STRICT),  # likewise: check() cannot know its address
        ("http://10.96.0.12:8000/v1", IN_CLUSTER),
        ("http://127.0.0.1:11434/v1", IN_CLUSTER),
        ("http://localhost:11434/v1", IN_CLUSTER),
        ("http://[::1]:11434/v1", IN_CLUSTER),
    ],
)
def test_check_accepts(url: str, policy: URLPolicy) -> None:
    target = check(url, policy)
    assert target.scheme in ("http", "https") and target.port > 0


def test_vet_addresses_checks_every_answer_and_pins_the_first() -> None:
    target = parse("https://models.example.com/v1", STRICT)
    assert vet_addresses(target, ["93.184.216.34", "2606:4700::6810:84e5"], STRICT) == \
        ipaddress.ip_address("93.184.216.34")
    with pytest.raises(URLRefused, match=r"models\.example\.com resolves to 10\.0\.0\.1: a private address") as r:
        vet_addresses(target, ["93.184.216.34", "10.0.0.1"], STRICT)
    assert r.value.opt_in == "private"
    assert vet_addresses(target, ["10.0.0.1"], IN_CLUSTER) == ipaddress.ip_address("10.0.0.1")
    with pytest.raises(URLRefused, match="metadata") as r:
        vet_addresses(target, ["10.0.0.1", "169.254.169.254"], IN_CLUSTER)
    assert r.value.opt_in is None
    with pytest.raises(URLRefused, match="non-address"):
        vet_addresses(target, ["not-an-ip"], IN_CLUSTER)
    with pytest.raises(URLRefused, match="does not resolve"):
        vet_addresses(target, [], IN_CLUSTER)
    # a scope id only ever comes with link-local, which is judged as such
    with pytest.raises(URLRefused, match="link-local"):
        vet_addresses(target, ["fe80::1%eth0"], STRICT)
    # the tests' exemption is exact to address and port
    loop = parse("http://127.0.0.1:8080/", HTTP)
    assert vet_addresses(loop, ["127.0.0.1"], HTTP, exempt={("127.0.0.1", 8080)})
    with pytest.raises(URLRefused):
        vet_addresses(loop, ["127.0.0.1"], HTTP, exempt={("127.0.0.1", 8081)})


def test_pinned_url_and_host_header() -> None:
    target = parse("https://models.example.com:8443/v1/chat/completions?x=1", STRICT)
    assert target.pinned_url(ipaddress.ip_address("2606:4700::1")) == \
        "https://[2606:4700::1]:8443/v1/chat/completions?x=1"
    assert target.host_header == "models.example.com:8443"
    assert parse("https://models.example.com/v1", STRICT).host_header == "models.example.com"


def test_refusals_never_echo_a_query_token() -> None:
    with pytest.raises(URLRefused) as refused:
        check("http://10.0.0.1/v1?api_key=SECRET-TOKEN-123", HTTP)
    assert "SECRET-TOKEN-123" not in str(refused.value)
    assert "SECRET" not in describe("https://u:SECRET@h.example.com/p?token=SECRET#SECRET")

"""The real-node harness's own decisions, without a node: what it refuses, what it removes, what it builds.

The node itself is exercised by tests/test_node_e2e.py (root only); these
run everywhere and pin the parts whose mistakes would be costly: starting on
address ranges already in use, deleting someone else's iptables rules, or
running an image built from other bytes than the sources' digest says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from devharness import images, node

ADDRS = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever preferred_lft forever
"""
ROUTES = """\
default via 192.0.2.1 dev eth0
192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2
local 127.0.0.0/8 dev lo table local proto kernel scope host src 127.0.0.1
broadcast 192.0.2.255 dev eth0 table local proto kernel scope link src 192.0.2.2
"""


def test_no_collision_on_an_ordinary_machine() -> None:
    assert node.collisions(ADDRS, ROUTES) == []


def test_the_nodes_own_address_bridge_and_routes_are_not_collisions() -> None:
    ours = (f"1: lo    inet {node.NODE_IP}/32 scope global lo\n"
            f"9: {node.BRIDGE}    inet {node.POD_GATEWAY}/24 brd 10.244.0.255 scope global {node.BRIDGE}\n")
    routes = (f"{node.SERVICE_CIDR} dev {node.BRIDGE} scope link src {node.POD_GATEWAY}\n"
              f"local {node.NODE_IP} dev lo table local proto kernel scope host src {node.NODE_IP}\n")
    assert node.collisions(ADDRS + ours, ROUTES + routes) == []


def test_overlapping_addresses_and_routes_are_refused_with_what_overlaps() -> None:
    found = node.collisions(ADDRS + "7: wg0    inet 10.244.7.1/24 scope global wg0\n",
                            ROUTES + "10.96.0.0/12 via 192.0.2.9 dev eth0\n10.250.0.0/16 dev tun0 scope link\n"
                            "blackhole 10.244.200.0/24 proto static\n")
    assert len(found) == 4, found
    assert "blackhole 10.244.200.0/24" in found[3]
    assert "10.244.7.1/24 on wg0 overlaps 10.244.0.0/16" in found[0]
    assert "10.96.0.0/12" in found[1] and "10.96.0.0/24" in found[1]
    assert "10.250.0.0/16" in found[2] and f"{node.NODE_IP}/32" in found[2]


BEFORE = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A INPUT -s 10.96.3.0/24 -j ACCEPT
COMMIT
"""
NOW = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:KUBE-FIREWALL - [0:0]
:OTHER-APP - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -j DOCKER-USER
-A INPUT -s 10.96.3.0/24 -j ACCEPT
-A INPUT -p tcp --dport 9999 -j OTHER-APP
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
-A FORWARD -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j DROP
COMMIT
"""


def test_iptables_cleanup_removes_only_what_the_node_added() -> None:
    cmds = node.iptables_cleanup("iptables", BEFORE, NOW)
    assert cmds == [
        ["iptables", "-t", "filter", "-D", "INPUT", "-j", "KUBE-FIREWALL"],
        ["iptables", "-t", "filter", "-D", "KUBE-FIREWALL", "!", "-s", "127.0.0.0/8", "-d", "127.0.0.0/8", "-m",
         "comment", "--comment", "block incoming localnet connections", "-j", "DROP"],
        ["iptables", "-t", "filter", "-F", "KUBE-FIREWALL"],
        ["iptables", "-t", "filter", "-X", "KUBE-FIREWALL"],
        ["iptables", "-t", "mangle", "-D", "FORWARD", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j",
         "DROP"],
    ]
    # a rule that was there before, though about a node range, and another program's new chain stay
    flat = [" ".join(c) for c in cmds]
    assert not [c for c in flat if "10.96.3.0" in c or "OTHER-APP" in c or "DOCKER-USER" in c]


def test_guard_rule_is_the_one_the_cleanup_knows() -> None:
    rule = " ".join(node.GUARD_RULE)
    assert rule == f"FORWARD -s {node.CLUSTER_CIDR} ! -d {node.CLUSTER_CIDR} -j DROP"
    assert node.GUARD_TABLE == "mangle"


def test_image_digest_covers_exactly_the_build_context(tmp_path: Path) -> None:
    """The project image's tag is a digest of what `docker build` would send: a source change makes a new
    tag; a change to a file .dockerignore keeps out does not."""
    repo = tmp_path / "repo"
    shutil.copytree(images.REPO_ROOT, repo, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc",
                                                                          ".ruff_cache", ".pytest_cache"))

    def digest() -> tuple[str, set[str]]:
        ctx = tmp_path / f"ctx{len(list(tmp_path.iterdir()))}"
        ctx.mkdir()
        d = images.copy_context(repo, ctx, extra="base")
        return d, {p.relative_to(ctx).as_posix().split("/")[0] for p in ctx.rglob("*") if p.is_file()}

    first, top = digest()
    assert top == {"Dockerfile", "pyproject.toml", "README.md", "operator", "analyzers"}
    (repo / "tests" / "test_node_harness.py").write_text("# not in the image\n")
    assert digest()[0] == first
    main = repo / "operator" / "kubetriage" / "main.py"
    main.write_text(main.read_text() + "\n# changed\n")
    assert digest()[0] != first

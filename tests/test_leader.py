"""The leader loop runs once per active operator: one result consumer however many pools, none on a standby.

Proved on the real servers: the consumers of the result stream are read from
Redis itself (``XINFO CONSUMERS``: a consumer is registered on its first read
and stays listed), and the operators' logs say how often a leader loop started.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from devharness import devenv
from kubetriage.infra.queue import EVENTS_GROUP
from tests.pipeline import Pipeline, script_spec

pytestmark = pytest.mark.cluster

POOLS = ("a", "b", "c")


def identity(proc: devenv.Proc) -> str:
    """The operator's consumer name: ``Runtime.identity`` of that process."""
    return f"{socket.gethostname()}-{proc.popen.pid}"


def leader_starts(proc: devenv.Proc) -> int:
    return proc.log_path.read_text(errors="replace").count("leader loop started")


async def consumers(p: Pipeline) -> list[str]:
    client = aioredis.from_url(p.redis.url, decode_responses=True)
    try:
        info = await client.xinfo_consumers(f"{p.prefix}:events", EVENTS_GROUP)
    except ResponseError:  # no stream or group yet: nobody has read
        return []
    finally:
        await client.aclose()
    return sorted(c["name"] for c in info)


async def one_job_per_pool(p: Pipeline, tag: str) -> None:
    """A job in every pool, each analysed and recorded: every pool's path went through the one consumer."""
    names = [f"{tag}-{pool}" for pool in POOLS]
    await asyncio.gather(*(p.job(n, script_spec(f"script-{n}", spec={"pool": pool}))
                           for n, pool in zip(names, POOLS, strict=True)))
    # generous: under a full suite on 2 cores a standby's takeover and the drain can take minutes
    jobs = await p.wait_terminal(names, timeout=240)
    assert {j["status"]["phase"] for j in jobs.values()} == {"Succeeded"}, {n: j["status"] for n, j in jobs.items()}
    assert {jobs[n]["status"]["pool"] for n in names} == {f"{p.ns}/{pool}" for pool in POOLS}


async def peers(p: Pipeline) -> int:
    out = p.cluster.kubectl("get", "kopfpeering", "kubetriage", "-n", p.ns, "-o", "json", check=False)
    if out.returncode:
        return 0
    return len(json.loads(out.stdout).get("status") or {})


async def test_one_consumer_for_three_pools_and_none_on_the_standby(pipeline: Pipeline) -> None:
    p = pipeline
    for pool in POOLS:
        await p.pool(pool, concurrency=2, replicas={"min": 1, "max": 1})
    active = p.start_operator("op-a", "--priority", "200", standalone=False, peering_lifetime_seconds=4)
    await one_job_per_pool(p, "first")
    assert await consumers(p) == [identity(active)]  # one per pool before the leader loop: 3

    standby = p.start_operator("op-b", "--priority", "100", standalone=False, peering_lifetime_seconds=4)
    await p.wait(lambda: _at_least(peers(p), 2), "the standby announced itself")
    await one_job_per_pool(p, "second")
    assert await consumers(p) == [identity(active)]
    assert leader_starts(active) == 1 and leader_starts(standby) == 0, standby.tail(40)

    active.kill()
    await one_job_per_pool(p, "third")  # the standby took over: its pool daemons started its one leader loop
    assert await consumers(p) == sorted([identity(active), identity(standby)])
    assert leader_starts(standby) == 1, standby.tail(40)
    assert len(p.audit_rows()) == 3 * len(POOLS)


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n

"""A worker's memory and its memory analyzer's learning time (issue 12, items 2 and 12); not part of ``make bench``.

    python -m bench.worker_memory vision          # peak RSS of a real worker on four inline 5000x5000 PNGs
    python -m bench.worker_memory memory 2000 5000 20000

``vision`` starts a real ``kubetriage worker`` process against a Redis of its
own and a local fake vision model, queues one job with four 5000x5000 RGBA
PNGs (about 146 KB of base64 each) and reads the worker's VmHWM.
``memory`` publishes N human verdicts through ``Queue.publish_human_cases``
(as the operator does), lets a real ``Worker`` load them, publishes one more,
and times the refresh that learns it; also the analyzer's RSS growth.

Both measure whatever ``kubetriage`` is importable: to measure another
checkout, put its ``operator`` and ``analyzers`` folders first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from PIL import Image, ImageDraw

from devharness import devenv
from kubetriage.infra.config import Settings
from kubetriage.infra.queue import Queue
from kubetriage.worker.runner import Worker
from tests.fakellm import FakeLLM  # the fake LLM lives with the tests
from tests.waiting import eventually


def _status(pid: int | str, key: str) -> float:
    """A /proc/<pid>/status figure in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _png(side: int, shade: int) -> bytes:
    img = Image.new("RGBA", (side, side), (shade, shade, shade, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((100, 100, side - 100, 400), fill=(200, 30, 30, 255))
    draw.text((200, 600), f"Error 500 (shade {shade})", fill=(0, 0, 0, 255))
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=9)
    return out.getvalue()


async def vision(root: Path) -> dict[str, Any]:
    shots = [base64.b64encode(_png(5000, 230 + i)).decode() for i in range(4)]
    server = devenv.Redis(root / "redis").start()
    try:
        async with FakeLLM() as llm:
            llm.set_default({"classification": "false_positive", "reason": "a CDN error page", "confidence": 0.9})
            prefix, pool = f"b{uuid.uuid4().hex[:8]}", "qa/vision"
            worker = devenv.spawn("worker", [sys.executable, "-m", "kubetriage", "worker"], root, env={
                "KUBETRIAGE_REDIS_URL": server.url, "KUBETRIAGE_REDIS_PREFIX": prefix, "KUBETRIAGE_POOL": pool,
                "KUBETRIAGE_LLM_BASE_URL": llm.url, "KUBETRIAGE_LLM_VISION_MODEL": "fake/vision",
                "KUBETRIAGE_LLM_API_KEY": "k", "KUBETRIAGE_LLM_ALLOW_HTTP": "true",
                "KUBETRIAGE_LLM_ALLOW_PRIVATE_ENDPOINTS": "true", "KUBETRIAGE_METRICS_PORT": "0",
            })
            client = aioredis.from_url(server.url)
            try:
                queue = Queue(client, prefix)
                await queue.ensure_group()
                payload = {"uid": "u1", "name": "huge-pngs", "namespace": "qa", "analyzer": "vision",
                           "source": {"type": "scriptResult"},
                           "script_result": {"script_name": "checkout.spec.ts", "success": False,
                                             "error_message": "Error: expect(page).toHaveTitle(expected) failed",
                                             "screenshots": [{"data": s, "media_type": "image/png"} for s in shots]}}
                # started: its idle footprint is what the job adds to
                await eventually(lambda: "serving pool" in worker.tail(), "the worker to start", timeout=60)
                idle = _status(worker.popen.pid, "VmHWM")
                t0 = time.monotonic()
                await queue.enqueue(uid="u1", pool=pool, priority=1, payload=payload, namespace="qa",
                                    name="huge-pngs", max_attempts=1)
                done = None
                while done is None and worker.alive():
                    done = next((e for e in await queue.read_events("bench", block_ms=200)
                                 if e.type in ("result", "failed")), None)
                seconds = time.monotonic() - t0
                peak = _status(worker.popen.pid, "VmHWM")
            finally:
                worker.stop()
                await client.aclose()
    finally:
        server.stop()
    body = done.body if done else ""
    return {"job": done.type if done else "worker died", "images_sent": "4 image(s) sent" in body,
            "idle_hwm_mib": round(idle), "peak_hwm_mib": round(peak), "seconds": round(seconds, 1)}


def _case(rnd: random.Random, i: int) -> str:
    """A human verdict as ``controller.overrides.memory_case`` publishes it: half alerts, half failed scripts."""
    if i % 2:
        name = rnd.choice(["KubePodCrashLooping", "HttpErrors", "BlackboxProbeFailed", "TargetDown", "KubeJobFailed"])
        labels = {"namespace": f"team-{rnd.randrange(40)}", "severity": rnd.choice(["warning", "critical"]),
                  "pod": f"svc{rnd.randrange(200)}-7d9f8c6b5-{rnd.randrange(10**5):05d}", "job": "kube-state-metrics",
                  "instance": f"10.0.{rnd.randrange(255)}.{rnd.randrange(255)}:8080"}
        text, kind, subject = name + " " + " ".join(f"{k}={v}" for k, v in labels.items()), "alert", name
    else:
        words = ("timeout connection refused reset database login checkout payment cart order element locator "
                 "click visible network disk memory quota token expired upstream gateway schema").split()
        subject = f"suite{rnd.randrange(120):03d}.spec.ts"
        body = " ".join(rnd.choice(words) for _ in range(rnd.randint(12, 40)))
        text, kind = f"{subject}: case {rnd.randrange(7)}: {body} id=req{rnd.randrange(10**9)}x", "scriptResult"
    return json.dumps({"text": text, "classification": rnd.choice(["valid", "false_positive"]),
                       "reason": f"known (by alice) {i}", "source": f"ns/job-{i}", "check_type": "user",
                       "kind": kind, "subject": subject}, separators=(",", ":"))


async def memory(root: Path, sizes: list[int]) -> list[dict[str, Any]]:
    server = devenv.Redis(root / "redis").start()
    rows = []
    try:
        for n in sizes:
            rnd = random.Random(n)
            prefix = f"b{uuid.uuid4().hex[:8]}"
            client = aioredis.from_url(server.url)
            worker = Worker(Settings(pool="qa/default", redis_url=server.url, redis_prefix=prefix))
            try:
                queue = Queue(client, prefix)
                await queue.publish_human_cases(*(_case(rnd, i) for i in range(n)))
                before = _status("self", "VmRSS")
                t0, c0 = time.perf_counter(), time.process_time()
                await worker.refresh_memory()
                load, load_cpu = time.perf_counter() - t0, time.process_time() - c0
                grown = _status("self", "VmRSS") - before
                await queue.publish_human_cases(_case(rnd, n))
                # CPU seconds too: on a shared machine they vary far less than wall-clock ones
                t0, c0 = time.perf_counter(), time.process_time()
                await worker.refresh_memory()
                learn, learn_cpu = time.perf_counter() - t0, time.process_time() - c0
                rows.append({"cases": n, "load_s": round(load, 2), "load_cpu_s": round(load_cpu, 2),
                             "learn_one_more_s": round(learn, 3), "learn_one_more_cpu_s": round(learn_cpu, 3),
                             "rss_growth_on_load_mib": round(grown)})
                print(json.dumps(rows[-1]), flush=True)
            finally:
                worker.memory = None
                await worker.redis.aclose()
                await client.aclose()
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("vision")
    mem = sub.add_parser("memory")
    mem.add_argument("sizes", nargs="*", type=int, default=[2000, 5000, 20000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kubetriage-bench-") as tmp:
        if args.what == "vision":
            print(json.dumps(asyncio.run(vision(Path(tmp)))))
        else:
            asyncio.run(memory(Path(tmp), args.sizes))


if __name__ == "__main__":
    main()

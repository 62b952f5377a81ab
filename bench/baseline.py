"""The baseline: a worker the way the original system did it, measured in the same run.

One job at a time: find the first TriageJob without a verdict, ask the LLM,
write the verdict, repeat; when there is nothing to do, sleep one second.
Same API server, same fake LLM latency, same job specs as kubetriage gets.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from kubetriage.infra.kube import Kube, triagejob_path


async def run_baseline(kube: Kube, namespace: str, llm_url: str, expected: int, label: str) -> float:
    """Process ``expected`` jobs labelled ``bench=<label>``; returns jobs per second."""
    done = 0
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as http:
        while done < expected:
            page = await kube.get(triagejob_path(namespace), labelSelector=f"bench={label}")
            todo = [j for j in page["items"] if not (j.get("status") or {}).get("verdict")]
            if not todo:
                await asyncio.sleep(1.0)
                continue
            job = todo[0]
            reply = await http.post(f"{llm_url}/chat/completions", json={
                "model": "fake/triage-text",
                "messages": [{"role": "user", "content": str(job["spec"])[:4000]}],
            })
            reply.raise_for_status()
            await kube.merge_patch(triagejob_path(namespace, job["metadata"]["name"], status=True), {"status": {
                "phase": "Succeeded",
                "verdict": {"discard": False, "classification": "valid", "reason": "baseline", "confidence": 0.5,
                            "analyzer": "baseline"},
            }})
            done += 1
    return expected / (time.monotonic() - t0)

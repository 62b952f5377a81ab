"""The worker: claim jobs from Redis, run the analyzer chain, hand the verdict back.

A worker has no Kubernetes credentials at all (its pods run with
``automountServiceAccountToken: false``): Redis is its only peer, besides the
read-only monitoring APIs its pool names for evidence. Each of its
``concurrency`` slots loops claim -> gather evidence -> analyse -> report,
renewing the lease while it works; the report carries the verdict and the
evidence it rests on (``WorkerResult``). On SIGTERM it stops claiming, lets running analyses finish for
``shutdown_grace_seconds``, then hands the rest back so another worker takes
them at once rather than after a lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

import redis.asyncio as aioredis
from pydantic import ValidationError

from kubetriage.analyzers.base import Analyzer
from kubetriage.analyzers.chain import run_offline_chain
from kubetriage.analyzers.llm import LLMAnalyzer, LLMConfig, LLMError
from kubetriage.analyzers.memory import MemoryAnalyzer, MemoryCase, prepare_cases
from kubetriage.analyzers.rules import RulesAnalyzer
from kubetriage.analyzers.vision import VisionAnalyzer, VisionConfig
from kubetriage.api.contract import AnalysisContext, AnalysisRequest, WorkerResult
from kubetriage.api.evidence import Evidence
from kubetriage.api.models import MAX_EVIDENCE, MAX_REASON, Verdict
from kubetriage.api.redact import redactor
from kubetriage.infra import metrics
from kubetriage.infra.config import Settings
from kubetriage.infra.queue import MEMORY_MAX, Claimed, Queue
from kubetriage.worker import evidence

log = logging.getLogger("kubetriage.worker.runner")


class Worker:
    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None) -> None:
        if not settings.pool:
            raise SystemExit("the worker needs its pool: set KUBETRIAGE_POOL=namespace/name or --pool")
        self.s = settings
        self.redis = redis or aioredis.from_url(settings.redis_url, max_connections=settings.concurrency * 2 + 8)
        self.queue = Queue(self.redis, settings.redis_prefix)
        self.id = f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{os.getpid()}"
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.stopping = asyncio.Event()
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.rules = RulesAnalyzer()
        self.memory: MemoryAnalyzer | None = None
        self._memory_version: int | None = None
        self._memory_loaded = False
        self._compaction: asyncio.Task[tuple[MemoryAnalyzer | None, int | None]] | None = None
        self.llm: LLMAnalyzer | None = None
        self.vision: VisionAnalyzer | None = None
        self.evidence = evidence.from_settings(settings)
        # secrets in the job's text: redacted before any analyzer (and its LLM) sees it, and in what it reports
        self.redact = redactor(settings.redact_pattern_list)
        llm = dict(base_url=settings.llm_base_url, api_key=settings.llm_api_key,
                   allow_http=settings.llm_allow_http, allow_private_endpoints=settings.llm_allow_private_endpoints,
                   timeout_seconds=settings.llm_timeout_seconds, max_retries=settings.llm_max_retries,
                   price_per_1k_prompt=settings.llm_price_per_1k_prompt,
                   price_per_1k_completion=settings.llm_price_per_1k_completion)
        if settings.llm_model:
            self.llm = LLMAnalyzer(LLMConfig(model=settings.llm_model, **llm))
        if settings.llm_vision_model:
            hosts = {h.strip() for h in settings.vision_allow_hosts.split(",") if h.strip()} or None
            self.vision = VisionAnalyzer(LLMConfig(model=settings.llm_vision_model, **llm),
                                         VisionConfig(allow_hosts=hosts))

    @property
    def offline(self) -> list[Analyzer]:
        """Memory of human verdicts, then rules: what decides with no network and no key."""
        return [self.memory, self.rules] if self.memory else [self.rules]

    async def refresh_memory(self) -> None:
        """Learn the human verdicts the operator published since the last refresh (from Redis: no database).

        The operator's version counter says how many cases are new; they are
        added to the index (only their own features are counted, see
        ``MemoryAnalyzer.add``), so a verdict is learned in milliseconds
        whatever the memory's size. The index is built from the whole list
        only when there is none yet, or Redis lost its data or trimmed cases
        this worker never saw; and, in the background while the current index
        keeps serving and learning, once it holds a quarter more cases than
        Redis keeps, to let go of those Redis trimmed.
        """
        if self._compaction is not None and self._compaction.done():
            compaction, self._compaction = self._compaction, None
            # the rebuilt index knows the list up to its version; what came after is fetched just below
            self.memory, self._memory_version = compaction.result()
            log.info("memory analyzer: rebuilt from the newest %d case(s)", self.memory.cases if self.memory else 0)
        version = await self.queue.memory_version()
        # the first refresh always reads the list: one written before versions existed has none yet
        if self._memory_loaded and version == self._memory_version:
            return
        delta = await self.queue.memory_since(self._memory_version if self._memory_loaded else None)
        cases = _memory_cases(delta.cases)
        threshold = self.s.memory_min_similarity
        if delta.complete or self.memory is None:
            if self._compaction is not None:  # built from a list that no longer is: never install it
                self._compaction.cancel()
                self._compaction = None
            self.memory = await asyncio.to_thread(MemoryAnalyzer, cases, min_similarity=threshold) if cases else None
            log.info("memory analyzer: %d human verdict case(s)", len(cases))
        elif cases:
            prepared = await asyncio.to_thread(prepare_cases, cases)  # the costly part, touching nothing shared
            # here, on the event loop, never while an analysis reads the index
            self.memory.add(cases, prepared)
            log.info("memory analyzer: learned %d human verdict case(s), %d in all", len(cases), self.memory.cases)
            if self.memory.cases + self.memory.skipped > MEMORY_MAX + MEMORY_MAX // 4 and self._compaction is None:
                self._compaction = asyncio.create_task(self._rebuild_memory())
        self._memory_version = delta.version
        self._memory_loaded = True

    async def _rebuild_memory(self) -> tuple[MemoryAnalyzer | None, int | None]:
        """A new index from the list as Redis keeps it now, and the version it reflects."""
        delta = await self.queue.memory_since(None)
        cases = _memory_cases(delta.cases)
        threshold = self.s.memory_min_similarity
        built = await asyncio.to_thread(MemoryAnalyzer, cases, min_similarity=threshold) if cases else None
        return built, delta.version

    async def _memory_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    await self.refresh_memory()
                except Exception as exc:  # the memory is an optimisation; never let it stop the worker
                    log.warning("refreshing the memory analyzer failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 5)
        finally:
            if self._compaction is not None:
                self._compaction.cancel()

    def context(self, request: AnalysisRequest, gathered: list[Evidence] | None = None) -> AnalysisContext:
        """What the analyzers may consult besides the request: the pool's settings and the evidence (the
        history the operator put in the request, then what this worker's gatherers found)."""
        extra = {"identity_labels": self.s.identity_label_list} if self.s.identity_label_list else {}
        return AnalysisContext(confidence_threshold=self.s.confidence_threshold,
                               script_history=request.script_history,
                               evidence=[*request.evidence, *(gathered or [])], **extra)

    async def analyse(self, job: Claimed) -> WorkerResult:
        """Evidence first, then the offline analyzers, then the LLM; on the last attempt a dead LLM falls back
        to offline. The result carries the evidence as users will see it, next to the verdict."""
        # the operator redacted the payload already; again here for a payload queued by an older operator
        request = self.redact.request(AnalysisRequest.model_validate({**job.payload, "attempt": job.attempt}))
        gathered = await self.evidence.gather(request)
        verdict = await self._verdict(job, request, gathered)
        found = [*request.evidence, *gathered]
        # a model may quote what it read in a screenshot or a report page, which no one redacted before
        return WorkerResult(verdict=self.redact.verdict(unavailable_note(verdict, found)),
                            evidence=self.redact.evidence([e.item() for e in found][:MAX_EVIDENCE]))

    async def _verdict(self, job: Claimed, request: AnalysisRequest, gathered: list[Evidence]) -> Verdict:
        context = self.context(request, gathered)
        if self.s.analyzer_chain != "auto" and request.analyzer == "auto":
            request = request.model_copy(update={"analyzer": self.s.analyzer_chain})
        passing = request.script_result is not None and request.script_result.success
        # vision before the text LLM: the chain stops at the first confident verdict, and vision
        # steps aside (no network) when a job has no screenshots or report
        online = [a for a in (self.vision, self.llm) if a is not None] if not passing else []
        chain = [*self.offline, *online]
        try:
            verdict = await run_offline_chain(request, context, chain)
        except LLMError as exc:
            metrics.LLM_REQUESTS.labels(self.s.llm_model, "error").inc()
            if request.analyzer != "auto" or job.attempt < job.max_attempts:
                raise  # retried with backoff; an explicitly requested LLM never silently becomes rules
            verdict = await run_offline_chain(request, self.context(request, gathered), self.offline)
            note = f" [LLM unavailable after {job.attempt} attempt(s): {exc}]"
            return verdict.model_copy(update={"reason": (verdict.reason + note)[:4096]})
        if verdict.model and verdict.analyzer in ("llm", "vision"):
            metrics.LLM_REQUESTS.labels(verdict.model, "verdict").inc()
            if verdict.tokens:
                metrics.LLM_TOKENS.labels(verdict.model, "prompt").inc(verdict.tokens.prompt)
                metrics.LLM_TOKENS.labels(verdict.model, "completion").inc(verdict.tokens.completion)
            if verdict.cost_usd:
                metrics.LLM_COST.labels(verdict.model).inc(verdict.cost_usd)
        return verdict

    async def _heartbeat(self, uid: str, task: asyncio.Task[None]) -> None:
        """Renew the lease; if it is lost (deleted job, or expired and re-queued) stop the work."""
        interval = max(0.05, self.s.lease_seconds / 3)
        while not task.done():
            await asyncio.sleep(interval)
            try:
                if not await self.queue.heartbeat(uid, self.id, self.lease_ms):
                    log.info("lease on %s lost; abandoning it", uid)
                    task.cancel()
                    return
            except (OSError, ConnectionError, aioredis.RedisError) as exc:
                log.warning("heartbeat for %s failed: %s", uid, exc)

    async def _run_one(self, job: Claimed) -> None:
        deadline = float(job.payload.get("deadline_seconds") or 300)
        t0 = time.monotonic()
        pool = self.s.pool
        backoff = int(self.s.retry_backoff_seconds * 1000), int(self.s.retry_backoff_max_seconds * 1000)
        try:
            result = await asyncio.wait_for(self.analyse(job), timeout=deadline)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            if await self.queue.fail_attempt(job.uid, self.id, f"analysis exceeded its {deadline:.0f}s deadline",
                                             *backoff) == 1:
                metrics.RETRIES.labels(pool, "deadline").inc()
            metrics.WORKER_JOBS.labels(pool, "timeout").inc()
            return
        except ValidationError as exc:
            await self.queue.fail_attempt(job.uid, self.id, f"invalid job payload: {exc.errors()[0]['msg']}",
                                          0, 0)
            metrics.WORKER_JOBS.labels(pool, "invalid").inc()
            return
        except Exception as exc:  # an analyzer failure is an attempt failure, never a dead worker
            log.warning("analysis of %s failed (attempt %d/%d): %s", job.uid, job.attempt, job.max_attempts, exc)
            why = self.redact(f"{type(exc).__name__}: {exc}")  # it may quote the job's text
            if await self.queue.fail_attempt(job.uid, self.id, why, *backoff) == 1:
                metrics.RETRIES.labels(pool, type(exc).__name__).inc()
            metrics.WORKER_JOBS.labels(pool, "error").inc()
            return
        metrics.ANALYSIS_SECONDS.labels(pool, result.verdict.analyzer).observe(time.monotonic() - t0)
        await self.queue.report(job.uid, self.id, result.model_dump_json(by_alias=True, exclude_none=True))
        metrics.WORKER_JOBS.labels(pool, "verdict").inc()

    async def _slot(self, n: int) -> None:
        while not self.stopping.is_set():
            try:
                got = await self.queue.claim(self.s.pool, self.id, self.lease_ms)
            except (OSError, ConnectionError, aioredis.RedisError) as exc:
                log.warning("slot %d: Redis unavailable (%s); retrying", n, exc)
                await asyncio.sleep(1)
                continue
            except Exception:  # a slot must never die silently: the pod would look alive and do nothing
                log.exception("slot %d: claim failed; retrying", n)
                await asyncio.sleep(1)
                continue
            if got is None:
                with contextlib.suppress(OSError, ConnectionError, aioredis.RedisError):
                    await self.queue.wait_for_work(self.s.pool, 1.0)
                continue
            if isinstance(got, float):
                await asyncio.sleep(min(got, 1.0))
                continue
            if got.queued_us:
                metrics.QUEUE_WAIT.labels(self.s.pool).observe(max(0.0, (got.started_us - got.queued_us) / 1e6))
            task = asyncio.create_task(self._run_one(got))
            self.inflight[got.uid] = task
            beat = asyncio.create_task(self._heartbeat(got.uid, task))
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            finally:
                beat.cancel()
                self.inflight.pop(got.uid, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stopping.set)
        metrics.start_server(self.s.metrics_port)
        log.info("worker %s serving pool %s with %d slots", self.id, self.s.pool, self.s.concurrency)
        slots = [asyncio.create_task(self._slot(i)) for i in range(self.s.concurrency)]
        slots.append(asyncio.create_task(self._memory_loop()))
        await self.stopping.wait()
        log.info("stopping: waiting up to %.0fs for %d running job(s)", self.s.shutdown_grace_seconds,
                 len(self.inflight))
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=self.s.shutdown_grace_seconds)
        for uid, task in list(self.inflight.items()):
            task.cancel()
            with contextlib.suppress(Exception):
                await self.queue.release(uid, self.id)
                log.info("handed %s back to the queue", uid)
        for slot in slots:
            slot.cancel()
        await asyncio.gather(*slots, return_exceptions=True)
        for analyzer in (self.llm, self.vision):
            if analyzer is not None:
                await analyzer.aclose()
        await self.evidence.aclose()
        await self.redis.aclose()


def unavailable_note(verdict: Verdict, found: list[Evidence]) -> Verdict:
    """The verdict, saying which evidence it had to do without (the safety policy says so only for some
    verdicts); it is no more confident for it, since evidence that failed adds no finding."""
    failed = [e for e in found if e.error]
    if not failed or "evidence unavailable" in verdict.reason:
        return verdict
    note = " [evidence unavailable: " + "; ".join(f"{e.source}: {e.error}" for e in failed) + "]"
    return verdict.model_copy(update={"reason": (verdict.reason + note)[:MAX_REASON]})


def _memory_cases(raw: list[bytes]) -> list[MemoryCase]:
    """The cases of the Redis memory list (oldest first there), newest first as MemoryAnalyzer takes them."""
    cases = []
    for entry in reversed(raw):
        try:
            cases.append(MemoryCase.model_validate_json(entry))
        except ValueError:
            continue  # one bad entry must not cost the whole memory
    return cases


def main(settings: Settings) -> None:
    asyncio.run(Worker(settings).run())

"""Prometheus metrics of the operator and the worker (prometheus-client, naming guide conventions)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from kubetriage.api.build import VERSION as __version__

log = logging.getLogger("kubetriage.infra.metrics")

BUILD = Info("kubetriage_build", "Build information.")
BUILD.info({"version": __version__})

JOBS = Gauge("kubetriage_jobs", "TriageJobs the operator knows, by phase and source type.", ["phase", "source"])
JOBS_ADMITTED = Counter(
    "kubetriage_jobs_admitted_total", "TriageJobs queued for analysis.", ["pool", "priority_class", "source"])
JOBS_DUPLICATE = Counter("kubetriage_jobs_duplicate_total", "TriageJobs folded into an earlier one.", ["source"])
VERDICTS = Counter("kubetriage_verdicts_total", "Verdicts recorded.", ["classification", "analyzer", "check_type"])
JOBS_FAILED = Counter("kubetriage_jobs_failed_total", "TriageJobs that ended Failed.", ["reason"])
LEASE_EXPIRIES = Counter("kubetriage_lease_expiries_total", "Leases that expired (worker lost).", ["pool"])
RETRIES = Counter("kubetriage_retries_total", "Analysis attempts that failed and were retried.", ["pool", "reason"])
RERUNS = Counter(
    "kubetriage_reruns_total",
    "Jobs analysed again because Redis lost them after a worker had claimed them (counted as an attempt).", ["pool"])
ADMISSION_RETRIES = Counter(
    "kubetriage_admission_retries_total", "TriageJob admissions that failed and were scheduled again.", ["reason"])
RESYNC_ADMITTED = Counter(
    "kubetriage_resync_admitted_total", "Unfinished TriageJobs the periodic resync found missing from the queue.")
QUEUE_OLDEST = Gauge(
    "kubetriage_queue_oldest_age_seconds", "Age of the oldest waiting job, per pool and priority.",
    ["pool", "priority"])
LLM_REQUESTS = Counter("kubetriage_llm_requests_total", "Verdicts asked of an LLM, by model and outcome.",
                       ["model", "outcome"])
LLM_TOKENS = Counter("kubetriage_llm_tokens_total", "LLM tokens used, by model and kind.", ["model", "kind"])
LLM_COST = Counter("kubetriage_llm_cost_usd_total", "LLM cost in US dollars (from configured prices).", ["model"])
DB_FAILURES = Counter("kubetriage_database_write_failures_total", "Failed verdict writes to the database.")
DB_BACKLOG = Gauge("kubetriage_database_backlog", "Verdicts waiting for the database.")
QUEUE_DEPTH = Gauge("kubetriage_queue_depth", "Jobs waiting, per pool and priority.", ["pool", "priority"])
WORKER_JOBS = Counter("kubetriage_worker_jobs_total", "Jobs a worker finished, by outcome.", ["pool", "outcome"])
ANALYSIS_SECONDS = Histogram(
    "kubetriage_analysis_duration_seconds", "Time a worker spent analysing one job.", ["pool", "analyzer"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
QUEUE_WAIT = Histogram(
    "kubetriage_queue_wait_seconds", "Time from queued to claimed by a worker.", ["pool"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
EVIDENCE = Counter(
    "kubetriage_evidence_total",
    "Evidence a worker gathered, by pool, source and outcome (ok, cached, skipped, or why it failed: timeout, "
    "budget, unreachable, refused, http_error, too_large, invalid, error).", ["pool", "source", "outcome"])
EVIDENCE_SECONDS = Histogram(
    "kubetriage_evidence_duration_seconds", "Time one evidence gatherer took for one job (cache misses).",
    ["pool", "source"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

INGEST_REQUESTS = Counter(
    "kubetriage_ingest_requests_total", "Ingest HTTP requests, by route and status code.", ["route", "code"])
INGEST_JOBS = Counter("kubetriage_ingest_jobs_total", "TriageJobs ingest handled, by route and result.",
                      ["route", "result"])

ACTIONS = Counter(
    "kubetriage_actions_total", "TriagePolicy actions on verdicts, by action, mode and result (Shadow: would have "
    "run; Retried: failed once, tried again).", ["action", "mode", "result"])
TTL_DELETIONS = Counter("kubetriage_ttl_deletions_total",
                        "Finished TriageJobs deleted when their ttlSecondsAfterFinished ended.")


def start_server(port: int) -> None:
    """Serve /metrics on ``port`` (0 = disabled); a busy port is logged, not fatal."""
    if port <= 0:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("metrics port %d unavailable: %s", port, exc)

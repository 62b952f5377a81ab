"""Prometheus metrics of the operator and the worker (prometheus-client, naming guide conventions)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from kubetriage import __version__

log = logging.getLogger("kubetriage.metrics")

BUILD = Info("kubetriage_build", "Build information.")
BUILD.info({"version": __version__})

JOBS_ADMITTED = Counter("kubetriage_jobs_admitted_total", "TriageJobs queued for analysis.", ["pool", "priority_class"])
JOBS_DUPLICATE = Counter("kubetriage_jobs_duplicate_total", "TriageJobs folded into an earlier one.", ["source"])
VERDICTS = Counter("kubetriage_verdicts_total", "Verdicts recorded.", ["classification", "analyzer"])
JOBS_FAILED = Counter("kubetriage_jobs_failed_total", "TriageJobs that ended Failed.", ["reason"])
LEASE_EXPIRIES = Counter("kubetriage_lease_expiries_total", "Leases that expired (worker lost).", ["pool"])
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


def start_server(port: int) -> None:
    """Serve /metrics on ``port`` (0 = disabled); a busy port is logged, not fatal."""
    if port <= 0:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("metrics port %d unavailable: %s", port, exc)

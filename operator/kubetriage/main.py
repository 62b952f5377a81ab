"""``kubetriage``: the entry point.

The only module that imports the controller and the worker, and it does so lazily inside the
command that needs them, so ``kubetriage submit`` on a laptop loads neither kopf handlers nor analyzers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kubetriage.api.build import VERSION as __version__
from kubetriage.infra.config import Settings


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # one line per HTTP request or handler call drowns what matters (and costs CPU at 1000s of jobs/min)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    from kubetriage.controller import handlers  # noqa: F401 - registers the handlers

    settings = Settings.from_env()
    namespaces = args.namespace or settings.watched_namespaces
    standalone = args.standalone or settings.standalone
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=standalone,
        peering_name=None if standalone else (args.peering or settings.peering),
        # Distinct priorities so one replica is active and the others stand by (equal ones would all pause):
        # by default the start time in milliseconds, so a newer replica (a rolling update) takes over.
        priority=args.priority if args.priority is not None else int(time.time() * 1000) % 2**31,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from kubetriage.worker import runner as worker

    _logging(args.verbose)
    worker.main(Settings.from_env(pool=args.pool, concurrency=args.concurrency))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetriage",
        description="Triage monitoring alerts and failed test runs into false positives and valid failures.",
    )
    parser.add_argument("--version", action="version", version=f"kubetriage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator (kopf) against the current kubeconfig / service account")
    run.add_argument("-n", "--namespace", action="append", help="watch only this namespace (repeatable)")
    run.add_argument("--standalone", action="store_true", help="no peering: for a single replica")
    run.add_argument("--peering", help="peering name (default: KUBETRIAGE_PEERING)")
    run.add_argument("--priority", type=int, help="peering priority (default: start time)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    wk = sub.add_parser("worker", help="run a worker for one pool (needs only Redis)")
    wk.add_argument("--pool", help="namespace/name of the TriagePool (default: KUBETRIAGE_POOL)")
    wk.add_argument("--concurrency", type=int, help="jobs at once (default: KUBETRIAGE_CONCURRENCY)")
    wk.add_argument("-v", "--verbose", action="store_true")
    wk.set_defaults(func=cmd_worker)

    # imported here like the operator's modules above: each command loads only what it needs
    from kubetriage.cli import commands as client  # submit, get, verdict, queue

    client.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""``kubetriage verdict set``: record a human verdict through the verdict annotations."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os

from kubetriage.api.keys import VERDICT, VERDICT_AT, VERDICT_BY, VERDICT_REASON
from kubetriage.api.models import MAX_REASON, MAX_SHORT
from kubetriage.api.timeutil import rfc3339
from kubetriage.cli.common import EXIT_OK, EXIT_USAGE, CliError, api_error, kube_client
from kubetriage.cli.output import emit


async def verdict_set(args: argparse.Namespace) -> int:
    from kubetriage.infra.kube import ApiError, triagejob_path

    reason = args.reason.strip()
    if not reason:
        raise CliError("--reason must say why (the memory analyzer learns from it)", EXIT_USAGE)
    if len(reason) > MAX_REASON:
        raise CliError(f"--reason is {len(reason)} characters; the limit is {MAX_REASON}", EXIT_USAGE)
    by = (args.by or os.environ.get("USER") or getpass.getuser())[:MAX_SHORT]
    patch = {"metadata": {"annotations": {
        VERDICT: args.classification, VERDICT_REASON: reason, VERDICT_BY: by,
        VERDICT_AT: rfc3339(dt.datetime.now(dt.UTC)),
    }}}
    kube = kube_client()
    try:
        ns = args.namespace or kube.default_namespace
        try:
            job = await kube.merge_patch(triagejob_path(ns, args.name), patch)
        except ApiError as exc:
            raise api_error(exc, f"triagejob {args.name!r}", ns) from None
    finally:
        await kube.close()
    if args.output in ("json", "yaml"):
        emit(job, args.output)
    else:
        print(f"triagejob.kubetriage.io/{args.name} verdict set: {args.classification} (by {by})")
    return EXIT_OK

"""``kubetriage verdict set``: record a human verdict through the verdict annotations.

The verdict is recorded under the name the API server authenticated (a SelfSubjectReview), never the local
OS user: with the chart's verdict policy on, the API server refuses any other ``kubetriage.io/verdict-by``.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING

from kubetriage.api.keys import VERDICT, VERDICT_AT, VERDICT_BY, VERDICT_REASON
from kubetriage.api.models import MAX_REASON, MAX_SHORT
from kubetriage.api.timeutil import rfc3339
from kubetriage.cli.common import EXIT_OK, EXIT_USAGE, CliError, api_error, kube_client
from kubetriage.cli.output import emit

if TYPE_CHECKING:
    from kubetriage.infra.kube import Kube

SELF_SUBJECT_REVIEWS = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


async def whoami(kube: Kube) -> str:
    """The user name the API server authenticates these credentials as (every authenticated user may ask)."""
    from kubetriage.infra.kube import ApiError

    try:
        review = await kube.create(SELF_SUBJECT_REVIEWS, {"apiVersion": "authentication.k8s.io/v1",
                                                          "kind": "SelfSubjectReview"})
    except ApiError as exc:
        raise CliError(f"cannot find out who you are (SelfSubjectReview: {exc.status} {exc.message}); "
                       "pass --by with your Kubernetes user name") from None
    name = ((review.get("status") or {}).get("userInfo") or {}).get("username")
    if not isinstance(name, str) or not name:
        raise CliError("the API server's SelfSubjectReview named no user; pass --by with your Kubernetes user name")
    return name


async def verdict_set(args: argparse.Namespace) -> int:
    from kubetriage.infra.kube import ApiError, triagejob_path

    reason = args.reason.strip()
    if not reason:
        raise CliError("--reason must say why (the memory analyzer learns from it)", EXIT_USAGE)
    if len(reason) > MAX_REASON:
        raise CliError(f"--reason is {len(reason)} characters; the limit is {MAX_REASON}", EXIT_USAGE)
    kube = kube_client()
    try:
        ns = args.namespace or kube.default_namespace
        by = (args.by or await whoami(kube))[:MAX_SHORT]
        patch = {"metadata": {"annotations": {
            VERDICT: args.classification, VERDICT_REASON: reason, VERDICT_BY: by,
            VERDICT_AT: rfc3339(dt.datetime.now(dt.UTC)),
        }}}
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

"""What every ``kubetriage`` user command shares: errors and exit codes, the cluster client, argparse helpers."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kubetriage.infra.kube import ApiError, Kube


# kubetriage.infra.kube (kopf, aiohttp) and httpx are imported inside the commands that use them: building the
# parser must stay cheap, since every ``kubetriage worker`` pod builds it too.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TOKEN_ENV = "KUBETRIAGE_INGEST_TOKEN"
EPILOG = "exit codes: 0 success, 1 request failed (refused, not found, API/network error), 2 usage error"


class CliError(Exception):
    """Something the user must fix; printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def kube_client() -> Kube:
    """A client that logs in as kubectl would: the kubeconfig (exec plugins too), else the pod's service account."""
    from kubetriage.infra.kube import Kube
    from kubetriage.infra.kubeconfig import KubeLoginError, cli_login

    try:
        return Kube(login=cli_login())
    except KubeLoginError as exc:  # say what to fix, not a traceback
        raise CliError(f"cannot log in to Kubernetes: {exc} (or use --url for submit)") from None


def api_error(exc: ApiError, what: str, namespace: str) -> CliError:
    if exc.status == 401:  # the message says which kubeconfig and what to do
        return CliError(f"cannot log in to Kubernetes: {exc.message}")
    if exc.status == 404:
        return CliError(f"{what} not found in namespace {namespace!r}")
    if exc.status == 403:
        return CliError(f"forbidden: {exc.message}")
    return CliError(f"Kubernetes API error {exc.status}: {exc.message}")


async def list_all(kube: Kube, path: str, **params: Any) -> list[dict[str, Any]]:
    """All items of a LIST, page by page (a big backlog must not be one huge response)."""
    items: list[dict[str, Any]] = []
    cont = ""
    while True:
        page = await kube.get(path, limit=500, **({"continue": cont} if cont else {}), **params)
        items += page.get("items", [])
        cont = (page.get("metadata") or {}).get("continue") or ""
        if not cont:
            return items


def scope_path(builder: Callable[..., str], all_namespaces: bool, namespace: str) -> str:
    if all_namespaces:
        return builder("_").replace("/namespaces/_", "")
    return builder(namespace)


def pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} expects key=value, got {item!r}", EXIT_USAGE)
        out[key] = value
    return out


def load_file(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return yaml.safe_load(text)  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None


def run_async(func: Callable[[argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    def runner(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(func(args))
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            return 130

    return runner


def add_output(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json", "yaml", "name")) -> None:
    p.add_argument("-o", "--output", choices=choices, default="table", help="output format (default: table)")


def add_namespace(p: argparse.ArgumentParser, all_namespaces: bool = False) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's; with --url the "
                                              "token's default)")
    if all_namespaces:
        p.add_argument("-A", "--all-namespaces", action="store_true", help="across all namespaces")


def add_submit_options(p: argparse.ArgumentParser) -> None:
    add_namespace(p)
    p.add_argument("--url", help="ingest endpoint (e.g. http://kubetriage.kubetriage:8000); default: write "
                                 "TriageJobs to the cluster directly with your kubeconfig")
    p.add_argument("--token", help=f"ingest bearer token for --url (default: ${TOKEN_ENV})")
    p.add_argument("--pool", help="TriagePool for the jobs (default: the operator's default pool)")
    p.add_argument("--priority-class", help="PriorityClass for the jobs (default: by severity / source type)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the ingest endpoint")
    add_output(p)

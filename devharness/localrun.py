"""Start the operator as a local process, the way tests, ``make demo`` and ``make bench`` need it."""

from __future__ import annotations

import sys
from pathlib import Path

from devharness import devenv


def operator_env(*, kubeconfig: Path, redis_url: str, database_url: str, namespaces: str = "",
                 prefix: str = "kt", **settings: str | int | float | bool) -> dict[str, str]:
    env = {
        "KUBECONFIG": str(kubeconfig),
        "KUBETRIAGE_REDIS_URL": redis_url,
        "KUBETRIAGE_REDIS_PREFIX": prefix,
        "KUBETRIAGE_DATABASE_URL": database_url,
        "KUBETRIAGE_NAMESPACES": namespaces,
        "KUBETRIAGE_METRICS_PORT": "0",
        "KUBETRIAGE_HEALTH_PORT": "0",
        "KUBETRIAGE_INGEST_PORT": "0",  # many local operators at once: ingest only where a test asks for it
    }
    for key, value in settings.items():
        env[f"KUBETRIAGE_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def start_operator(log_dir: Path, env: dict[str, str], name: str = "operator", *args: str) -> devenv.Proc:
    """``kubetriage run`` in its own process group (so a test can kill -9 it)."""
    return devenv.spawn(name, [sys.executable, "-m", "kubetriage", "run", *args], log_dir, env=env)

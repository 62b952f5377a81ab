"""Session-wide real servers: kube-apiserver + etcd, Redis, PostgreSQL.

Each is started once per test session on free loopback ports in a temp folder
and stopped at the end; ``pytest_sessionfinish`` then fails the run if any
process carrying this session's harness marker is still alive.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devharness import devenv

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def harness_root() -> Iterator[Path]:
    devenv.harness_id()
    root = Path(tempfile.mkdtemp(prefix="kubetriage-test-"))
    os.chmod(root, 0o755)
    yield root
    if os.environ.get("KUBETRIAGE_KEEP_TEST_ROOT"):
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(harness_root: Path) -> Iterator[devenv.ControlPlane]:
    cp = devenv.ControlPlane(harness_root / "control-plane")
    try:
        cp.start()
        cp.kubectl("apply", "-f", str(CRDS))
        cp.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        cp.kubectl("apply", "-f", str(EXAMPLES / "00-priorityclasses.yaml"))
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def redis_server(harness_root: Path) -> Iterator[devenv.Redis]:
    server = devenv.Redis(harness_root / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server(harness_root: Path) -> Iterator[devenv.Postgres]:
    server = devenv.Postgres(harness_root / "postgres").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pipeline(cluster: devenv.ControlPlane, redis_server: devenv.Redis, tmp_path: Path):
    """A fresh namespace, Redis prefix, SQLite database and local pod runner; start the operator in the test."""
    from tests.pipeline import Pipeline

    async with Pipeline(cluster, redis_server, tmp_path, f"sqlite:///{tmp_path / 'verdicts.db'}") as p:
        yield p


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker = os.environ.get(devenv.HARNESS_ENV)
    if not marker:
        return
    leftovers = devenv.leftover_processes(marker)
    if leftovers:
        lines = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in leftovers)
        print(f"\nFAILED: the test harness left processes behind:\n{lines}")
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        print("\nharness: no process left behind")

"""``make demo`` keeps working: run it (non-interactive) and check what it prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster


def test_demo_prints_verdicts_and_database_rows(cluster: object) -> None:
    # ``cluster`` only makes sure the control-plane binaries are built before the clock starts
    result = subprocess.run([sys.executable, "-m", "devharness.demo", "--exit"], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "offline analyzers only" in out
    table = out.split("NAME", 1)[1]
    for name in ("alert-api-down", "alert-disk-flapping", "script-cart-flaky"):
        line = next(line for line in table.splitlines() if line.startswith(name))
        assert "Succeeded" in line
    assert "-- triage_verdicts" in out
    assert "| EndpointDown | 1 | ai | 0 | valid |" in out
    assert "stopping: workers, operator, redis, control plane" in out

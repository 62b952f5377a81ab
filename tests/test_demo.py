"""``make demo`` keeps working: run it (non-interactive) and check what it prints; in a terminal, Ctrl-C stops it."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from devharness import devenv

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
    # the rule first, waited for the way the README says, then the job it classifies
    assert out.index("kubectl wait --for=condition=Accepted trule/maintenance-worker-12-kernel-patch") \
        < out.index("applying examples/: TriageJobs")
    line = next(line for line in table.splitlines() if line.startswith("alert-maintenance"))
    assert "false_positive" in line, line
    assert "-- triage_verdicts" in out
    assert "| EndpointDown | 1 | ai | 0 | valid |" in out
    assert "stopping: workers, operator, redis, control plane" in out


class Terminal:
    """A pseudo-terminal for the demo (so it keeps running, as in a user's terminal); a thread reads it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the demo and its children closed their side, EBADF once we closed ours
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def hang_up(self) -> None:
        """Close our side, like a terminal window being closed: the demo's writes fail from now on."""
        with contextlib.suppress(OSError):
            os.close(self.master)


def workers(marker: str) -> int:
    return sum("kubetriage worker" in cmd for _, cmd in devenv.leftover_processes(marker))


@pytest.mark.parametrize("moment", ["starting", "running", "terminal-closed"])
def test_ctrl_c_stops_every_process_the_demo_started(cluster: object, moment: str) -> None:
    """README: in a terminal the demo keeps running, and Ctrl-C stops every process it started.

    The signal goes to the demo's process group, as the terminal sends it. ``starting``: while the workers run
    and the demo still waits for verdicts (where the orphaned workers of issue 12 came from); ``running``:
    once it says it keeps running; ``terminal-closed``: the terminal goes away (SIGHUP, writes fail).
    """
    marker = f"{devenv.harness_id()}/ctrl-c-{uuid.uuid4().hex[:8]}"  # nested: the session's check sees it too
    term = Terminal()
    demo = subprocess.Popen([sys.executable, "-m", "devharness.demo"], stdin=term.slave, stdout=term.slave,
                            stderr=term.slave, env={**os.environ, devenv.HARNESS_ENV: marker},
                            start_new_session=True)
    os.close(term.slave)
    left: list[tuple[int, str]] = []
    try:
        if moment == "starting":
            devenv.wait_until(lambda: workers(marker) >= 2, "the demo's two worker processes", timeout=240)
        else:
            devenv.wait_until(lambda: "press Ctrl-C to stop" in term.text, "the demo to be up", timeout=240)
        sig = signal.SIGINT
        if moment == "terminal-closed":
            term.hang_up()
            sig = signal.SIGHUP
        os.killpg(demo.pid, sig)
        code = demo.wait(timeout=180)
        left = devenv.leftover_processes(marker)  # at once: the demo promises to exit only after all did
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        devenv.stop_marked(marker, grace=5)  # whatever the outcome, nothing of this test outlives it
        term.hang_up()
    out = term.text
    assert left == [], f"processes the demo started survived it (exit code {code}):\n" + "\n".join(
        f"  {pid}: {cmd[:150]}" for pid, cmd in left) + f"\n{out[-3000:]}"
    folder = re.search(r"working folder (\S+)", out)
    assert folder and not Path(folder.group(1)).exists(), "the demo's folder was not removed"
    if moment == "terminal-closed":
        return  # nothing more can be read from a closed terminal
    assert "Traceback" not in out, out[-3000:]
    assert "stopping: workers, operator, redis, control plane" in out
    assert "stopped: no process the demo started is running" in out
    if moment == "running":
        assert code == 0, out[-3000:]
    else:  # 128 + SIGINT; 0 if the verdicts came in before the signal did
        assert code in (0, 130), out[-3000:]

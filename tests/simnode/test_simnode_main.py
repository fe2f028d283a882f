"""`maia-simnode`'s entry point (controller/simnode/main.py): a fleet stopped by a signal exits 0,
also when a second SIGTERM comes after its loop closed (`bench e2e` tells every fleet, then each in
turn again, while it waits for them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# The fleet's main() returned after its stop, then signalled again: the loop has closed and given
# its handlers back by then.
_SIGNALLED_AFTER_MAIN = """
import os, signal, sys, time
from controller.simnode import main
code = main.main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
sys.exit(code)
"""


def test_a_sigterm_after_the_fleet_stopped_does_not_kill_it(tmp_path: Path) -> None:
    # No controller there: the node tries to register until it is stopped.
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNALLED_AFTER_MAIN, "--controller", "127.0.0.1:1", "--racks", "1",
         "--nodes-per-rack", "1", "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "starting 1 simulated nodes" in line:
                break
        else:
            raise AssertionError(f"the fleet exited ({proc.wait()}) before it started")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest  # not -15 (SIGTERM's default action)
        assert "all 1 nodes stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

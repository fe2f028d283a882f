"""maia-controller's shutdown deadline: a stop that cannot finish (here a thread nobody joins)
ends with every thread's stack on stderr and exit code 3, never a process that hangs."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from controller.main import EXIT_STUCK


def test_a_stuck_shutdown_dumps_the_stacks_and_exits() -> None:
    script = textwrap.dedent("""
        import threading, time
        from controller.main import exit_if_stuck
        def holds_the_process_forever():
            while True:
                time.sleep(0.05)
        threading.Thread(target=holds_the_process_forever, name="stuck").start()
        exit_if_stuck(0.5)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_STUCK
    assert "shutdown did not finish" in done.stderr
    assert "holds_the_process_forever" in done.stderr  # the stuck thread's stack, for the operator


def test_firing_at_once_is_what_a_second_signal_does() -> None:
    script = textwrap.dedent("""
        from controller.main import exit_if_stuck
        fire = exit_if_stuck(3600)
        fire()
        raise SystemExit("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_STUCK and "not reached" not in done.stderr

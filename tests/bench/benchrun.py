"""A `python -m bench` run in a process session of its own, for tests that stop it part way:
what it started (controller, fleets) shares the session, so a test can ask what is still alive
and kill whatever the run left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def bench_session(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m bench ARGS` (text pipes for stdout and stderr) as the leader of a new session;
    every process of that session is killed on the way out, whatever the test found."""
    bench = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield bench
    finally:
        try:
            os.killpg(bench.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session_processes(session: int) -> list[str]:
    """The process ids still alive in `session`."""
    return subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True,
                          check=False).stdout.split()

"""`bench e2e --others-cpus`: the database server, the fleets and the bench's clients kept on some
CPUs, the controller free. The list's parsing, and `procfs.confine` on real processes and threads
(the end-to-end run that uses them: `test_bench_e2e.py`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys

import pytest

from bench import procfs
from bench.e2e.options import cpu_list

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to keep some apart")

# Starts a child that sleeps and a thread that waits, prints their pid and thread id, and after
# each line on stdin prints the CPUs a thread it starts then runs on (a thread started after the
# confinement inherits it; one started before must be moved itself).
_PARENT = """
import os, subprocess, sys, threading
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
started = threading.Event()
waiting = threading.Thread(target=lambda: (started.set(), threading.Event().wait(120)), daemon=True)
waiting.start(); started.wait()
print(child.pid, waiting.native_id, flush=True)
try:
    for _ in sys.stdin:
        seen = []
        t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(threading.get_native_id()))))
        t.start(); t.join()
        print(",".join(map(str, seen[0])), flush=True)
finally:
    child.kill()
"""


@needs_two
def test_cpu_list_takes_some_of_this_machines_cpus() -> None:
    assert cpu_list(str(CPUS[-1])) == frozenset({CPUS[-1]})
    assert cpu_list(f"{CPUS[0]}-{CPUS[0]}") == frozenset({CPUS[0]})


@needs_two
@pytest.mark.parametrize("text", ["", "x", "1-0", "1-", "-1", ",".join(map(str, CPUS)), f"{CPUS[0]}-{CPUS[-1]}",
                                  str(CPUS[-1] + 1), "0-1000000000"])
def test_cpu_list_refuses_nonsense_all_cpus_and_cpus_it_cannot_use(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cpu_list(text)


def _parent() -> tuple[subprocess.Popen[str], int, int]:
    """The parent, its child's pid, and the id of its thread started before any confinement."""
    proc = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child, thread = proc.stdout.readline().split()
    return proc, int(child), int(thread)


def _new_thread_cpus(proc: subprocess.Popen[str]) -> set[int]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return {int(c) for c in proc.stdout.readline().split(",")}


@needs_two
@pytest.mark.parametrize("with_children", [True, False])
def test_confine_keeps_a_process_its_later_threads_and_when_asked_its_children_on_the_cpus(
        with_children: bool) -> None:
    proc, child, thread = _parent()
    try:
        assert _new_thread_cpus(proc) == set(CPUS)
        one = frozenset({CPUS[-1]})
        procfs.confine(proc.pid, one, with_children=with_children)
        assert os.sched_getaffinity(proc.pid) == one
        assert os.sched_getaffinity(thread) == one  # a thread that was running already
        assert _new_thread_cpus(proc) == one
        assert os.sched_getaffinity(child) == (one if with_children else set(CPUS))
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # its parent's own cleanup does not run on a kill

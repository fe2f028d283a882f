"""A solve leaves the process's signal handlers as they were.

CP-SAT installs a SIGINT handler of its own for a search (`catch_sigint_signal`, on by default)
and afterwards sets SIGINT back to the default action, not to the handler the process had, while
Python still reports its own: after one solve, Ctrl-C killed a controller outright instead of
stopping it cleanly (an exploratory run, 2026-12-05). Run in a child process: a regression kills it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from builders import dep, node, problem

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import json, os, signal, sys
from scheduler import problem_from_dict, solve
caught = []
signal.signal(signal.SIGINT, lambda *_: caught.append(True))
plan = solve(problem_from_dict(json.loads(sys.stdin.read())))
assert "cpsat" in plan.stats, plan.stats  # the search ran
os.kill(os.getpid(), signal.SIGINT)
print(json.dumps({"caught": caught, "placed": len(plan.placements)}))
"""


def test_a_sigint_after_a_cpsat_search_reaches_the_processs_own_handler() -> None:
    doc = problem(nodes=[node(f"n{i}", rack=f"r{i % 2}") for i in range(4)],
                  deployments=[dep("a", acc=2, replicas=3), dep("b", tenant="t2", acc=1, replicas=2)])
    child = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(doc), capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert child.returncode != -signal.SIGINT, "SIGINT's default action killed the process after a solve"
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {"caught": [True], "placed": 5}  # every replica (one shard each)

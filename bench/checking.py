"""Grade a placement state with the independent checker of the test suite (tests/scheduler/checker.py).

The benchmarks end with a state (placements on a cluster) rather than a plan; the checker grades
plans, so the state is handed over as the plan that keeps exactly those placements, with every
replica it does not run listed as unplaced.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def check_state(problem: dict[str, Any], placements: list[dict[str, Any]]) -> list[Any]:
    """The checker's violations of `placements` on `problem`'s cluster and deployments."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scheduler"))
    from checker import check_plan  # type: ignore[import-not-found]
    placed: dict[str, set[int]] = defaultdict(set)
    for p in placements:
        placed[p["deployment"]].add(p["replica"])
    unplaced = [{"deployment": d["id"], "replicas": d["replicas"] - len(placed[d["id"]]),
                 "reasons": [{"code": "CAPACITY", "message": "-"}]}
                for d in problem.get("deployments", ()) if len(placed[d["id"]]) < d["replicas"]]
    return check_plan(problem, {"status": "feasible", "placements": placements, "unplaced": unplaced})

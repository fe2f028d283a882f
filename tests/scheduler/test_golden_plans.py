"""Golden plans: the solver's answer to fixed problems, pinned as JSON.

Behaviour must stay identical while the solver's code is moved around (the pipeline refactor of
issue 9). A deliberate change of behaviour re-pins the plans:

    MAIA_UPDATE_GOLDEN=1 .venv/bin/pytest tests/scheduler/test_golden_plans.py

and the diff of tests/scheduler/golden/ shows what changed. Pinned: status, placements,
unplaced (with reasons), preempted and moved; not stats (timings). Every plan also passes the
independent checker. CP-SAT stops at a deterministic budget, well inside the wall-clock limit
on an idle machine, so the answers do not depend on the machine's speed; on a machine so loaded
that the wall clock decides first (the plan says `time_limit_hit`; or `clock_cut` when it
stopped a CP-SAT search, left CP-SAT no time to run, or cut a move or preemption search; or
`joint_clock_cut` when it stopped the exact pairing of a batch's fractions or left it no time,
`joint_batch.py`), a plan that differs only by its TIME_LIMIT notes passes, and any other
difference is skipped, not failed.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from builders import SHARED, busy_problem, check, move_beats_preemption

from scheduler import plan_to_dict, problem_from_dict, solve

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(REPO))

Doc = dict[str, Any]


def shared_example(name: str) -> Callable[[], Doc]:
    return lambda: json.loads((SHARED / "examples" / f"{name}.problem.json").read_text())


def openb_tiny(batch_size: int) -> Callable[[], Doc]:
    """The FGD protocol's arrivals on the committed 6-node cut of the trace, online."""
    def build() -> Doc:
        from bench import fgd, traces
        tiny = REPO / "tests" / "data" / "openb-tiny"
        nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST, tiny))
        pods = traces.load_pods(traces.trace_path(traces.workload_file("tiny"), tiny))
        arrivals = fgd.seed_arrivals(pods, fgd.capacity_milli(nodes), 42)
        options: Doc = {"mode": "online"}
        if batch_size > 1:
            options["batch_size"] = batch_size
        return {**fgd.cluster_doc(nodes), "options": options,
                "deployments": [fgd.pod_deployment(i, p) for i, p in enumerate(arrivals)]}
    return build


def synthetic(mode: str) -> Callable[[], Doc]:
    """64 Maia-shaped nodes (power budgets, isolation, exclusion, zones), 40 arrivals."""
    def build() -> Doc:
        import random

        from bench import synthetic as syn
        rng = random.Random(3)
        doc = syn.cluster(64, 3)
        return {**doc, "deployments": [syn.arrival(rng, i) for i in range(40)],
                "options": {"mode": mode, "time_limit_ms": 5000}}
    return build


def with_options(build: Callable[..., Doc], **options: Any) -> Callable[[], Doc]:
    def make() -> Doc:
        doc = build()
        doc["options"] = {**doc["options"], **options, "time_limit_ms": 5000}
        return doc
    return make


PROBLEMS: dict[str, Callable[[], Doc]] = {
    "shared-tiny": shared_example("tiny"),
    "shared-tiny-unplaceable": shared_example("tiny-unplaceable"),
    "shared-openb-mini": shared_example("openb-mini"),
    "shared-maia-64": shared_example("maia-64"),
    "move-beats-preemption": with_options(move_beats_preemption),
    "busy-batch": lambda: busy_problem(mode="batch", time_limit_ms=5000),
    "busy-rebalance-preempt": lambda: busy_problem(mode="rebalance", allow_preemption=True,
                                                   max_moves=4, time_limit_ms=5000),
    "openb-tiny-online": openb_tiny(1),
    "openb-tiny-batch4": openb_tiny(4),
    "synthetic-64-online": synthetic("online"),
    "synthetic-64-batch": synthetic("batch"),
}


def pinned(plan_doc: Doc) -> Doc:
    return {k: plan_doc.get(k, []) for k in ("status", "placements", "unplaced", "preempted",
                                             "moved")}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_plan_matches_the_golden_one(name: str) -> None:
    doc = PROBLEMS[name]()
    plan_doc = plan_to_dict(solve(problem_from_dict(copy.deepcopy(doc))))
    assert check(doc, plan_doc) == []
    got = pinned(plan_doc)
    path = GOLDEN / f"{name}.plan.json"
    if os.environ.get("MAIA_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    stats = plan_doc.get("stats") or {}
    if got != want and (stats.get("time_limit_hit") or stats.get("clock_cut") or stats.get("joint_clock_cut")):
        # The wall-clock ceiling, not the deterministic budget, ended the search: this machine
        # was too slow (or too loaded) for the pinned answer, which only a deterministic stop gives.
        if without_time_limit_reasons(got) == want:
            return  # the same plan; only the TIME_LIMIT note differs
        pytest.skip(f"{name}: the wall clock cut the search short on this machine; the pinned plan "
                    f"needs the deterministic budget to end it")
    assert got == want, f"plan for {name} differs from {path.name} (see the module doc)"


def without_time_limit_reasons(plan: Doc) -> Doc:
    unplaced = [{**u, "reasons": [r for r in u["reasons"] if r["code"] != "TIME_LIMIT"]}
                for u in plan["unplaced"]]
    return {**plan, "unplaced": unplaced}

"""Online batches decided jointly (scheduler/joint_batch.py): checked plans, never less placed
than one arrival at a time (but for the big fractions a batch short of empty accelerators
defers, scheduler/defer.py), the same plan twice."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from builders import dep, hbm_bound_pairing, node, placed, problem  # noqa: E402
from checker import check_plan  # noqa: E402
from strategies import problems  # noqa: E402

from scheduler import plan_to_dict, problem_from_dict, solve  # noqa: E402
from scheduler.defer import MIN_MILLI  # noqa: E402
from scheduler.emit import emit_plan  # noqa: E402
from scheduler.joint_batch import place_jointly  # noqa: E402
from scheduler.solve import Solver  # noqa: E402

Doc = dict[str, Any]
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])


def run(doc: Doc) -> Doc:
    return plan_to_dict(solve(problem_from_dict(copy.deepcopy(doc)), time_limit_ms=30_000))


def placed_milli(doc: Doc, plan: Doc) -> int:
    shard = {d["id"]: d["shard"] for d in doc["deployments"]}
    total = 0
    for p in plan["placements"]:
        s = shard[p["deployment"]]
        per = s.get("accelerator_milli", 1000) if s["accelerators"] == 1 else 1000
        total += max(per * len(p["accelerator_indices"]), 1)
    return total


@settings(max_examples=120, **COMMON)
@given(problems(modes=("online",), equal_priority=True, max_deployments=6, existing=False))
def test_a_joint_batch_places_no_less_than_one_arrival_at_a_time(doc: Doc) -> None:
    # An empty cluster (existing=False): the batch is not short of empty accelerators, so it
    # defers nothing and must place at least what one arrival at a time places.
    doc["options"].pop("batch_size", None)
    doc["options"]["allow_preemption"] = False
    one_by_one = run(doc)
    batch = copy.deepcopy(doc)
    batch["options"]["batch_size"] = len(doc["deployments"])
    joint = run(batch)
    note(f"one by one: {one_by_one['placements']}\njoint: {joint['placements']}")
    assert check_plan(batch, joint) == []
    assert placed_milli(batch, joint) >= placed_milli(doc, one_by_one)


def deferred(doc: Doc, plan: Doc) -> list[int]:
    """Milli of each replica the plan deferred (scheduler/defer.py: unplaced, its reason says
    so)."""
    shard = {d["id"]: d["shard"] for d in doc["deployments"]}
    return [shard[u["deployment"]]["accelerator_milli"]
            for u in plan.get("unplaced", [])
            if any(": deferred, " in r["message"] for r in u["reasons"])
            for _ in range(u["replicas"])]


def fractions_batch() -> Doc:
    """Fifteen fractions (7,110 milli) that fill 8 accelerators only when paired well:
    700+300 twice, 470+530, 650+350, 650+320, 810+160, 470+470 and 230."""
    nodes = [node(f"n{i}", acc=2, cpu_milli=32_000) for i in range(4)]
    sizes = [700, 300, 470, 470, 650, 320, 810, 160, 230, 700, 300, 470, 530, 650, 350]
    deps = [dep(f"f{i:02d}", acc=1, accelerator_milli=m, locality="node", cpu_milli=1000)
            for i, m in enumerate(sizes)]
    return problem(nodes, deps, mode="online", batch_size=len(sizes))


def test_the_joint_assignment_alone_gives_a_checked_plan_the_same_twice() -> None:
    doc = fractions_batch()
    plans = []
    for _ in range(2):
        # A limit far past the search's deterministic budget: the clock must not decide.
        solver = Solver(problem_from_dict(copy.deepcopy(doc)), 60_000)
        ds = list(range(len(doc["deployments"])))
        for d in ds:
            solver.workload.observe(solver.state.deps[d].shard)
        place_jointly(solver, solver.placer, ds)
        plans.append(plan_to_dict(emit_plan(solver)))
    assert plans[0]["placements"] == plans[1]["placements"]
    assert check_plan(doc, plans[0]) == []
    assert placed_milli(doc, plans[0]) == 7_110


def test_a_batch_pairs_what_no_order_of_single_decisions_pairs() -> None:
    # Four accelerators; the best is 700+300, 350+600, 750 and 750 (3,450 milli). Every
    # order the batch tries, each fraction decided alone, stops at 3,400 (found by a random
    # search over such batches); the joint assignment reaches the optimum.
    sizes = [350, 750, 750, 300, 700, 750, 300, 600]
    deps = [dep(f"f{i}", acc=1, accelerator_milli=m, locality="node", cpu_milli=1000)
            for i, m in enumerate(sizes)]
    doc = problem([node(f"n{i}", acc=2, cpu_milli=32_000) for i in range(2)], deps,
                  mode="online", batch_size=len(sizes))
    plan = run(doc)
    assert check_plan(doc, plan) == []
    assert placed_milli(doc, plan) == 3_450


def test_batch_mode_pairs_two_fractions_neither_greedy_nor_classes_pair() -> None:
    doc = hbm_bound_pairing()
    plan = run(doc)
    assert check_plan(doc, plan) == []
    assert placed_milli(doc, plan) == 1_700
    pair = [p["node"] for p in plan["placements"] if p["deployment"] == "a"]
    assert len(pair) == 2 and pair[0] == pair[1]


SIZES = (160, 230, 300, 320, 350, 470, 530, 650, 700, 810)  # openb-like fractions
RUNNING_CPU = 500  # CPU milli of each task running before the batch


@st.composite
def fraction_batches(draw: st.DrawFn) -> Doc:
    """A batch of fractions onto a partly used cluster (fractions and whole tasks running, CPU
    may bind), `batch_size` = all. What runs fits its node: an accelerator's fractions within
    1000 milli, a node's tasks within its CPU (a state the checker would refuse before the batch
    is no input: it was drawn once, 3,500 of 3,000 CPU milli on a node)."""
    n_nodes = draw(st.integers(2, 3))
    acc = draw(st.sampled_from([2, 4]))
    cpu = [draw(st.sampled_from([3_000, 64_000])) for _ in range(n_nodes)]
    nodes = [node(f"n{i}", acc=acc, cpu_milli=cpu[i]) for i in range(n_nodes)]
    running, placements, used, cpu_used = [], [], {}, [0] * n_nodes
    for j in range(draw(st.integers(0, n_nodes * acc))):
        milli = draw(st.sampled_from(SIZES))
        i, a = draw(st.integers(0, n_nodes - 1)), draw(st.integers(0, acc - 1))
        at = (f"n{i}", a)
        if used.get(at, 0) + milli > 1000 or cpu_used[i] + RUNNING_CPU > cpu[i]:
            continue
        used[at] = used.get(at, 0) + milli
        cpu_used[i] += RUNNING_CPU
        running.append(dep(f"e{j}", acc=1, accelerator_milli=milli, locality="node",
                           cpu_milli=RUNNING_CPU))
        placements.append(placed(f"e{j}", at[0], [at[1]], milli=milli))
    # Whole tasks on some of the accelerators still empty: a batch may then start short of
    # empty accelerators (scheduler/defer.py).
    empty = [(i, a) for i in range(n_nodes) for a in range(acc) if (f"n{i}", a) not in used]
    for j, (i, a) in enumerate(empty[:draw(st.integers(0, len(empty)))]):
        if cpu_used[i] + RUNNING_CPU > cpu[i]:
            continue
        cpu_used[i] += RUNNING_CPU
        running.append(dep(f"w{j}", acc=1, locality="node", cpu_milli=RUNNING_CPU))
        placements.append(placed(f"w{j}", f"n{i}", [a]))
    sizes = draw(st.lists(st.sampled_from(SIZES), min_size=2, max_size=10))
    batch = [dep(f"f{i}", acc=1, accelerator_milli=m, locality="node",
                 cpu_milli=draw(st.sampled_from([500, 1_000])))
             for i, m in enumerate(sizes)]
    return problem(nodes, [*running, *batch], mode="online", batch_size=len(batch),
                   placements=placements)


@settings(max_examples=40, **COMMON)
@given(fraction_batches())
def test_a_fraction_batch_is_checked_places_no_less_and_repeats(doc: Doc) -> None:
    batch = run(doc)
    one_by_one = copy.deepcopy(doc)
    one_by_one["options"].pop("batch_size")
    alone = run(one_by_one)
    note(f"one by one: {alone['placements']}\nbatch: {batch['placements']}")
    assert check_plan(doc, batch) == []
    # A partly used cluster may leave the batch short of empty accelerators: then it may
    # defer big fractions (and only those), and places no less once they are counted.
    later = deferred(doc, batch)
    assert all(m >= MIN_MILLI for m in later)
    assert len(later) == batch["stats"].get("deferred_replicas", 0)
    assert placed_milli(doc, batch) + sum(later) >= placed_milli(doc, alone)
    assert run(doc)["placements"] == batch["placements"]

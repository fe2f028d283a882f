"""Single-shard scoring: FGD plus the host-balance term, and joint decisions in online batches."""

from __future__ import annotations

import numpy as np
import pytest

from builders import dep, node, placed_count, problem, solve_doc
from scheduler import fragmentation
from scheduler.fragmentation import Workload, node_fragmentation
from scheduler.model import ShardSpec


def where(plan, deployment: str) -> str:
    return next(p.node for p in plan.placements if p.deployment == deployment)


def host_only_after_gpu_work() -> dict:
    """A CPU-poor node with 2 free GPUs, a CPU-rich one with 8, and a host-only arrival.

    The first arrival (pinned to a third model) teaches the workload its CPU per GPU."""
    nodes = [node("poor", rack="r1", acc=2, cpu_milli=10_000, model="a"),
             node("rich", rack="r1", acc=8, cpu_milli=200_000, model="a"),
             node("sink", rack="r1", acc=1, cpu_milli=4_000, model="b")]
    deps = [dep("gpu", acc=1, cpu_milli=4_000, locality="node", accelerator_models=["b"]),
            dep("host", acc=0, cpu_milli=4_000, locality="node")]
    return problem(nodes, deps, mode="online")


def test_host_only_work_leaves_cpu_poor_gpu_nodes_alone() -> None:
    plan = solve_doc(host_only_after_gpu_work())
    assert where(plan, "gpu") == "sink"
    assert where(plan, "host") == "rich"


def test_without_the_balance_term_fgd_drains_the_cpu_poor_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # FGD alone sees no task that stops fitting (6 cores still feed one 4-core task), and
    # best fit sends the task to the node with fewer free GPUs: the reason the term exists.
    monkeypatch.setattr(fragmentation, "BALANCE_WEIGHT", 0.0)
    plan = solve_doc(host_only_after_gpu_work())
    assert where(plan, "host") == "poor"


def test_balance_counts_milli_the_free_cpu_cannot_feed() -> None:
    w = Workload()
    w.observe(ShardSpec(accelerators=1, cpu_milli=4_000))  # 250 milli per cpu core
    w.refresh()
    free = np.array([[1000, 1000], [1000, 1000]])
    cpu = np.array([8_000.0, 6_000.0])  # feeds 2000 milli, 1500 milli
    mem = np.array([1e15, 1e15])
    frag = node_fragmentation(free, cpu, mem, w)
    # FGD part: node 1 fits the task (stranded 0); the balance term adds BALANCE_WEIGHT x 500
    # unfed milli.
    assert frag[0] == pytest.approx(0.0)
    assert frag[1] == pytest.approx(fragmentation.BALANCE_WEIGHT * 500)


def test_workload_without_host_demand_has_no_balance_term() -> None:
    w = Workload()
    w.observe(ShardSpec(accelerators=1))
    w.refresh()
    assert w.host_ratios is None
    frag = node_fragmentation(np.array([[1000]]), np.array([0.0]), np.array([0.0]), w)
    assert frag[0] == pytest.approx(0.0)


def test_online_batch_keeps_priority_first() -> None:
    doc = problem([node("n1")], [dep("low", acc=4, priority=0), dep("high", acc=4, priority=9)],
                  mode="online", batch_size=2)
    assert placed_count(solve_doc(doc), "high") == 1


def test_online_batch_keeps_the_order_that_places_most() -> None:
    # As they arrived, the fraction would take one of the two accelerators and the pair
    # would not fit; the batch plays out other orders and keeps the one placing 2000 milli.
    doc = problem([node("n1", acc=2)],
                  [dep("frac", acc=1, accelerator_milli=600, locality="node"),
                   dep("pair", acc=2, locality="node")], mode="online", batch_size=2)
    plan = solve_doc(doc)
    assert placed_count(plan, "pair") == 1 and placed_count(plan, "frac") == 0
    assert [u.deployment for u in plan.unplaced] == ["frac"]
    assert plan.unplaced[0].reasons  # explained like any other failure


def test_online_batches_are_deterministic_and_prefix_independent() -> None:
    deps = [dep(f"d{i}", acc=1, accelerator_milli=(300, 700, 1000, 450)[i % 4],
                locality="node", cpu_milli=1000 * (1 + i % 3)) for i in range(12)]
    nodes = [node("n1", acc=4, cpu_milli=8000), node("n2", acc=2, cpu_milli=16000)]
    full = solve_doc(problem(nodes, deps, mode="online", batch_size=4))
    again = solve_doc(problem(nodes, deps, mode="online", batch_size=4))
    part = solve_doc(problem(nodes, deps[:8], mode="online", batch_size=4))
    assert full.placements == again.placements
    keep = {f"d{i}" for i in range(8)}
    assert [p for p in full.placements if p.deployment in keep] == list(part.placements)


def test_unrestricted_work_keeps_off_the_model_restricted_work_needs() -> None:
    # 'rare' has already drawn a task that runs only there; best fit alone would put the next,
    # unrestricted task beside it (fuller node) and strand the next 'rare'-only arrival.
    doc = problem([node("n-rare", acc=2, model="rare"), node("n-common", acc=2, model="common")],
                  [dep("only-rare", acc=1, locality="node", accelerator_models=["rare"]),
                   dep("anywhere", acc=1, locality="node")], mode="online")
    plan = solve_doc(doc)
    assert where(plan, "only-rare") == "n-rare"
    assert where(plan, "anywhere") == "n-common"

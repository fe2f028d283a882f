"""Modes, priorities, preemption and moves."""

from __future__ import annotations

import pytest

from builders import codes, dep, node, placed, placed_count, problem, solve_doc


def test_batch_places_higher_priority_first() -> None:
    doc = problem([node("n1")], [dep("low", acc=4, priority=0), dep("high", acc=4, priority=9)])
    plan = solve_doc(doc)
    assert placed_count(plan, "high") == 1 and placed_count(plan, "low") == 0


def test_online_decides_in_listed_order_without_looking_ahead() -> None:
    doc = problem([node("n1")], [dep("low", acc=4, priority=0), dep("high", acc=4, priority=9)],
                  mode="online")
    plan = solve_doc(doc)
    assert placed_count(plan, "low") == 1 and placed_count(plan, "high") == 0


def test_online_batch_size_decides_groups_jointly() -> None:
    doc = problem([node("n1")], [dep("low", acc=4, priority=0), dep("high", acc=4, priority=9)],
                  mode="online", batch_size=2)
    plan = solve_doc(doc)
    assert placed_count(plan, "high") == 1


def test_online_prefix_independence() -> None:
    deps = [dep(f"d{i}", acc=1 + i % 2, locality="node") for i in range(6)]
    nodes = [node("n1"), node("n2", acc=2)]
    full = solve_doc(problem(nodes, deps, mode="online"))
    part = solve_doc(problem(nodes, deps[:4], mode="online"))
    keep = {f"d{i}" for i in range(4)}
    assert [p for p in full.placements if p.deployment in keep] == list(part.placements)


def test_batch_packs_big_gangs_before_small_ones() -> None:
    doc = problem([node("n1", rack="r1"), node("n2", rack="r2")],
                  [dep("small", acc=1, replicas=2, locality="node"), dep("big", acc=4,
                                                                       locality="node")])
    plan = solve_doc(doc)
    assert placed_count(plan, "big") == 1 and placed_count(plan, "small") == 2


def _preemption_doc(allow: bool) -> dict:
    return problem([node("n1"), node("n2")],
                   [dep("burst", acc=2, replicas=2, locality="node", preemptible=True),
                    dep("big", acc=4, replicas=1, locality="node", preemptible=True),
                    dep("vip", acc=4, priority=10)],
                   placements=[placed("burst", "n1", [0, 1], replica=0),
                               placed("burst", "n1", [2, 3], replica=1),
                               placed("big", "n2", [0, 1, 2, 3])],
                   allow_preemption=allow)


def test_no_preemption_unless_allowed() -> None:
    plan = solve_doc(_preemption_doc(False))
    assert placed_count(plan, "vip") == 0 and plan.preempted == ()


def test_preemption_evicts_fewest_whole_replicas() -> None:
    plan = solve_doc(_preemption_doc(True))
    assert placed_count(plan, "vip") == 1
    assert [(p.deployment, p.replica) for p in plan.preempted] == [("big", 0)]
    assert placed_count(plan, "burst") == 2


def test_reservation_allows_preemption_at_equal_priority() -> None:
    doc = problem([node("n1")],
                  [dep("burst", tenant="tb", acc=4, preemptible=True),
                   dep("owed", tenant="ta", acc=4)],
                  tenants=[{"id": "ta", "reserved_accelerators": 4}, {"id": "tb"}],
                  placements=[placed("burst", "n1", [0, 1, 2, 3])], allow_preemption=True)
    plan = solve_doc(doc)
    assert placed_count(plan, "owed") == 1
    assert [(p.deployment, p.replica) for p in plan.preempted] == [("burst", 0)]


@pytest.mark.parametrize("mode", ["batch", "online"])
@pytest.mark.parametrize("first", ["n1", "n2"])
def test_of_victims_equally_many_the_lower_priority_ones_go(mode: str, first: str) -> None:
    """A reservation claim that either of two preemptible replicas' nodes would fit took the node
    whose replica had more shards: a priority-10 replica (two shards of two accelerators) where a
    priority-5 one (one of four) would do, then placed again by preempting more of the priority-5
    work. Of the ways that evict equally many replicas, the one evicting the lower priority is
    taken, wherever it sits."""
    other = "n2" if first == "n1" else "n1"
    doc = problem([node("n1"), node("n2")],
                  [dep("important", tenant="tb", acc=2, shards=2, locality="node", priority=10, preemptible=True),
                   dep("filler", tenant="tb", acc=4, locality="node", priority=5, preemptible=True),
                   dep("owed", tenant="ta", acc=4, locality="node")],
                  tenants=[{"id": "ta", "reserved_accelerators": 4}, {"id": "tb"}],
                  placements=[placed("important", first, [0, 1]), placed("important", first, [2, 3], shard=1),
                              placed("filler", other, [0, 1, 2, 3])],
                  allow_preemption=True, mode=mode)
    plan = solve_doc(doc)
    assert placed_count(plan, "owed") == 1
    assert [(p.deployment, p.replica) for p in plan.preempted] == [("filler", 0)]


def test_no_preemption_of_non_preemptible_work() -> None:
    doc = problem([node("n1")], [dep("steady", acc=4), dep("vip", acc=4, priority=10)],
                  placements=[placed("steady", "n1", [0, 1, 2, 3])], allow_preemption=True)
    plan = solve_doc(doc)
    assert placed_count(plan, "vip") == 0 and codes(plan, "vip") == {"CAPACITY"}


def _rebalance_doc(max_moves: int) -> dict:
    # n1 and n2 each hold 2 of 4 accelerators: the 4-accelerator gang fits only after a move.
    return problem([node("n1"), node("n2")],
                   [dep("a", acc=2, locality="node"), dep("b", acc=2, locality="node"),
                    dep("big", acc=4, locality="node")],
                   placements=[placed("a", "n1", [0, 1]), placed("b", "n2", [0, 1])],
                   mode="rebalance", max_moves=max_moves)


def test_rebalance_respects_max_moves() -> None:
    plan = solve_doc(_rebalance_doc(0))
    assert placed_count(plan, "big") == 0 and plan.moved == ()


def test_rebalance_moves_to_make_room() -> None:
    plan = solve_doc(_rebalance_doc(1))
    assert placed_count(plan, "big") == 1
    assert len(plan.moved) == 1
    assert placed_count(plan, "a") == 1 and placed_count(plan, "b") == 1


def test_batch_never_moves_existing_work() -> None:
    doc = _rebalance_doc(5)
    doc["options"]["mode"] = "batch"
    plan = solve_doc(doc)
    assert plan.moved == () and placed_count(plan, "big") == 0


def test_status_reports_nothing_to_do_as_optimal() -> None:
    doc = problem([node("n1")], [dep("a", locality="node")], placements=[placed("a", "n1", [0])])
    assert solve_doc(doc).status == "optimal"


def test_batch_decides_jointly_where_greedy_would_not() -> None:
    # Greedy takes the biggest first (d0, 2 accelerators, tenant t1) and then t0's work is
    # excluded from the only rack; placing t0's 2.25 accelerators instead is worth more.
    doc = problem([node("n0", acc=2), node("n1", acc=1), node("n2", acc=1)],
                  [dep("d0", tenant="t1", acc=1, shards=2, locality="node"),
                   dep("d1", tenant="t0", acc=2, locality="node"),
                   dep("d2", tenant="t0", accelerator_milli=250, locality="node")],
                  tenants=[{"id": "t0", "excludes": ["t1"]}, {"id": "t1"}])
    plan = solve_doc(doc)
    assert placed_count(plan, "d1") == 1 and placed_count(plan, "d2") == 1
    assert plan.status == "optimal"
    assert plan.stats["objective"] == plan.stats["best_bound"]


def test_model_dump_switch(tmp_path, monkeypatch) -> None:
    target = tmp_path / "model.pb.txt"
    monkeypatch.setenv("MAIA_DUMP_MODEL", str(target))
    solve_doc(problem([node("n1")], [dep("a", acc=2), dep("b", acc=1)]))
    assert target.exists() and "x_d" in target.read_text()


def test_online_a_replica_preempted_in_the_solve_is_not_placed_again_elsewhere() -> None:
    # Found by test_every_plan_passes_the_checker: d2 (tenant t0, priority 1) can only go to
    # rack r1, which t1 (excluding t0) holds with d3's replica 0; it preempts that replica.
    # d3's own turn comes later in the same online solve: placing replica 0 again elsewhere
    # would be a move, which online mode never makes, so it stays preempted.
    nodes = [{"id": n, "rack": r, "accelerators": a}
             for n, r, a in (("n0", "r0", 1), ("n1", "r1", 4), ("n2", "r0", 2), ("n3", "r0", 1),
                             ("n4", "r0", 1))]
    frac = {"accelerators": 1, "accelerator_milli": 250, "memory_mib": 16384}
    doc = {
        "zones": [{"id": "z0"}], "rows": [{"id": "w0", "zone": "z0"}],
        "racks": [{"id": r, "row": "w0"} for r in ("r0", "r1", "r2")],
        "nodes": [{**n, "accelerator_model": "m1", "idle_power_w": 0} for n in nodes],
        "tenants": [{"id": "t0"}, {"id": "t1", "excludes": ["t0"]}],
        "deployments": [
            {"id": "d0", "tenant": "t1", "replicas": 1, "shards_per_replica": 1,
             "shard": {**frac, "accelerator_models": ["m1"]}, "locality": "node",
             "preemptible": True},
            {"id": "d1", "tenant": "t0", "replicas": 1, "shards_per_replica": 1, "shard": frac,
             "locality": "node", "preemptible": True},
            {"id": "d2", "tenant": "t0", "replicas": 1, "shards_per_replica": 1, "priority": 1,
             "shard": {**frac, "hbm_gib": 16}, "locality": "node", "preemptible": True},
            {"id": "d3", "tenant": "t1", "replicas": 2, "shards_per_replica": 3, "shard": frac,
             "locality": "row", "preemptible": True}],
        "placements": [
            {"deployment": d, "replica": 0, "shard": s, "node": n, "accelerator_indices": [i],
             "accelerator_milli": 250}
            for d, s, n, i in (("d0", 0, "n0", 0), ("d3", 0, "n1", 2), ("d3", 1, "n1", 2),
                               ("d3", 2, "n2", 1))],
        "options": {"mode": "online", "time_limit_ms": 2000, "allow_preemption": True}}
    plan = solve_doc(doc)  # the checker: no moves in online mode
    assert plan.moved == ()
    assert [(p.deployment, p.replica) for p in plan.preempted] == [("d3", 0)]
    assert placed_count(plan, "d2") == 1
    assert [(u.deployment, u.replicas) for u in plan.unplaced
            if u.deployment == "d3"] == [("d3", 1)]

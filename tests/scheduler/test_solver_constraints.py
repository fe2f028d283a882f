"""One test per hard rule of the spec: each fails if the solver ignores that rule."""

from __future__ import annotations

import pytest

from builders import codes, dep, messages, node, placed, placed_count, problem, solve_doc

from scheduler import problem_from_dict, solve


def test_whole_accelerators_are_not_oversubscribed() -> None:
    doc = problem([node("n1", acc=4), node("n2", acc=4)], [dep("d", acc=4, replicas=3,
                                                              locality="node")])
    plan = solve_doc(doc)
    assert placed_count(plan, "d") == 2
    assert "CAPACITY" in codes(plan, "d")
    for p in plan.placements:
        assert p.accelerator_indices == (0, 1, 2, 3)


def test_whole_shards_own_distinct_lowest_indices() -> None:
    doc = problem([node("n1", acc=4)], [dep("d", acc=1, replicas=1, shards=3, locality="node")],
                  placements=[placed("x", "n1", [1])] if False else None)
    plan = solve_doc(doc)
    assert sorted(i for p in plan.placements for i in p.accelerator_indices) == [0, 1, 2]


def test_fractions_share_an_accelerator_within_a_tenant_only() -> None:
    same = problem([node("n1", acc=1)], [
        dep("a", tenant="t1", accelerator_milli=500, locality="node"),
        dep("b", tenant="t1", accelerator_milli=500, locality="node")])
    plan = solve_doc(same)
    assert placed_count(plan, "a") == placed_count(plan, "b") == 1
    assert {p.accelerator_indices for p in plan.placements} == {(0,)}
    assert {p.accelerator_milli for p in plan.placements} == {500}

    other = problem([node("n1", acc=1)], [
        dep("a", tenant="t1", accelerator_milli=300, locality="node"),
        dep("b", tenant="t2", accelerator_milli=300, locality="node")])
    plan = solve_doc(other)
    assert placed_count(plan, "a") + placed_count(plan, "b") == 1


def test_fractions_fill_a_partly_used_accelerator_first() -> None:
    doc = problem([node("n1", acc=2)], [dep("b", accelerator_milli=400, locality="node")],
                  placements=[placed("a", "n1", [1], milli=500)])
    doc["deployments"].insert(0, dep("a", accelerator_milli=500, locality="node"))
    plan = solve_doc(doc)
    new = [p for p in plan.placements if p.deployment == "b"]
    assert new[0].accelerator_indices == (1,)


def test_fractions_share_hbm_too() -> None:
    doc = problem([node("n1", acc=1, hbm_gib=64)], [
        dep("a", accelerator_milli=300, hbm_gib=40, locality="node"),
        dep("b", accelerator_milli=300, hbm_gib=40, locality="node")])
    plan = solve_doc(doc)
    assert placed_count(plan, "a") + placed_count(plan, "b") == 1
    assert "HBM" in codes(plan, "b") | codes(plan, "a")


def test_hbm_per_accelerator() -> None:
    plan = solve_doc(problem([node("n1", hbm_gib=32)], [dep("d", hbm_gib=48)]))
    assert placed_count(plan, "d") == 0 and codes(plan, "d") == {"HBM"}


def test_cpu_and_memory() -> None:
    plan = solve_doc(problem([node("n1", cpu_milli=8000, memory_mib=1024)],
                             [dep("c", cpu_milli=6000), dep("c2", cpu_milli=6000),
                              dep("m", memory_mib=2048)]))
    assert placed_count(plan, "c") + placed_count(plan, "c2") == 1
    assert "CPU" in codes(plan, "c") | codes(plan, "c2")
    assert codes(plan, "m") == {"MEMORY"}
    # the reasons name what a shard needs and what the node has free
    assert "need 6000 cpu_milli, n1 has 2000 free" in messages(plan, "c") + messages(plan, "c2")
    assert "need 2048 memory_mib, n1 has 1024 free" in messages(plan, "m")


def test_undeclared_node_resources_are_unlimited() -> None:
    plan = solve_doc(problem([node("n1")], [dep("d", hbm_gib=500, cpu_milli=10**9,
                                                memory_mib=10**9)]))
    assert placed_count(plan, "d") == 1


def test_accelerator_models() -> None:
    plan = solve_doc(problem([node("n1", model="m1"), node("n2", model="m2")],
                             [dep("d", acc=4, accelerator_models=["m2"])]))
    assert [p.node for p in plan.placements] == ["n2"]
    plan = solve_doc(problem([node("n1", model="m1")], [dep("d", accelerator_models=["m2"])]))
    assert codes(plan, "d") == {"ACCELERATOR_MODEL"}


def test_a_replica_is_a_gang() -> None:
    plan = solve_doc(problem([node("n1"), node("n2")], [dep("d", acc=4, shards=3)]))
    assert plan.placements == ()
    assert plan.status == "infeasible"


def test_min_replicas_all_or_nothing() -> None:
    plan = solve_doc(problem([node("n1"), node("n2")],
                             [dep("d", acc=4, replicas=3, min_replicas=3, locality="node")]))
    assert plan.placements == ()
    assert plan.unplaced[0].replicas == 3


def test_locality_node() -> None:
    nodes = [node("n1", acc=2), node("n2", acc=2)]
    plan = solve_doc(problem(nodes, [dep("d", acc=2, shards=2, locality="node")]))
    assert placed_count(plan, "d") == 0 and "LOCALITY" in codes(plan, "d")
    plan = solve_doc(problem(nodes, [dep("d", acc=2, shards=2, locality="rack")]))
    assert placed_count(plan, "d") == 1


def test_locality_rack_and_row() -> None:
    nodes = [node("n1", rack="r1"), node("n2", rack="r2")]
    plan = solve_doc(problem(nodes, [dep("d", acc=4, shards=2, locality="rack")]))
    assert placed_count(plan, "d") == 0 and "LOCALITY" in codes(plan, "d")
    plan = solve_doc(problem(nodes, [dep("d", acc=4, shards=2, locality="row")]))
    assert placed_count(plan, "d") == 1


def test_locality_zone_spans_rows_but_not_zones() -> None:
    nodes = [node("n1", rack="r1"), node("n2", rack="r2")]
    racks = [{"id": "r1", "row": "w1"}, {"id": "r2", "row": "w2"}]
    same_zone = [{"id": "w1", "zone": "z1"}, {"id": "w2", "zone": "z1"}]
    two_zones = [{"id": "w1", "zone": "z1"}, {"id": "w2", "zone": "z2"}]
    d = [dep("d", acc=4, shards=2, locality="zone")]
    assert placed_count(solve_doc(problem(nodes, d, racks=racks, rows=same_zone)), "d") == 1
    assert placed_count(solve_doc(problem(nodes, d, racks=racks, rows=two_zones)), "d") == 0
    d = [dep("d", acc=4, shards=2, locality="none")]
    assert placed_count(solve_doc(problem(nodes, d, racks=racks, rows=two_zones)), "d") == 1


def test_spread() -> None:
    doc = problem([node("n1", acc=8), node("n2", acc=8, state="cordoned")],
                  [dep("d", acc=1, replicas=2, locality="node",
                       spread={"domain": "node", "max_per_domain": 1})])
    plan = solve_doc(doc)
    assert placed_count(plan, "d") == 1 and "SPREAD" in codes(plan, "d")


def test_spread_finer_than_locality_counts_every_touched_domain() -> None:
    nodes = [node(f"n{r}{i}", rack=f"r{r}", acc=1) for r in range(3) for i in range(2)]
    doc = problem(nodes, [dep("d", acc=1, shards=3, replicas=2, locality="row",
                              spread={"domain": "rack", "max_per_domain": 1})])
    plan = solve_doc(doc)
    assert placed_count(plan, "d") == 1  # a second replica would touch some rack twice


def test_isolation_dedicated_node() -> None:
    doc = problem([node("n1"), node("n2", state="cordoned")],
                  [dep("a", tenant="ta", locality="node"), dep("b", tenant="tb", locality="node")],
                  tenants=[{"id": "ta"}, {"id": "tb", "isolation": "dedicated_node"}],
                  placements=[placed("a", "n1", [0])])
    plan = solve_doc(doc)
    assert placed_count(plan, "b") == 0 and codes(plan, "b") == {"ISOLATION", "NODE_STATE"}
    isolation = next(r for u in plan.unplaced for r in u.reasons if r.code == "ISOLATION")
    # dedicated_node is about nodes: the reason names the node and who holds it, never a rack
    assert "node n1 holds ta (shared)" in isolation.message and "rack" not in isolation.message


def test_isolation_protects_the_dedicated_tenant_too() -> None:
    doc = problem([node("n1", rack="r1"), node("n2", rack="r1")],
                  [dep("a", tenant="ta", locality="node"), dep("b", tenant="tb", locality="node")],
                  tenants=[{"id": "ta", "isolation": "dedicated_rack"}, {"id": "tb"}],
                  placements=[placed("a", "n1", [0])])
    plan = solve_doc(doc)
    assert placed_count(plan, "b") == 0 and codes(plan, "b") == {"ISOLATION"}
    isolation = next(r for u in plan.unplaced for r in u.reasons if r.code == "ISOLATION")
    assert "rack r1 holds ta (dedicated_rack)" in isolation.message


def test_isolation_dedicated_rack() -> None:
    doc = problem([node("n1", rack="r1"), node("n2", rack="r1"), node("n3", rack="r2")],
                  [dep("a", tenant="ta", locality="node"), dep("b", tenant="tb", acc=4)],
                  tenants=[{"id": "ta"}, {"id": "tb", "isolation": "dedicated_rack"}],
                  placements=[placed("a", "n1", [0])])
    plan = solve_doc(doc)
    assert [p.node for p in plan.placements if p.deployment == "b"] == ["n3"]


def test_excludes_are_symmetric() -> None:
    doc = problem([node("n1", rack="r1"), node("n2", rack="r1")],
                  [dep("a", tenant="ta", locality="node"), dep("b", tenant="tb", locality="node")],
                  tenants=[{"id": "ta"}, {"id": "tb", "excludes": ["ta"]}],
                  placements=[placed("b", "n1", [0])])
    plan = solve_doc(doc)  # only "tb" lists the exclusion; "ta" must still keep out
    assert placed_count(plan, "a") == 0 and codes(plan, "a") == {"EXCLUSION"}


def test_tenant_zones() -> None:
    nodes = [node("n1", rack="r1")]
    doc = problem(nodes, [dep("d")], rows=[{"id": "w1", "zone": "z1"}],
                  zones=[{"id": "z1"}, {"id": "z2"}], tenants=[{"id": "t1", "zones": ["z2"]}])
    plan = solve_doc(doc)
    assert codes(plan, "d") == {"ZONE"}


def test_max_accelerators_counts_fractions() -> None:
    doc = problem([node("n1", acc=2)],
                  [dep("a", accelerator_milli=500, locality="node"),
                   dep("b", accelerator_milli=600, locality="node")],
                  tenants=[{"id": "t1", "max_accelerators": 1}],
                  placements=[placed("a", "n1", [0], milli=500)])
    plan = solve_doc(doc)
    assert placed_count(plan, "b") == 0 and codes(plan, "b") == {"QUOTA_ACCELERATORS"}


def test_a_tenant_over_its_lowered_cap_keeps_the_search_for_everyone() -> None:
    """A cap lowered below what the tenant holds (accepted: what runs keeps running) made the
    search's model ask that tenant's new work for less than nothing: CP-SAT found it infeasible
    and every tenant got the greedy answer. It now asks for nothing more of that tenant."""
    nodes = [node(f"n{i}", rack=f"r{i // 2}") for i in range(4)]
    doc = problem(nodes, [dep("run", replicas=2, locality="node"), dep("new", locality="node"),
                          dep("x", tenant="t2", replicas=6, shards=2)],
                  tenants=[{"id": "t1", "max_accelerators": 1}, {"id": "t2"}],
                  placements=[placed("run", "n0", [0]), placed("run", "n0", [1], replica=1)])
    plan = solve(problem_from_dict(doc))  # not `solve_doc`: the checker counts the 2 held over the cap of 1
    assert plan.stats["cpsat"] in ("optimal", "feasible")
    assert codes(plan, "new") >= {"QUOTA_ACCELERATORS"} and placed_count(plan, "x") == 6


def test_max_power_counts_shard_power_only() -> None:
    doc = problem([node("n1", idle_power_w=5000)], [dep("d", acc=2, power_w=500)],
                  tenants=[{"id": "t1", "max_power_w": 1000}])
    assert placed_count(solve_doc(doc), "d") == 1  # idle power is not the tenant's
    doc = problem([node("n1")], [dep("d", acc=3, power_w=500)],
                  tenants=[{"id": "t1", "max_power_w": 1000}])
    plan = solve_doc(doc)
    assert codes(plan, "d") == {"QUOTA_POWER"}


def test_rack_power_budget_includes_idle_power() -> None:
    # 4 x 700 W of shards alone fit 3000 W; with 2 x 600 W idle they do not.
    doc = problem([node("n1", idle_power_w=600), node("n2", idle_power_w=600)],
                  [dep("d", acc=2, shards=2, power_w=700)],
                  racks=[{"id": "r1", "row": "w1", "power_budget_w": 3000}])
    plan = solve_doc(doc)
    assert placed_count(plan, "d") == 0
    assert "POWER_RACK" in codes(plan, "d")
    assert "fits if the budget were 4.0 kW" in messages(plan, "d") or \
        "4000 W" in messages(plan, "d")


@pytest.mark.parametrize("mode", ["batch", "online"])
@pytest.mark.parametrize("limit", ["rack", "row", "tenant"])
def test_a_power_budget_or_cap_short_by_a_few_microwatts_is_not_passed(mode: str, limit: str) -> None:
    """60 kW of 15 kW shards over a budget (or max_power_w) of 60 kW less 10 uW: not placed (the
    slack was 1e-9 of a shard, 15 uW of this one, and the checker allows 1 uW); over 60 kW exactly:
    placed."""
    def doc(watts: float) -> dict:
        budget = {"power_budget_w": watts}
        return problem([node("n1", acc=8)], [dep("d", shards=4, power_w=15000, locality="node")],
                       racks=[{"id": "r1", "row": "w1", **(budget if limit == "rack" else {})}],
                       rows=[{"id": "w1", "zone": "z1", **(budget if limit == "row" else {})}],
                       tenants=[{"id": "t1", **({"max_power_w": watts} if limit == "tenant" else {})}],
                       mode=mode)

    short = solve_doc(doc(4 * 15000 - 1e-5))  # solve_doc: the checker finds no violation
    assert placed_count(short, "d") == 0
    assert codes(short, "d") & {"POWER_RACK", "POWER_ROW", "QUOTA_POWER"}
    assert placed_count(solve_doc(doc(4 * 15000)), "d") == 1  # its one replica, four shards


def test_down_nodes_draw_no_idle_power() -> None:
    doc = problem([node("n1", idle_power_w=600), node("n2", idle_power_w=600, state="down")],
                  [dep("d", acc=4, power_w=500)],
                  racks=[{"id": "r1", "row": "w1", "power_budget_w": 2600}])
    assert placed_count(solve_doc(doc), "d") == 1


def test_row_power_budget() -> None:
    nodes = [node("n1", rack="r1", idle_power_w=100), node("n2", rack="r2", idle_power_w=100)]
    doc = problem(nodes, [dep("a", acc=4, power_w=500), dep("b", acc=4, power_w=500)],
                  rows=[{"id": "w1", "zone": "z1", "power_budget_w": 2300}])
    plan = solve_doc(doc)
    assert placed_count(plan, "a") + placed_count(plan, "b") == 1
    assert "POWER_ROW" in codes(plan, "a") | codes(plan, "b")
    [power] = [r for u in plan.unplaced for r in u.reasons if r.code == "POWER_ROW"]
    assert power.scope == "w1"  # the row, named as the rack is for POWER_RACK
    assert "row w1 power: 2200 W used + 2000 W needed > 2300 W budget" in power.message


def test_cordoned_keeps_its_shards_and_takes_none() -> None:
    doc = problem([node("n1", state="cordoned")], [dep("a", locality="node"),
                                                  dep("b", locality="node")],
                  placements=[placed("a", "n1", [0])])
    plan = solve_doc(doc)
    assert [(p.deployment, p.node) for p in plan.placements] == [("a", "n1")]
    assert codes(plan, "b") == {"NODE_STATE"}


def test_down_node_shards_are_placed_again() -> None:
    doc = problem([node("n1", state="down"), node("n2")], [dep("a", acc=2, locality="node")],
                  placements=[placed("a", "n1", [0, 1])])
    plan = solve_doc(doc)
    assert [(p.deployment, p.node) for p in plan.placements] == [("a", "n2")]


def test_a_plan_with_shards_repaired_before_the_search_claims_no_proof() -> None:
    # gang (a dedicated_rack tenant) lost its shard on the down node of rack k1; the repair, before
    # any search, puts it on c (locality none: anywhere): rack k1 is then solo's, and small cannot
    # go on c. Re-placed on big instead (rack k0), small fits: 4000 against 2000. The plan
    # said `optimal` with a bound of 2000 (the model took the repair as given; found by
    # exploratory testing): it may place 2000, but proves nothing.
    nodes = [node("big", rack="k0", acc=4), node("a", rack="k0", acc=1), node("c", rack="k1", acc=2),
             node("down", rack="k1", acc=1, state="down")]
    doc = problem(nodes, [dep("gang", tenant="solo", shards=2, locality="none"), dep("small", tenant="other", acc=2)],
                  tenants=[{"id": "solo", "isolation": "dedicated_rack"}, {"id": "other"}],
                  placements=[placed("gang", "a", [0], shard=0), placed("gang", "down", [0], shard=1)])
    plan = solve_doc(doc)
    assert plan.status == "feasible" and "best_bound" not in plan.stats
    assert placed_count(plan, "gang") == 1


def test_a_reserved_claim_does_not_evict_work_placed_by_preempting() -> None:
    # d2 (priority 1) preempts d0's running gang for a quarter accelerator; then vip, of t0 now
    # below its reservation, evicted d2 (placed in this solve) rather than take the room d0 left:
    # d0 went for nothing (a checker PREEMPTION violation, found by the property test). vip takes
    # the freed room beside d2.
    doc = problem([node(f"n{i}", rack="r0", acc=2) for i in (1, 2, 3)],
                  [dep("d0", tenant="t0", acc=2, shards=3, preemptible=True),
                   dep("d2", tenant="t1", accelerator_milli=250, locality="node", priority=1, preemptible=True),
                   dep("vip", tenant="t0", locality="node")],
                  tenants=[{"id": "t0", "reserved_accelerators": 2}, {"id": "t1"}],
                  placements=[placed("d0", f"n{i}", [0, 1], shard=i - 1) for i in (1, 2, 3)], allow_preemption=True)
    plan = solve_doc(doc)
    assert [(p.deployment, p.replica) for p in plan.preempted] == [("d0", 0)]
    assert placed_count(plan, "d2") == 1 and placed_count(plan, "vip") == 1
    assert {u.deployment for u in plan.unplaced} == {"d0"}


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_min_replicas_gathered_across_nodes_by_preempting_each_ones_victims(mode: str) -> None:
    # Two node-local replicas, min_replicas 2, on two nodes full of lower-priority preemptible
    # singles: each replica needs its own node's victims. A trial had to place both beside the
    # first replica's room, never could, and the deployment never preempted (found by
    # exploratory testing: a reserved tenant's service Pending behind a scavenger for ever).
    singles = [placed("scav", f"n{i // 4}", [i % 4], replica=i) for i in range(8)]
    doc = problem([node("n0", rack="r0"), node("n1", rack="r0")],
                  [dep("scav", tenant="g", replicas=8, locality="node", priority=5, preemptible=True),
                   dep("svc", tenant="d", replicas=2, shards=4, locality="node", priority=50, min_replicas=2)],
                  placements=singles, allow_preemption=True, mode=mode)
    plan = solve_doc(doc)
    assert placed_count(plan, "svc") == 2 and len(plan.preempted) == 8
    assert {p.node for p in plan.placements if p.deployment == "svc"} == {"n0", "n1"}


@pytest.mark.parametrize("budget", ["rack", "row"])
def test_where_power_binds_one_victim_under_the_budget_frees_it(budget: str) -> None:
    # n0 full of 700 W singles, n1 empty, 100 W short of the service's 2,400 W: taking one single
    # out anywhere under the budget lets the service onto n1. The search looked for victims only
    # where the replica would land, so it emptied n0: four evicted for one (exploratory testing).
    # Seventy empty cordoned nodes of the rack, listed first, took the trials and the domain limit
    # from n1 while they were counted as room (review).
    cordoned = [node(f"c{i:02d}", rack="r0", state="cordoned") for i in range(70)]
    doc = problem([node("n0", rack="r0", idle_power_w=600), *cordoned, node("n1", rack="r0", idle_power_w=600)],
                  [dep("scav", tenant="g", replicas=4, locality="node", priority=5, preemptible=True, power_w=700),
                   dep("svc", tenant="d", shards=4, locality="node", priority=50, power_w=600)],
                  racks=[{"id": "r0", "row": "w1", **({"power_budget_w": 6300} if budget == "rack" else {})}],
                  rows=[{"id": "w1", "zone": "z1", **({"power_budget_w": 6300} if budget == "row" else {})}],
                  placements=[placed("scav", "n0", [i], replica=i) for i in range(4)], allow_preemption=True)
    plan = solve_doc(doc)
    assert len(plan.preempted) == 1 and placed_count(plan, "scav") == 3
    assert {p.node for p in plan.placements if p.deployment == "svc"} == {"n1"}


def test_of_equal_victims_the_deployment_running_the_most_loses_one() -> None:
    # b (2 replicas) comes first in the list: by index alone its replica went every time; a runs 4.
    doc = problem([node("n0", rack="r0"), node("n1", rack="r0")],
                  [dep("b", tenant="g", replicas=2, locality="node", preemptible=True),
                   dep("a", tenant="g", replicas=4, locality="node", preemptible=True),
                   dep("firm", tenant="g", acc=2, locality="node"),
                   dep("svc", tenant="d", locality="node", priority=50)],
                  placements=[placed("b", "n0", [0], replica=0), placed("b", "n0", [1], replica=1),
                              placed("a", "n0", [2], replica=0), placed("a", "n0", [3], replica=1),
                              placed("a", "n1", [0], replica=2), placed("a", "n1", [1], replica=3),
                              placed("firm", "n1", [2, 3])], allow_preemption=True)
    plan = solve_doc(doc)
    assert [p.deployment for p in plan.preempted] == ["a"] and placed_count(plan, "svc") == 1


def test_min_replicas_out_of_reach_preempts_nothing() -> None:
    # n1 holds non-preemptible work: one replica's room could be made (n0's singles), the second's
    # never; fewer than min_replicas placed means none, and nobody is evicted for it.
    doc = problem([node("n0", rack="r0"), node("n1", rack="r0")],
                  [dep("scav", tenant="g", replicas=4, locality="node", priority=5, preemptible=True),
                   dep("firm", tenant="g", acc=4, locality="node", priority=5),
                   dep("svc", tenant="d", replicas=2, shards=4, locality="node", priority=50, min_replicas=2)],
                  placements=[placed("scav", "n0", [i], replica=i) for i in range(4)]
                  + [placed("firm", "n1", [0, 1, 2, 3])], allow_preemption=True)
    plan = solve_doc(doc)
    assert placed_count(plan, "svc") == 0 and plan.preempted == () and placed_count(plan, "scav") == 4


def test_the_models_answer_is_realised_where_a_row_gang_could_take_a_small_shards_only_node() -> None:
    # CP-SAT places all 22000 (d2's nine shards across both nodes of the row, d1 beside d3 on n2,
    # the only node with its memory); realised in batch order, d2's gangs filled n2 first (the
    # fuller node) and d1 was left out: 21000, the greedy answer kept (found by exploratory testing).
    doc = problem([node("n1", rack="k1", acc=8, model="m100", memory_mib=8192), node("n2", rack="k2", acc=8, model="m200")],
                  [dep("d1", memory_mib=16384), dep("d2", replicas=3, shards=3, locality="row"),
                   dep("d3", acc=2, accelerator_models=["m200"], priority=5)])
    plan = solve_doc(doc)
    assert plan.unplaced == () and plan.status == "optimal"


def test_existing_placements_count_against_capacity_and_stay() -> None:
    doc = problem([node("n1"), node("n2")], [dep("a", acc=1, locality="node"),
                                             dep("b", acc=4, replicas=2, locality="node")],
                  placements=[placed("a", "n1", [2])])
    plan = solve_doc(doc)
    assert ("a", "n1", (2,)) in {(p.deployment, p.node, p.accelerator_indices)
                                 for p in plan.placements}
    assert placed_count(plan, "b") == 1 and plan.moved == ()

"""Why a gang larger than any domain waits, worded for a person: with no locality the cluster
is the one domain, so its room is the reason (CAPACITY), not a locality "none"; a row or zone the
document left out is not named by its internal id."""

from __future__ import annotations

import pytest

from scheduler import problem_from_dict, solve


def _why(locality: str) -> list[tuple[str, str, str | None]]:
    doc = {"version": 1, "nodes": [{"id": f"n{i}", "rack": "r0" if i < 2 else "r1", "accelerators": 4}
                                   for i in range(4)],
           "deployments": [{"id": "t/g", "tenant": "t", "replicas": 1, "shards_per_replica": 17,
                            "shard": {"accelerators": 1}, "locality": locality}]}
    plan = solve(problem_from_dict(doc))
    return [(r.code, r.message, r.scope) for u in plan.unplaced for r in u.reasons]


CLUSTER_ROOM = ("CAPACITY", "a replica needs 17 shards; the cluster has room for 16 now", None)


@pytest.mark.parametrize("locality, why", [
    ("none", [CLUSTER_ROOM]),
    # The cluster's room binds whatever the locality (it was a LOCALITY reason alone); a domain
    # smaller than the cluster binds too, and is named (never by an internal id such as "_zone").
    ("zone", [CLUSTER_ROOM]),
    ("rack", [CLUSTER_ROOM, ("LOCALITY", "locality rack: a replica needs 17 shards in one rack; the best, r0, "
                                         "has room for 8", "r0")]),
])
def test_a_gang_larger_than_any_domain_says_why_in_words(locality: str, why: list) -> None:
    assert _why(locality) == why


def _one_node(shard: dict, locality: str, **node: object) -> list[tuple[str, str, str | None]]:
    """A gang of 4 on a rack of one 4-accelerator node (100 W idle) whose other rule leaves room for 3."""
    doc = {"version": 1, "racks": [{"id": "rk1", "row": "w1", "power_budget_w": node.pop("budget", None)}],
           "rows": [{"id": "w1", "zone": "z1"}], "zones": [{"id": "z1"}],
           "nodes": [{"id": "n1", "rack": "rk1", "accelerators": 4, "idle_power_w": 100, **node}],
           "deployments": [{"id": "t/g", "tenant": "t", "replicas": 1, "shards_per_replica": 4,
                            "shard": {"accelerators": 1, **shard}, "locality": locality}]}
    if doc["racks"][0]["power_budget_w"] is None:
        del doc["racks"][0]["power_budget_w"]
    plan = solve(problem_from_dict(doc))
    return [(r.code, r.message, r.scope) for u in plan.unplaced for r in u.reasons]


@pytest.mark.parametrize("locality", ["node", "rack", "none"])
def test_a_gang_a_budget_or_a_host_resource_cuts_short_is_told_by_that_rule_with_its_numbers(locality: str) -> None:
    """The node had its 4 accelerators free, but the rack's power fed 3 shards, or its CPU or
    memory held 3: the reason said LOCALITY "room for 3" (or CAPACITY), naming neither the rule
    nor the numbers, because a rule that only lowers a node's room (4 to 3) was counted nowhere."""
    where = {"node": "in one node; POWER_RACK leaves node n1", "rack": "in one rack; POWER_RACK leaves rack rk1",
             "none": "; POWER_RACK leaves the cluster"}[locality]
    assert _one_node({"power_w": 250}, locality, budget=1099) == [(
        "POWER_RACK", f"a replica needs 4 shards {where} room for 3: rack rk1 power: 100 W used + 1000 W needed > "
                      "1099 W budget; fits if the budget were 1100 W".replace("shards ;", "shards;"), "rk1")]
    cpu = _one_node({"cpu_milli": 10_000}, locality, cpu_milli=30_000)
    assert [(code, message.partition(": ")[2]) for code, message, _ in cpu] == [
        ("CPU", "need 10000 cpu_milli, n1 has 30000 free")]
    memory = _one_node({"memory_mib": 1_000}, locality, memory_mib=3_000)
    assert [code for code, _, _ in memory] == ["MEMORY"] and "n1 has 3000 free" in memory[0][1]


def test_the_room_said_is_that_of_the_domain_the_rule_is_said_of() -> None:
    """Rack rkA has its 4 accelerators and CPU for one shard; rack rkB 3 accelerators and CPU for
    all: the CPU reason is about rkA (where the gang would fit without it) and said rkA had room
    for 3, rkB's room. It has room for 1."""
    doc = {"version": 1, "zones": [{"id": "z1"}], "rows": [{"id": "w1", "zone": "z1"}],
           "racks": [{"id": "rkA", "row": "w1"}, {"id": "rkB", "row": "w1"}],
           "nodes": [{"id": "a1", "rack": "rkA", "accelerators": 4, "cpu_milli": 10_000},
                     {"id": "b1", "rack": "rkB", "accelerators": 3, "cpu_milli": 100_000}],
           "deployments": [{"id": "t/g", "tenant": "t", "replicas": 1, "shards_per_replica": 4,
                            "shard": {"accelerators": 1, "cpu_milli": 10_000}, "locality": "rack"}]}
    reasons = [(r.code, r.message) for u in solve(problem_from_dict(doc)).unplaced for r in u.reasons]
    assert reasons == [("CPU", "a replica needs 4 shards in one rack; CPU leaves rack rkA room for 1: "
                               "need 10000 cpu_milli, a1 has 10000 free")], reasons

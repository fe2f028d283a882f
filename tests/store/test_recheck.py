"""The plan applier's re-check (store/recheck.py), table-driven on hand-made states: no database.

Each case commits some shards, lands replicas on top, and names the replicas turned away and
the rule that turned them away."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from controller.store.recheck import RowPower, _neighbourhood, _placements, recheck, shard_usage
from scheduler import problem_from_dict
from scheduler.violations import find_power_violations

# Two racks in one row (budget 2000 W), rack1 with a 1000 W budget; 4-accelerator nodes
# drawing 100 W idle. Tenants: a shared, b dedicated_node, c excludes a.
DOC: dict[str, Any] = {
    "version": 1,
    "zones": [{"id": "z"}],
    "rows": [{"id": "row1", "zone": "z", "power_budget_w": 2000}],
    "racks": [{"id": "rack1", "row": "row1", "power_budget_w": 1000}, {"id": "rack2", "row": "row1"}],
    "nodes": [
        {"id": "n1", "rack": "rack1", "accelerators": 4, "idle_power_w": 100, "state": "ready"},
        {"id": "n2", "rack": "rack1", "accelerators": 4, "idle_power_w": 100, "state": "ready"},
        {"id": "n3", "rack": "rack2", "accelerators": 2, "idle_power_w": 100, "state": "cordoned"},
        {"id": "n4", "rack": "rack2", "accelerators": 4, "idle_power_w": 100, "state": "ready"},
    ],
    "tenants": [{"id": "a"}, {"id": "b", "isolation": "dedicated_node"}, {"id": "c", "excludes": ["a"]}],
    "deployments": [
        {"id": "web", "tenant": "a", "replicas": 4, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": "hot", "tenant": "a", "replicas": 4, "shards_per_replica": 1,
         "shard": {"accelerators": 1, "power_w": 300}},
        {"id": "solo", "tenant": "b", "replicas": 2, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": "rival", "tenant": "c", "replicas": 2, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": "pair", "tenant": "a", "replicas": 1, "shards_per_replica": 2, "shard": {"accelerators": 1}},
    ],
    "placements": [],
}


def W(node: str, *indices: int) -> tuple[str, tuple[int, ...], None]:
    return node, indices, None


CASES = [
    pytest.param({("web", 0, 0): W("n1", 0)}, {("web", 1): {0: W("n1", 1)}}, {}, id="fits"),
    pytest.param({("web", 0, 0): W("n1", 0)}, {("web", 1): {0: W("n1", 0)}, ("web", 2): {0: W("n1", 2)}},
                 {("web", 1): "ACCELERATOR"}, id="accelerator taken since: only that replica"),
    pytest.param({}, {("web", 1): {0: W("n3", 0)}}, {("web", 1): "cordoned"}, id="node cordoned since"),
    pytest.param({}, {("web", 1): {0: W("n9", 0)}}, {("web", 1): "gone"}, id="node gone"),
    pytest.param({}, {("web", 1): {0: W("n4", 5)}}, {("web", 1): "accelerators [5]"}, id="index beyond the node"),
    pytest.param({("web", 0, 0): W("n1", 0)}, {("solo", 0): {0: W("n1", 1)}, ("solo", 1): {0: W("n2", 0)}},
                 {("solo", 0): "dedicated_node"}, id="isolation"),
    pytest.param({("web", 0, 0): W("n1", 0)}, {("rival", 0): {0: W("n2", 0)}, ("rival", 1): {0: W("n4", 0)}},
                 {("rival", 0): "exclude each other"}, id="exclusion"),
    pytest.param({("hot", 0, 0): W("n1", 0), ("hot", 1, 0): W("n2", 0)}, {("hot", 2): {0: W("n2", 1)}},
                 {("hot", 2): "over its budget of 1000 W"}, id="rack power"),
]


@pytest.mark.parametrize(("committed", "landing", "expected"), CASES)
def test_replicas_that_no_longer_fit_are_turned_away(committed: dict, landing: dict, expected: dict) -> None:
    rejected = recheck(DOC, committed, landing)
    assert set(rejected) == set(expected)
    for replica, words in expected.items():
        assert any(words in why for why in rejected[replica]), rejected[replica]


def test_a_violation_the_plan_did_not_worsen_blames_nobody() -> None:
    # rack1 is already over its budget (a hand-edited row, a lowered budget); a replica that
    # draws nothing may still land there, one that draws more may not.
    over = {("hot", r, 0): W("n1", r) for r in range(3)}  # 200 W idle + 900 W
    rejected = recheck(DOC, over, {("web", 0): {0: W("n2", 0)}, ("hot", 3): {0: W("n2", 1)}})
    assert set(rejected) == {("hot", 3)}


def test_a_replica_that_lands_where_a_turned_away_one_stays_is_turned_away_too() -> None:
    # The plan moves web 0 from n1[0] to n1[1] and puts web 1 on n1[0]; but web 2 took n1[1]
    # since: web 0 stays where it is, so web 1 no longer fits either.
    committed = {("web", 0, 0): W("n1", 0), ("web", 2, 0): W("n1", 1)}
    landing = {("web", 0): {0: W("n1", 1)}, ("web", 1): {0: W("n1", 0)}}
    rejected = recheck(DOC, committed, landing)
    assert set(rejected) == {("web", 0), ("web", 1)}


def test_only_the_shards_that_move_must_land_on_a_ready_node() -> None:
    # pair's shard 1 moves off the cordoned n3; shard 0 stays there, as a cordon allows.
    committed = {("pair", 0, 0): W("n3", 0), ("pair", 0, 1): W("n3", 1)}
    assert recheck(DOC, committed, {("pair", 0): {0: W("n3", 0), 1: W("n4", 0)}}) == {}


@pytest.mark.parametrize("seed", range(20))
def test_row_budgets_judged_from_a_rack_and_totals_match_the_whole_row(seed: int) -> None:
    """RowPower (a row judged from the racks read in full, the other committed shards and the
    totals of what was not read) finds exactly the row violations find_power_violations finds
    over the whole row."""
    rng = random.Random(seed)
    doc = {**DOC, "rows": [{"id": "row1", "zone": "z", "power_budget_w": rng.choice([300, 500, 900])}],
           "nodes": [dict(n, state=rng.choice(["ready", "ready", "down"])) for n in DOC["nodes"]]}
    specs = {d["id"]: d for d in doc["deployments"]}
    shards: dict[tuple[str, int, int], Any] = {}
    for replica in range(rng.randint(0, 10)):
        name = rng.choice(sorted(specs))
        node = rng.choice(doc["nodes"])
        shards[(name, replica, 0)] = W(node["id"], rng.randrange(node["accelerators"]))
    judged = rng.choice(["rack1", "rack2"])
    problem = _neighbourhood(doc, {n["id"] for n in doc["nodes"] if n["rack"] == judged}, shards, set())
    local = {n.id for n in problem.nodes}
    # What a scoped commit did not read: some of the shards on the other rack, as totals.
    unread: dict[str, dict[str, float]] = {"row1": {}}
    read = dict(shards)
    for key, where in shards.items():
        if where[0] not in local and rng.random() < 0.5:
            del read[key]
            tenant = specs[key[0]]["tenant"]
            unread["row1"][tenant] = unread["row1"].get(tenant, 0.0) + shard_usage(specs[key[0]]["shard"], where).power_w

    found = RowPower(doc, read, unread, problem).violations(_placements(read, {}, local))

    whole = problem_from_dict({**doc, "placements": []})
    whole = replace(whole, placements=_placements(shards, {}, {n.id for n in whole.nodes}))
    assert found == [v for v in find_power_violations(whole) if v.scope.startswith("row ")]

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


def _random_state(rng: random.Random, rack_rules: bool) -> tuple[dict[str, Any], dict, dict]:
    """Two rows of two racks of three small nodes (some with HBM, CPU or memory bounds; some
    cordoned), tenants (one dedicated to its nodes, one zoned), deployments of 1-2 shards; shards
    committed at random (some on taken accelerators: violations already there) and replicas
    landing at random. With `rack_rules`, a rule of a rack's scope too (a rack power budget, a
    tenant dedicated to racks, or an exclusion)."""
    racks = {"r1": "row1", "r2": "row1", "r3": "row2", "r4": "row2"}
    nodes = [{"id": f"{rack}-n{i}", "rack": rack, "accelerators": 4, "idle_power_w": 50,
              "state": rng.choice(["ready"] * 5 + ["cordoned"]),
              **rng.choice([{}, {"hbm_gib": 32}, {"cpu_milli": 4000}, {"memory_mib": 8192}])}
             for rack in racks for i in range(3)]
    tenants = [{"id": "a"}, {"id": "b", "isolation": "dedicated_node"}, {"id": "c", "zones": ["z1"]}, {"id": "d"}]
    doc_racks = [{"id": rack, "row": row} for rack, row in racks.items()]
    if rack_rules:
        kind = rng.choice(["budget", "dedicated_rack", "excludes"])
        if kind == "budget":
            doc_racks[rng.randrange(4)]["power_budget_w"] = rng.choice([300, 600])
        elif kind == "dedicated_rack":
            tenants[3]["isolation"] = "dedicated_rack"
        else:
            tenants[3]["excludes"] = ["a"]
    doc = {"version": 1, "zones": [{"id": "z1"}, {"id": "z2"}],
           "rows": [{"id": "row1", "zone": "z1"}, {"id": "row2", "zone": "z2"}], "racks": doc_racks,
           "nodes": nodes, "tenants": tenants,
           "deployments": [{"id": f"x{i}", "tenant": rng.choice("abcd"), "replicas": 4,
                            "shards_per_replica": rng.randint(1, 2),
                            "shard": {"accelerators": rng.randint(1, 2), "hbm_gib": rng.choice([0, 16, 48]),
                                      "cpu_milli": rng.choice([0, 1000, 3000]), "memory_mib": rng.choice([0, 4096]),
                                      "power_w": rng.choice([0, 100, 300])}}
                           for i in range(8)],
           "placements": []}

    def shards(d: dict[str, Any]) -> dict[int, Any]:
        return {s: W(rng.choice(nodes)["id"], *sorted(rng.sample(range(4), d["shard"]["accelerators"])))
                for s in range(d["shards_per_replica"])}

    committed: dict[tuple[str, int, int], Any] = {}
    landing: dict[tuple[str, int], dict[int, Any]] = {}
    for d in doc["deployments"]:
        for replica in range(d["replicas"]):
            roll = rng.random()
            if roll < 0.4:
                committed.update(((d["id"], replica, s), w) for s, w in shards(d).items())
            elif roll < 0.55:
                landing[(d["id"], replica)] = shards(d)
    return doc, committed, landing


@pytest.mark.parametrize("seed", range(60))
def test_replicas_judged_on_the_nodes_they_land_on_are_turned_away_as_over_their_racks(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a rule of a rack's scope, the re-check judges the nodes the landing replicas land
    on alone; it turns away exactly the replicas (with exactly the reasons) that judging every
    node of their racks turns away."""
    import controller.store.recheck as module

    rng = random.Random(seed)
    doc, committed, landing = _random_state(rng, rack_rules=seed % 3 == 0)
    touched = {w[0] for shards in landing.values() for w in shards.values()}
    if seed % 3:  # no rule of a rack's scope anywhere: the nodes alone
        assert module.judged_nodes(doc, touched) == [n for n in doc["nodes"] if n["id"] in touched]

    found = recheck(doc, committed, landing)
    monkeypatch.setattr(module, "judged_nodes", lambda doc, touched: [
        n for n in doc["nodes"] if n["rack"] in {m["rack"] for m in doc["nodes"] if m["id"] in touched}])
    assert found == recheck(doc, committed, landing)


def test_the_random_states_turn_replicas_away_by_node_rules_and_rack_rules() -> None:
    # (So that the comparison above compares refusals, of every kind.)
    why: set[str] = set()
    for seed in range(60):
        doc, committed, landing = _random_state(random.Random(seed), rack_rules=seed % 3 == 0)
        why.update(reason.split(":")[0] for reasons in recheck(doc, committed, landing).values() for reason in reasons)
    assert {"ACCELERATOR", "HBM", "CPU", "ISOLATION", "ZONE", "POWER"} <= why, why


def test_a_tenant_dedicated_to_racks_is_judged_over_the_rack() -> None:
    # No exclusion, no rack budget: a tenant dedicated to racks alone makes the rack the scope.
    doc = {**DOC, "racks": [{"id": "rack1", "row": "row1"}, {"id": "rack2", "row": "row1"}],
           "rows": [{"id": "row1", "zone": "z"}],
           "tenants": [{"id": "a"}, {"id": "b", "isolation": "dedicated_rack"}]}
    committed = {("web", 0, 0): W("n1", 0)}
    rejected = recheck(doc, committed, {("solo", 0): {0: W("n2", 0)}, ("solo", 1): {0: W("n4", 0)}})
    assert list(rejected) == [("solo", 0)] and "rack rack1" in rejected[("solo", 0)][0]

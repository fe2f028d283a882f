"""A gang with a spread rule that lost shards (a down node) is made whole beside its own
survivors: the replica is not counted against its own spread, so the survivors keep their
node, accelerators and shard index and only the lost shards move (`repair`, in a full solve
and in the warm session)."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from builders import dep, node, placed, problem, solve_doc  # noqa: E402

from scheduler import problem_from_dict  # noqa: E402
from scheduler.session import ClusterDelta, Session  # noqa: E402


def _two_racks(down: bool, spread: dict | None) -> dict:
    """Racks k1 (a1..a4) and k2 (b1..b4) of 4-accelerator nodes; replica 0 of `g` (12 shards of
    one accelerator, rack-local) on a1, a2 and a3, replica 1 on b1, b2 and b3. Placed again
    whole, replica 0 would be renumbered: shards 4-7 on a3, 8-11 on a4."""
    nodes = [node(f"{r}{i}", rack=f"k{1 if r == 'a' else 2}", acc=4,
                  state="down" if down and f"{r}{i}" == "a2" else "ready") for r in "ab" for i in (1, 2, 3, 4)]
    places = []
    for replica, prefix in ((0, "a"), (1, "b")):
        for shard in range(12):
            host = f"{prefix}{1 + shard // 4}"
            places.append(placed("g", host, [shard % 4], replica=replica, shard=shard))
    extra = {"spread": spread} if spread else {}
    return problem(nodes, [dep("g", replicas=2, shards=12, locality="rack", min_replicas=1, **extra)],
                   placements=places, mode="online")


SPREADS = [{"domain": "rack", "max_per_domain": 1}, {"domain": "row", "max_per_domain": 2}, None]


@pytest.mark.parametrize("spread", SPREADS, ids=["rack", "row", "none"])
@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_solve_places_only_the_lost_shards_of_a_spread_gang(spread, mode) -> None:
    doc = _two_racks(True, spread)
    doc["options"]["mode"] = mode
    plan = solve_doc(doc)
    where = {(p.replica, p.shard): (p.node, p.accelerator_indices) for p in plan.placements}
    given = {(p["replica"], p["shard"]): (p["node"], tuple(p["accelerator_indices"])) for p in doc["placements"]}
    assert set(where) == set(given)
    for key, at in given.items():
        if at[0] != "a2":
            assert where[key] == at, key  # a survivor keeps its node, accelerators and index
    assert sorted((m.replica, m.shard, m.from_node, m.to_node) for m in plan.moved) == \
        [(0, s, "a2", "a4") for s in range(4, 8)]


@pytest.mark.parametrize("spread", SPREADS, ids=["rack", "row", "none"])
def test_the_session_repairs_a_spread_gang_beside_its_survivors(spread) -> None:
    doc = _two_racks(False, spread)
    s = Session(problem_from_dict(copy.deepcopy(doc)))
    a2 = next(n for n in problem_from_dict(doc).nodes if n.id == "a2")
    decisions = s.apply(ClusterDelta(nodes=(dataclasses.replace(a2, state="down"),)))
    assert len(decisions) == 1 and decisions[0].released == ()
    assert sorted((m.replica, m.shard, m.from_node, m.to_node) for m in decisions[0].moved) == \
        [(0, sh, "a2", "a4") for sh in range(4, 8)]
    after = {(p.replica, p.shard): (p.node, p.accelerator_indices) for p in s.snapshot().placements}
    for p in doc["placements"]:
        if p["node"] != "a2":
            assert after[(p["replica"], p["shard"])] == (p["node"], tuple(p["accelerator_indices"]))


def test_a_node_spread_gang_takes_the_room_beside_its_own_shards() -> None:
    # Spread over nodes, at most one replica a node: replica 0 holds shards 0-1 on n1's
    # accelerators 2-3 (0-1 free) and 2-3 on n2; replica 1 fills n3. n2 goes down: the only room
    # in the rack is beside replica 0's own shards on n1, which its spread does not forbid it.
    nodes = [node("n1"), node("n2", state="down"), node("n3")]
    places = [placed("g", "n1", [2], shard=0), placed("g", "n1", [3], shard=1),
              placed("g", "n2", [0], shard=2), placed("g", "n2", [1], shard=3)]
    places += [placed("g", "n3", [i], replica=1, shard=i) for i in range(4)]
    doc = problem(nodes, [dep("g", replicas=2, shards=4, locality="rack", spread={"domain": "node", "max_per_domain": 1})],
                  placements=places, mode="online")
    plan = solve_doc(doc)
    where = {(p.replica, p.shard): (p.node, p.accelerator_indices) for p in plan.placements}
    assert where[(0, 0)] == ("n1", (2,)) and where[(0, 1)] == ("n1", (3,))
    assert {where[(0, 2)], where[(0, 3)]} == {("n1", (0,)), ("n1", (1,))}
    assert sorted((m.replica, m.shard, m.from_node, m.to_node) for m in plan.moved) == \
        [(0, 2, "n2", "n1"), (0, 3, "n2", "n1")]

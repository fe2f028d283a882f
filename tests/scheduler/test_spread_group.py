"""`spread_group` (an extension of the interchange format, scheduler/interchange.py): deployments
naming one group count together toward each one's spread where a place allows it, else each
counts its own replicas (the spec's rule). The controller names a deployment's replicas being
replaced so (controller/store/rollout.py); docs/rollout.md says what that promises."""

from __future__ import annotations

import pytest
from builders import codes, dep, node, placed, placed_count, problem, solve_doc

from scheduler import problem_from_dict
from scheduler.errors import ProblemError
from scheduler.interchange import deployment_to_dict
from scheduler.session import Session

SPREAD = {"domain": "rack", "max_per_domain": 1}
# Three racks of two 4-accelerator nodes, each 500 W idle; a shard takes a node's 4 x 700 W.
RACKS = ("r1", "r2", "r3")


def _nodes() -> list[dict]:
    return [node(f"{r}-n{i}", rack=r, acc=4, idle_power_w=500) for r in RACKS for i in range(2)]


def _racks(r3_budget_w: float) -> list[dict]:
    return [{"id": r, "row": "w1", "power_budget_w": r3_budget_w if r == "r3" else 10000.0} for r in RACKS]


def _rolling(*, r3_budget_w: float = 10000.0, group: bool = True, mode: str = "batch") -> dict:
    """`svc` has a replica running in r1; the replica it replaces (`svc~1`) runs in r2, whose
    other node best fit prefers for svc's second replica over r3's two free ones."""
    extra = {"spread_group": "svc"} if group else {}
    deps = [dep("svc", acc=4, shards=1, replicas=2, power_w=700, spread=SPREAD, **extra),
            dep("svc~1", acc=4, shards=1, replicas=1, power_w=700, spread=SPREAD, **extra)]
    return problem(_nodes(), deps, racks=_racks(r3_budget_w), mode=mode,
                   placements=[placed("svc", "r1-n0", [0, 1, 2, 3]), placed("svc~1", "r2-n0", [0, 1, 2, 3])])


def _rack_of(plan, deployment: str, replica: int) -> str:
    return next(p.node.split("-")[0] for p in plan.placements if (p.deployment, p.replica) == (deployment, replica))


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_a_group_counts_its_members_replicas_toward_the_spread(mode: str) -> None:
    plan = solve_doc(_rolling(mode=mode))
    assert _rack_of(plan, "svc", 1) == "r3"  # not beside svc~1 in r2, which best fit prefers
    ungrouped = solve_doc(_rolling(group=False, mode=mode))
    assert _rack_of(ungrouped, "svc", 1) == "r2"  # the spec's rule alone: svc~1 is another deployment


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_without_room_apart_a_member_counts_its_own_replicas_only(mode: str) -> None:
    plan = solve_doc(_rolling(r3_budget_w=1500.0, mode=mode))  # r3: 1000 W idle + 2800 W > 1500 W
    assert placed_count(plan, "svc") == 2 and _rack_of(plan, "svc", 1) == "r2"
    assert not plan.unplaced


def test_the_own_rule_still_binds_when_falling_back() -> None:
    """Nothing apart, and the own spread full too: unplaced with the SPREAD reason."""
    doc = _rolling(r3_budget_w=1500.0)
    doc["placements"].append(placed("svc", "r2-n1", [0, 1, 2, 3], replica=1))
    doc["deployments"][0]["replicas"] = 3
    plan = solve_doc(doc)
    assert placed_count(plan, "svc") == 2 and "SPREAD" in codes(plan, "svc")


def test_a_warm_session_counts_the_group_of_an_arriving_member() -> None:
    """The session knows svc~1 alone; svc arrives (`ClusterState.add_deployment`) with a
    replica in r1 and places its second one apart from svc~1."""
    doc = _rolling(mode="online")
    svc = problem_from_dict(doc).deployments[0]
    session = Session(problem_from_dict(dict(doc, deployments=doc["deployments"][1:], placements=doc["placements"][1:])))
    session.adopt(svc, [p for p in problem_from_dict(doc).placements if p.deployment == "svc"])
    decision = session.place("svc")
    assert [p.node for p in decision.placements] == ["r3-n0"]


def test_spread_group_is_read_written_and_checked() -> None:
    doc = _rolling()
    parsed = problem_from_dict(doc).deployments[0]
    assert parsed.spread_group == "svc" and deployment_to_dict(parsed)["spread_group"] == "svc"
    plain = problem_from_dict(_rolling(group=False)).deployments[0]
    assert plain.spread_group is None and "spread_group" not in deployment_to_dict(plain)
    doc["deployments"][0]["spread_group"] = ""
    with pytest.raises(ProblemError, match="spread_group"):
        problem_from_dict(doc)

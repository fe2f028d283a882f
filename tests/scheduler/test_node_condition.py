"""A node's `condition` (an interchange extension, scheduler/interchange.py): words for why a
node that is not ready is so, which the reasons say instead of its state. The controller gives
the solver a suspect node, and a down one whose work is not evicted yet, as `cordoned` (it keeps
its shards and takes no new ones), and the reasons called them cordoned. Nothing is decided by it."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from builders import dep, node, problem
from scheduler import problem_from_dict, problem_to_dict, solve
from scheduler.session import ClusterDelta, Session


def _doc(condition: Any = None) -> dict[str, Any]:
    held = node("n1", state="cordoned", **({"condition": condition} if condition is not None else {}))
    return problem([held, node("n2", acc=1)], [dep("t1/d", replicas=2, locality="node")], mode="online")


def _node_state_reason(plan) -> str:
    return next(r.message for u in plan.unplaced for r in u.reasons if r.code == "NODE_STATE")


def test_the_reasons_say_a_nodes_condition_and_the_plan_is_the_same() -> None:
    with_it, without = solve(problem_from_dict(_doc("suspect"))), solve(problem_from_dict(_doc()))
    assert _node_state_reason(with_it).endswith("not ready: n1 (suspect)")
    assert _node_state_reason(without).endswith("not ready: n1 (cordoned)")
    assert with_it.placements == without.placements and len(with_it.placements) == 1


def test_a_condition_round_trips_and_one_not_a_short_string_is_ignored() -> None:
    assert problem_to_dict(problem_from_dict(_doc("suspect")))["nodes"][0]["condition"] == "suspect"
    for other in (7, "", "x" * 65, {"why": "suspect"}):  # another producer's field of that name
        parsed = problem_from_dict(_doc(other))
        assert parsed.nodes[0].condition is None and "condition" not in problem_to_dict(parsed)["nodes"][0]


def test_a_warm_session_says_the_condition_a_node_delta_brings() -> None:
    """A session flips a node's readiness in place (a cordon); its condition goes with it."""
    session = Session(problem_from_dict(copy.deepcopy(_doc())))
    n1 = next(n for n in session.snapshot().nodes if n.id == "n1")
    for condition in ("suspect", "down, its work not evicted yet"):
        session.apply(ClusterDelta(nodes=(dataclasses.replace(n1, condition=condition),)))
        arrival = problem_from_dict(problem([node("n1"), node("n2", acc=1)],
                                            [dep("t1/e", replicas=2, locality="node")])).deployments[0]
        decision = session.place(arrival)
        assert decision.unplaced is not None
        said = next(r.message for r in decision.unplaced.reasons if r.code == "NODE_STATE")
        assert said.endswith(f"not ready: n1 ({condition})"), said
        session.release(arrival.id)

"""How many replacements a rollout places at once: the surge (`maia-controller --max-surge`)."""
from __future__ import annotations

import pytest

from controller.config import parse_args
from controller.store.rollout import DEFAULT_SURGE, StoredReplica, solver_view

DOC = {"id": "svc", "tenant": "lab", "replicas": 4, "shards_per_replica": 1, "min_replicas": 4,
       "shard": {"accelerators": 1}, "locality": "node"}


def _old_replicas(count: int) -> list[StoredReplica]:
    """`count` running replicas of revision 1, one per node."""
    return [StoredReplica(i, 1, ({"deployment": "svc", "replica": i, "shard": 0, "node": f"n{i}",
                                  "accelerator_indices": [0]},), frozenset({f"n{i}"})) for i in range(count)]


@pytest.mark.parametrize(("surge", "replacements"), [(1, 1), (2, 2), (3, 3), (4, 4), (9, 4)])
def test_a_rollout_places_up_to_the_surge_beside_the_replicas_it_replaces(surge: int, replacements: int) -> None:
    view = solver_view(DOC, 2, {"1": DOC}, _old_replicas(4), evicted=set(), draining=set(), surge=surge)
    current, outgoing = view.deployments
    assert (current["id"], current["replicas"]) == ("svc", replacements)
    assert (outgoing["id"], outgoing["replicas"]) == ("svc~1", 4)  # every old replica runs on meanwhile


def test_without_a_rollout_the_surge_changes_nothing() -> None:
    replicas = [StoredReplica(r.index, 2, r.placements, r.nodes) for r in _old_replicas(4)]
    for surge in (1, 3):
        [current] = solver_view(DOC, 2, {}, replicas, evicted=set(), draining=set(), surge=surge).deployments
        assert current["replicas"] == 4


def test_max_surge_is_a_controller_flag_of_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([], env={}).max_surge == DEFAULT_SURGE == 1
    assert parse_args(["--max-surge", "3"], env={}).max_surge == 3
    with pytest.raises(SystemExit):
        parse_args(["--max-surge", "0"], env={})
    assert "--max-surge" in capsys.readouterr().err


def _replica(index: int, revision: int, node: str) -> StoredReplica:
    return StoredReplica(index, revision, ({"deployment": "svc", "replica": index, "shard": 0, "node": node,
                                            "accelerator_indices": [0]},), frozenset({node}))


@pytest.mark.parametrize(("current", "kept"), [(0, [0, 1]), (1, [0]), (2, []), (4, [])])
def test_old_replicas_on_an_evicted_node_are_placed_again_while_the_deployment_is_short(current: int,
                                                                                       kept: list[int]) -> None:
    """Old replicas 0 and 1 on evicted nodes, 2 and 3 running elsewhere, `current` replicas of
    the new revision placed: the old ones lost are kept (to be placed again at revision 1) only
    as far as the deployment would be short of its 4 replicas without them. Those on a node both
    draining and evicted never are: an old one (30) and one of the new revision (20)."""
    old = [_replica(i, 1, f"n{i}") for i in range(4)]
    new = [_replica(10 + i, 2, f"m{i}") for i in range(current)]
    drained = [_replica(30, 1, "d0"), _replica(20, 2, "d0")]
    view = solver_view(DOC, 2, {"1": DOC}, [*drained, *old, *new], evicted={"n0", "n1", "d0"}, draining={"d0"})
    assert sorted(view.refs["svc~1"].replicas.values()) == sorted([*kept, 2, 3])
    assert not {20, 30} & {i for ref in view.refs.values() for i in ref.replicas.values()}


def test_a_rollout_that_raises_the_priority_never_preempts_its_own_old_replicas() -> None:
    """Priority and preemptibility are not the template: they apply at once to the replicas of
    every revision. The outgoing revision kept its own, so a rolling change that also raised a
    preemptible deployment's priority had its new replicas preempt their own old ones on a full
    cluster (running 2 -> 0, the replacements never started). They stall on capacity instead."""
    from scheduler import problem_from_dict, solve

    old = dict(DOC, replicas=2, min_replicas=2, preemptible=True, shard={"accelerators": 4, "hbm_gib": 16.0})
    new = dict(old, priority=10, shard={"accelerators": 4, "hbm_gib": 24.0})
    replicas = [StoredReplica(i, 1, ({"deployment": "svc", "replica": i, "shard": 0, "node": f"n{i}",
                                      "accelerator_indices": [0, 1, 2, 3]},), frozenset({f"n{i}"})) for i in range(2)]
    view = solver_view(new, 2, {"1": old}, replicas, evicted=set(), draining=set(), surge=1)
    current, outgoing = view.deployments
    assert (outgoing["priority"], outgoing["preemptible"]) == (current["priority"], current["preemptible"]) == (10, True)
    problem = {"version": 1, "options": {"mode": "online", "allow_preemption": True}, "tenants": [{"id": "lab"}],
               "nodes": [{"id": f"n{i}", "rack": "r", "accelerators": 4, "hbm_gib": 32.0} for i in range(2)],
               "deployments": view.deployments, "placements": view.placements}
    plan = solve(problem_from_dict(problem))
    assert plan.preempted == ()
    assert sorted((p.deployment, p.node) for p in plan.placements) == [("svc~1", "n0"), ("svc~1", "n1")]

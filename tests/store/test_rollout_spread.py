"""Spread while replicas are replaced (a drain, a rollout): the replicas being replaced still run
during make-before-break, so a replacement is placed where the deployment's spread holds with
them counted, when such a place exists (docs/rollout.md).

The problems are built as the controller builds them (`solver_view`): the deployment's current
replicas, and its outgoing ones as a solver deployment of their own (`TENANT/NAME~REV`)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from controller.store.rollout import StoredReplica, solver_view
from scheduler import problem_from_dict, solve
from scheduler.session import Session

RACKS = [f"rack-0{r}" for r in range(4)]
DOC = {"id": "beta/roll", "tenant": "beta", "replicas": 3, "shards_per_replica": 2, "min_replicas": 1,
       "shard": {"accelerators": 4, "power_w": 700}, "locality": "rack",
       "spread": {"domain": "rack", "max_per_domain": 1}}


def _replica(index: int, rack: str, revision: int = 1) -> StoredReplica:
    """A replica of two shards on nodes n00 and n01 of `rack`."""
    nodes = (f"{rack}-n00", f"{rack}-n01")
    return StoredReplica(index, revision, tuple(
        {"deployment": DOC["id"], "replica": index, "shard": s, "node": n, "accelerator_indices": [0, 1, 2, 3]}
        for s, n in enumerate(nodes)), frozenset(nodes))


def _problem(view: Any, mode: str, *, cordoned: frozenset[str] = frozenset(),
             rack_budget: dict[str, float] | None = None) -> dict[str, Any]:
    """4 racks x 4 nodes x 4 accelerators, every rack with room for two gangs of power but
    those in `rack_budget`."""
    budgets = rack_budget or {}
    return {
        "version": 1, "zones": [{"id": "z1"}], "rows": [{"id": "row-a", "zone": "z1"}],
        "racks": [{"id": r, "row": "row-a", "power_budget_w": budgets.get(r, 20000.0)} for r in RACKS],
        "nodes": [{"id": f"{r}-n0{i}", "rack": r, "state": "cordoned" if f"{r}-n0{i}" in cordoned else "ready",
                   "accelerators": 4, "accelerator_model": "maia-100", "idle_power_w": 500.0}
                  for r in RACKS for i in range(4)],
        "tenants": [{"id": "beta"}], "deployments": view.deployments, "placements": view.placements,
        "options": {"mode": mode, "time_limit_ms": 2000}}


def _drain_view() -> Any:
    """beta/roll in rack-03, rack-02 and rack-01; rack-02-n00 drains (cordoned), so replica 1 is
    outgoing and one replacement is asked for."""
    replicas = [_replica(0, "rack-03"), _replica(1, "rack-02"), _replica(2, "rack-01")]
    return solver_view(DOC, 1, {}, replicas, evicted=set(), draining={"rack-02-n00"})


def _replicas_per_rack(placements: Any) -> Counter[str]:
    """Running replicas of beta/roll (current and outgoing) per rack."""
    racks = {(p.deployment, p.replica): p.node.rsplit("-", 1)[0] for p in placements}
    return Counter(racks.values())


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_drain_places_the_replacement_where_the_replica_it_replaces_is_not(mode: str) -> None:
    view = _drain_view()
    assert [d["id"] for d in view.deployments] == ["beta/roll", "beta/roll~1"]
    plan = solve(problem_from_dict(_problem(view, mode, cordoned=frozenset({"rack-02-n00"}))))
    new = {p.node for p in plan.placements if p.deployment == "beta/roll" and p.replica == 2}
    assert new == {"rack-00-n00", "rack-00-n01"}  # the free rack, not beside the outgoing replica
    assert max(_replicas_per_rack(plan.placements).values()) == 1


def test_the_warm_session_places_the_drain_replacement_apart_too() -> None:
    view = _drain_view()
    doc = _problem(view, "online", cordoned=frozenset({"rack-02-n00"}))
    current = next(d for d in problem_from_dict(doc).deployments if d.id == "beta/roll")
    session = Session(problem_from_dict(dict(doc, deployments=[d for d in view.deployments if d["id"] != "beta/roll"],
                                             placements=[p for p in view.placements if p["deployment"] != "beta/roll"])))
    kept = [p for p in problem_from_dict(doc).placements if p.deployment == "beta/roll"]
    session.adopt(current, kept)
    decision = session.place("beta/roll")
    assert {p.node.rsplit("-", 1)[0] for p in decision.placements} == {"rack-00"}


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_without_a_compliant_rack_the_replacement_still_goes_beside_the_replica_it_replaces(mode: str) -> None:
    """Make-before-break must not wait for ever: rack-00 has no power for a gang, so the only
    rack without a current replica is the draining replica's, and the replacement goes there
    (two replicas in rack-02 until the outgoing one stops; then one)."""
    view = _drain_view()
    doc = _problem(view, mode, cordoned=frozenset({"rack-02-n00"}), rack_budget={"rack-00": 2500.0})
    plan = solve(problem_from_dict(doc))
    new = {p.node for p in plan.placements if p.deployment == "beta/roll" and p.replica == 2}
    assert new == {"rack-02-n02", "rack-02-n03"}
    assert not plan.unplaced


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_rollout_places_each_new_replica_apart_from_the_old_ones_still_running(mode: str) -> None:
    """A spec change (revision 2): every old replica is outgoing; the new one goes to the rack
    none of them holds."""
    new_spec = dict(DOC, shard={"accelerators": 4, "power_w": 700, "hbm_gib": 8})
    replicas = [_replica(0, "rack-03"), _replica(1, "rack-02"), _replica(2, "rack-01")]
    view = solver_view(new_spec, 2, {"1": DOC}, replicas, evicted=set(), draining=set())
    assert [(d["id"], d["replicas"]) for d in view.deployments] == [("beta/roll", 1), ("beta/roll~1", 3)]
    plan = solve(problem_from_dict(_problem(view, mode)))
    assert {p.node.rsplit("-", 1)[0] for p in plan.placements if p.deployment == "beta/roll"} == {"rack-00"}
    assert max(_replicas_per_rack(plan.placements).values()) == 1

"""Work the solver could not place at all waits out of later solves until a change could help.

kube-scheduler keeps pods that failed to schedule in an "unschedulable" queue and moves them
back only on a cluster event that could make them fit; without that, every reconcile pass
(woken by every arrival) solved hopeless deployments again, the whole batch solve with its
CP-SAT time limit included, because an unplaced deployment makes the pass fall back from the
online decision to the full solve. `ParkingLot` does the same for the reconciler:

- after a committed pass, a deployment that has no placement and that the plan left wholly
  unplaced (not at a time limit: that is retried by the reconciler's back-off) is parked, with
  its reasons;
- the next passes leave parked deployments out of the problem they solve and add their last
  reasons to the plan, so the commit keeps showing why they wait;
- everything parked is let go when something that could help changes: a placement went away
  (a departure, a deletion, a move), a node changed (added, removed, cordoned, up, down, its
  capacity), the topology or its power budgets changed, a tenant's contract changed; a parked
  deployment whose own spec changed is let go too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from scheduler import Plan, Unplaced

_HELPING = ("zones", "rows", "racks", "nodes", "tenants")


@dataclass(frozen=True)
class _Seen:
    """The parts of a problem whose change could help parked work."""

    parts: tuple[Any, ...]
    placements: frozenset[tuple[str, int, int]]

    @classmethod
    def of(cls, problem: dict[str, Any]) -> _Seen:
        return cls(tuple(problem.get(k) for k in _HELPING), _placement_keys(problem))

    def helped_by(self, now: _Seen) -> bool:
        return now.parts != self.parts or not self.placements <= now.placements


def _placement_keys(problem: dict[str, Any]) -> frozenset[tuple[str, int, int]]:
    return frozenset((p["deployment"], p["replica"], p["shard"]) for p in problem.get("placements", ()))


class ParkingLot:
    def __init__(self) -> None:
        self._parked: dict[str, tuple[dict[str, Any], Unplaced]] = {}  # name -> (its doc, why)
        self._seen: _Seen | None = None

    def __len__(self) -> int:
        return len(self._parked)

    def admit(self, problem: dict[str, Any]) -> tuple[dict[str, Any], tuple[Unplaced, ...]]:
        """The problem to solve (parked deployments left out) and the parked ones' reasons."""
        if not self._parked:
            return problem, ()
        if self._seen is None or self._seen.helped_by(_Seen.of(problem)):
            self._parked.clear()
            return problem, ()
        kept: list[dict[str, Any]] = []
        waiting: list[Unplaced] = []
        for doc in problem.get("deployments", ()):
            parked = self._parked.get(doc["id"])
            if parked is not None and parked[0] == doc:
                waiting.append(parked[1])
            else:
                kept.append(doc)
        if not waiting:
            return problem, ()
        return {**problem, "deployments": kept}, tuple(waiting)

    @staticmethod
    def with_waiting(plan: Plan, waiting: tuple[Unplaced, ...]) -> Plan:
        """The plan with the parked deployments' reasons, as if it had left them unplaced itself."""
        return replace(plan, unplaced=plan.unplaced + waiting) if waiting else plan

    def after_commit(self, problem: dict[str, Any], plan: Plan, *, time_limited: bool) -> None:
        """Park what `plan` (committed, solved from the whole `problem`) placed nothing of."""
        self._seen = _Seen.of(problem)
        self._parked.clear()
        if time_limited:
            return
        docs = {d["id"]: d for d in problem.get("deployments", ())}
        placed = {p.deployment for p in plan.placements}
        for u in plan.unplaced:
            doc = docs.get(u.deployment)
            if doc is not None and u.deployment not in placed and u.replicas == doc["replicas"]:
                self._parked[u.deployment] = (doc, u)

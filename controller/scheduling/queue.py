"""The scheduling queue: kube-scheduler's active, back-off and unschedulable queues for the
reconciler, so that work which cannot be placed is not solved again on every pass.

- **active**: deployments stored but not attempted yet (arrivals since the last commit), and
  unschedulable ones a helping change let go; the next pass decides them (on the warm session
  when it only meets arrivals, `cache/`; else with the full solve).
- **back-off**: arrivals the warm session could not place whole (or whose pass preempted
  others), and deployments whose replicas an eviction left short (the session repairs without
  preempting): after `backoff_s` the full solve tries them once more, which may move or preempt
  other work (CP-SAT); what it places nothing of goes to unschedulable.
- **unschedulable**: deployments a full solve placed nothing of (not at a time limit: that is
  retried by the reconciler's back-off): the following solves leave them out of the problem
  and add their last reasons to the plan, so the commit keeps showing users why they wait.
  Everything unschedulable moves back to active when something changes that could help: a
  placement went away (a departure, a deletion, a move, a preemption), a node changed (added,
  removed, cordoned or uncordoned, up, down, its capacity), the topology or its power budgets,
  a tenant's contract, nodes nominated or no longer (`nominations.py`), a placed deployment
  became easier to preempt (preemptible, or a lower priority); one whose own spec changed (a
  priority that now allows it to preempt, a smaller shape) moves back alone.

Without this, every reconcile pass (woken by every arrival) solved hopeless deployments again,
the whole batch solve with its CP-SAT time limit included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from scheduler import Plan, Unplaced
from scheduler.interchange import node_shape

# A nomination made or ended (`nominations.py`) changes where work may go too.
_HELPING = ("zones", "rows", "racks", "nodes", "tenants", "nominations")


@dataclass(frozen=True)
class QueueDepths:
    """Deployments in each queue (the `maia_scheduling_queue_deployments` gauge)."""

    active: int = 0
    backoff: int = 0
    unschedulable: int = 0


@dataclass(frozen=True)
class _Seen:
    """The parts of a problem whose change could help unschedulable work."""

    parts: tuple[Any, ...]
    # Every placement committed since: the full solve's plan, and what fast passes placed after it
    # (`placed`). One of them gone (deleted, moved, preempted) could help.
    placements: set[tuple[str, int, int]]
    # (priority, preemptible) of each placed deployment: a lower priority or a newly
    # preemptible deployment may now be preempted.
    victims: dict[str, tuple[int, bool]]

    @classmethod
    def of(cls, problem: dict[str, Any], plan: Plan | None = None) -> _Seen:
        """The problem's parts and placements, and with `plan` those it committed too."""
        keys = {(p["deployment"], p["replica"], p["shard"]) for p in problem.get("placements", ())}
        if plan is not None:
            keys.update((p.deployment, p.replica, p.shard) for p in plan.placements)
        placed = {deployment for deployment, _, _ in keys}
        # A node's condition (why it is not ready, in words) helps no one: its state says what it takes.
        nodes = [dict(node_shape(n), state=n.get("state", "ready")) for n in problem.get("nodes", ())]
        return cls(tuple(nodes if k == "nodes" else problem.get(k) for k in _HELPING), keys,
                   {d["id"]: (d.get("priority", 0), d.get("preemptible", False))
                    for d in problem.get("deployments", ()) if d["id"] in placed})

    def helped_by(self, now: _Seen) -> bool:
        if now.parts != self.parts or not self.placements <= now.placements:
            return True
        for name, (priority, preemptible) in now.victims.items():
            was = self.victims.get(name)
            if was is not None and ((preemptible and not was[1]) or (preemptible and priority < was[0])):
                return True
        return False


class SchedulingQueue:
    def __init__(self, *, backoff_s: float = 1.0) -> None:
        self.backoff_s = backoff_s
        self._active = 0
        self._backoff: dict[str, float] = {}  # name -> when the full solve tries it again
        self._parked: dict[str, tuple[dict[str, Any], Unplaced]] = {}  # unschedulable: name -> (its doc, why)
        self._seen: _Seen | None = None

    def __len__(self) -> int:
        return len(self._parked)

    def depths(self) -> QueueDepths:
        return QueueDepths(self._active, len(self._backoff), len(self._parked))

    # --- active ---------------------------------------------------------------------------------
    def arrived(self, count: int) -> None:
        """`count` deployments are stored and not attempted yet (0: the pass decided them)."""
        self._active = max(0, count)

    # --- back-off -------------------------------------------------------------------------------
    def back_off(self, names: Iterable[str], now: float) -> None:
        """The warm session could not place these whole (or, repairing, without preempting): the
        full solve tries them at `now + backoff_s`."""
        for name in names:
            self._backoff.setdefault(name, now + self.backoff_s)
            # Tried anew: not unschedulable (a deployment deleted while parked and submitted
            # again as it was matched its parked entry, and the full solve left it out).
            self._parked.pop(name, None)

    def backoff_due(self, now: float) -> bool:
        return any(now >= at for at in self._backoff.values())

    # --- unschedulable --------------------------------------------------------------------------
    def admit(self, problem: dict[str, Any]) -> tuple[dict[str, Any], tuple[Unplaced, ...]]:
        """The problem a full solve gets (unschedulable deployments left out) and the left-out
        ones' reasons; everything unschedulable moves back to active when a change could help."""
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

    def forget(self, names: Iterable[str]) -> None:
        """These deployments were deleted: neither waiting nor unschedulable (a parked entry
        outlived its deployment, counted in the gauge, and matched one submitted again as it was,
        which a full solve then left out)."""
        for name in names:
            self._parked.pop(name, None)
            self._backoff.pop(name, None)

    def placed(self, plan: Plan) -> None:
        """A fast pass committed `plan`: its placements count among those whose departure could
        help (the last full solve's were all it knew: one placed after it, deleted, and read by a
        full pass, let nothing go, and parked work waited beside a free node). With nothing
        parked they are not kept (nothing to help; the next full solve's commit starts afresh):
        the set grew by every placement of every fast pass between two full solves."""
        if self._seen is None:
            return
        if not self._parked:
            self._seen = None
            return
        self._seen.placements.update((p.deployment, p.replica, p.shard) for p in plan.placements)

    def helped(self) -> None:
        """A change that could help them was applied to the warm cluster: everything
        unschedulable is active again (the fast path decides it on the session; the next full
        solve takes it in)."""
        self._parked.clear()
        self._seen = None

    @staticmethod
    def with_waiting(plan: Plan, waiting: tuple[Unplaced, ...]) -> Plan:
        """The plan with the unschedulable deployments' reasons, as if it had left them unplaced itself."""
        return replace(plan, unplaced=plan.unplaced + waiting) if waiting else plan

    def after_commit(self, problem: dict[str, Any], plan: Plan, *, time_limited: bool) -> None:
        """After a full solve of the whole `problem` was committed: the back-off is over for
        what it solved; what it placed nothing of is unschedulable."""
        self._seen = _Seen.of(problem, plan)
        self._parked.clear()
        self._active = 0
        docs = {d["id"]: d for d in problem.get("deployments", ())}
        self._backoff.clear()  # the full solve was their one more try
        if time_limited:
            return
        placed = {p.deployment for p in plan.placements}
        for u in plan.unplaced:
            doc = docs.get(u.deployment)
            if doc is not None and u.deployment not in placed and u.replicas == doc["replicas"]:
                self._parked[u.deployment] = (doc, u)

    def after_retry(self) -> None:
        """A full solve that was not committed as a whole (it avoided nodes): the back-off is over."""
        self._backoff.clear()
        self._active = 0

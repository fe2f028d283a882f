"""The reconciler's warm cluster: the last snapshot, kept current from its own commits, and a
warm `scheduler.session.Session` built from it.

Reading the whole cluster into a problem document and building the solver's indexes from it
costs hundreds of milliseconds at 4,096 nodes; deciding one arrival on a warm session costs
milliseconds. So while nobody else changes the cluster (the generation is the one this
controller's last commit left) and a pass only meets arrivals, the reconciler:

1. reads only the deployments stored since (`snapshot.load_arrivals`: primary key above the
   last one seen; a count compare catches keys committed out of order) and adds them to the
   cached snapshot, exactly as `load_snapshot` would have read them;
2. decides them one by one with `Session.place` (in one worker thread call: `decide`), each
   arrival whole, and turns the decisions into one `Plan` speaking for them alone (its scope
   for `commit_plan(scope=)`: the decided deployments and the victims of their preemptions);
3. after the commit, applies the decisions' placements to the cached snapshot (`committed`),
   which then again equals what `load_snapshot` would read (tests compare the two).
A full solve may start from the cache too while it is valid (the back-off's retry of what the
session could not place): its commit is scoped to what it changed (`scope_of`) and the cache
follows what it wrote (`follow`: `CommitResult.shards` applied to the snapshot, and to the
session through `Session.adopt`).

A fast plan that preempted is followed the same way. Anything else (a stale or re-queued
commit, a change by someone else) drops the cache; the reconciler takes its full path and the cache is built again from a
fresh snapshot when the next pass qualifies. The cache never undoes a decision: it is rebuilt
instead. A cache is driven by one owner (the reconcile loop, which holds its lock); `build`,
`decide`, `scope_of` and `follow` run in a worker thread, never two at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Arrivals, ShardKey, Snapshot, Where
from scheduler import Plan, Unplaced, problem_from_dict
from scheduler.interchange import deployment_from_dict, placement_from_dict, placement_to_dict
from scheduler.session import Decision, Session


@dataclass(frozen=True)
class FastPlan:
    """What one pass decided on the session: the plan to commit and the decisions in it."""

    plan: Plan
    decisions: tuple[Decision, ...]
    scope: frozenset[str]  # the stored deployments the plan speaks for (`commit_plan(scope=)`)

    @property
    def preempted(self) -> bool:
        return bool(self.plan.preempted)

    @property
    def unplaced(self) -> tuple[str, ...]:
        """The decided deployments the session left short of replicas."""
        return tuple(d.deployment for d in self.decisions if d.unplaced is not None)


class ClusterCache:
    """A snapshot kept equal to the database's state by applying this controller's own
    commits, and the session that decides on it."""

    def __init__(self, snapshot: Snapshot, session: Session) -> None:
        # Own copies of the mappings: the cache updates them in place after each commit.
        self.snapshot = dataclasses.replace(
            snapshot, problem=dict(snapshot.problem, deployments=list(snapshot.problem["deployments"]),
                                   placements=list(snapshot.problem["placements"])),
            deployment_ids=dict(snapshot.deployment_ids), solver_refs=dict(snapshot.solver_refs),
            replica_indices=dict(snapshot.replica_indices))
        self.session = session
        self.last_id = max(snapshot.deployment_ids.values(), default=0)

    @classmethod
    def build(cls, snapshot: Snapshot, *, allow_preemption: bool, time_limit_ms: int) -> ClusterCache | None:
        """The cache of a fresh snapshot (blocking: call it in a worker thread), or None when
        the snapshot holds work only a full solve does (shards to release or repair,
        deployments being deleted or rolled over)."""
        if snapshot.released or snapshot.deleting or any(r.outgoing for r in snapshot.solver_refs.values()):
            return None
        problem = dict(snapshot.problem, options={"mode": "online", "time_limit_ms": time_limit_ms,
                                                  "allow_preemption": allow_preemption})
        session = Session(problem_from_dict(problem, validate=False), time_limit_ms=time_limit_ms)
        if session.repaired_at_load:  # shards on down nodes: the full path places them again
            return None
        return cls(snapshot, session)

    def pending_since(self, known_id: int) -> list[dict[str, Any]] | None:
        """The snapshot's deployments stored after `known_id`, to decide (None: one of them
        has placements already, so it is not an arrival; the full path decides)."""
        docs = [d for d in self.snapshot.problem["deployments"]
                if self.snapshot.deployment_ids.get(d["id"], 0) > known_id]
        if any(self.snapshot.replica_indices.get(d["id"]) for d in docs):
            return None
        return docs

    def add(self, arrivals: Arrivals) -> list[dict[str, Any]]:
        """Add deployments stored since the last read (as `load_snapshot` would); their documents."""
        snap = self.snapshot
        snap.problem["deployments"].extend(arrivals.deployments)
        snap.deployment_ids.update(arrivals.deployment_ids)  # type: ignore[attr-defined]
        snap.solver_refs.update(arrivals.solver_refs)  # type: ignore[attr-defined]
        snap.replica_indices.update((key, frozenset()) for key in arrivals.deployment_ids)  # type: ignore[attr-defined]
        self.last_id = max(self.last_id, arrivals.last_id)
        return arrivals.deployments

    def decide(self, docs: Sequence[dict[str, Any]], waiting: Mapping[str, Unplaced]) -> FastPlan:
        """Place each deployment whole on the session, in order (blocking: a worker thread).

        The plan speaks for the decided deployments and those they preempted replicas of (its
        scope): their placements (the victims' remaining ones from the cache), the decided ones'
        reasons, and `waiting`'s (the last commit's) for the victims."""
        decisions = tuple(self.session.place(deployment_from_dict(doc)) for doc in docs)
        victims = {(p.deployment, p.replica) for d in decisions for p in d.preempted}
        hit = {name for name, _ in victims}
        kept = [placement_from_dict(p) for p in self.snapshot.problem["placements"]
                if p["deployment"] in hit and (p["deployment"], p["replica"]) not in victims] if hit else []
        decided = {d.deployment for d in decisions}
        unplaced = [waiting[name] for name in sorted(hit - decided) if name in waiting]
        unplaced += [d.unplaced for d in decisions if d.unplaced is not None]
        plan = Plan(
            status="optimal" if not unplaced else "feasible",
            placements=tuple(kept) + tuple(p for d in decisions for p in d.placements),
            unplaced=tuple(unplaced),
            preempted=tuple(p for d in decisions for p in d.preempted),
            stats={"session_decisions": len(decisions)})
        return FastPlan(plan, decisions, frozenset(stored_key(name) for name in decided | hit))

    def committed(self, fast: FastPlan, generation: int) -> bool:
        """Apply a plan the applier wrote whole (not stale, nothing re-queued, nothing
        preempted: else `follow`) to the cached snapshot, at the cost of the decisions; False
        when the cache cannot follow it (drop it)."""
        snap = self.snapshot
        placements = snap.problem["placements"]
        for decision in fast.decisions:
            key = decision.deployment
            replicas = sorted({p.replica for p in decision.placements})
            if replicas != list(range(len(replicas))) or snap.replica_indices.get(key):
                return False  # stored indices would not follow the solver's numbering
            ref = snap.solver_refs.get(key)
            if replicas and ref is not None:
                snap.solver_refs[key] = dataclasses.replace(  # type: ignore[index]
                    ref, replicas={r: r for r in replicas})
            snap.replica_indices[key] = frozenset(replicas)  # type: ignore[index]
            # Listed by deployment (arrival order: decided ones are the newest), replica, shard, as read.
            placements.extend(placement_to_dict(p) for p in sorted(
                decision.placements, key=lambda p: (p.replica, p.shard)))
        self.snapshot = dataclasses.replace(snap, generation=generation)
        return True

    def scope_of(self, plan: Plan) -> frozenset[str]:
        """The stored deployments a full solve of this snapshot changes or leaves short (its
        placements differ from the snapshot's, it is unplaced, or preempted): all a commit of
        `plan` has to speak for (blocking: O(placements), a worker thread)."""
        before: dict[str, set[tuple[int, int, Where]]] = {}
        for p in self.snapshot.problem["placements"]:
            before.setdefault(p["deployment"], set()).add(
                (p["replica"], p["shard"], (p["node"], tuple(p["accelerator_indices"]), p.get("accelerator_milli"))))
        after: dict[str, set[tuple[int, int, Where]]] = {}
        for q in plan.placements:
            after.setdefault(q.deployment, set()).add(
                (q.replica, q.shard, (q.node, tuple(q.accelerator_indices), q.accelerator_milli)))
        changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
        changed.update(u.deployment for u in plan.unplaced)
        changed.update(v.deployment for v in plan.preempted)
        return frozenset(stored_key(name) for name in changed)

    def follow(self, shards: Mapping[ShardKey, Where | None], generation: int) -> bool:
        """Apply what a commit of a full solve of this very snapshot wrote (`CommitResult.shards`:
        placed, moved, removed) to the snapshot and to the session (`Session.adopt`), so that the
        back-off's full solve does not cost a rebuild; False when the cache cannot follow it."""
        snap = self.snapshot
        touched: dict[str, dict[tuple[int, int], Where | None]] = {}
        for (key, replica, shard), where in shards.items():
            touched.setdefault(key, {})[(replica, shard)] = where
        docs = {d["id"]: d for d in snap.problem["deployments"]}
        by_deployment: dict[str, list[dict[str, Any]]] = {}
        for p in snap.problem["placements"]:
            by_deployment.setdefault(p["deployment"], []).append(p)
        for key, changes in touched.items():
            ref = snap.solver_refs.get(key)
            if key not in docs or ref is None or ref.outgoing:
                return False  # not one solver deployment of its own: read afresh
            stored = {(ref.replicas[p["replica"]], p["shard"]): (p["node"], tuple(p["accelerator_indices"]),
                                                                  p.get("accelerator_milli"))
                      for p in by_deployment.get(key, ())}
            for at, where in changes.items():
                if where is None:
                    stored.pop(at, None)
                else:
                    stored[at] = where
            numbering = {index: solver for solver, index in enumerate(sorted({r for r, _ in stored}))}
            placed = [_placement_doc(key, numbering[r], shard, where) for (r, shard), where in sorted(stored.items())]
            by_deployment[key] = placed
            snap.solver_refs[key] = dataclasses.replace(  # type: ignore[index]
                ref, replicas={solver: index for index, solver in numbering.items()})
            snap.replica_indices[key] = frozenset(numbering)  # type: ignore[index]
            if key in self.session:
                self.session.release(key, self.session.placed_replicas(key))
            self.session.adopt(deployment_from_dict(docs[key]), [placement_from_dict(p) for p in placed])
        snap.problem["placements"] = [p for d in snap.problem["deployments"] for p in by_deployment.get(d["id"], ())]
        self.snapshot = dataclasses.replace(snap, generation=generation)
        return True


def _placement_doc(key: str, replica: int, shard: int, where: Where) -> dict[str, Any]:
    """A placement as `load_snapshot` lists it."""
    node, indices, milli = where
    doc: dict[str, Any] = {"deployment": key, "replica": replica, "shard": shard, "node": node,
                           "accelerator_indices": list(indices)}
    if milli is not None:
        doc["accelerator_milli"] = milli
    return doc


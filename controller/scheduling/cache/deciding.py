"""What a fast pass decided on the session, as the one plan its commit writes.

`ClusterCache.decide` (`cluster.py`) places each deployment whole on the session
(`Session.place`), with the nodes it must avoid cordoned for those decisions alone (`cordon`);
`fast_plan` turns the decisions into a `Plan` speaking for them alone, and the scope of its
`commit_plan(scope=)`: the decided deployments, the victims of their preemptions, the ones
carried whole (tried again, repaired, with shards to release) and the departures.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Snapshot
from controller.usecases.planning import avoided
from scheduler import Plan, Unplaced
from scheduler.model import Node, Placement
from scheduler.interchange import node_from_dict, placement_from_dict
from scheduler.decisions import ClusterDelta, Decision

from controller.scheduling.cache.commits import releasing
from controller.scheduling.decider import RemoteSession

if TYPE_CHECKING:
    from scheduler.session import Session


@dataclass(frozen=True)
class FastPlan:
    """What one pass decided on the session: the plan to commit and the decisions in it."""

    plan: Plan
    decisions: tuple[Decision, ...]
    scope: frozenset[str]  # the stored deployments the plan speaks for (`commit_plan(scope=)`)
    # Known deployments decided again (`pending_docs`): their new replicas take stored indices
    # the commit chooses, listed before the arrivals', so the cache follows what it wrote.
    extended: frozenset[str] = frozenset()

    @property
    def preempted(self) -> bool:
        return bool(self.plan.preempted)

    # Known deployments whose shards on evicted nodes the session re-placed (`ClusterCache.repairs`).
    repaired: frozenset[str] = frozenset()

    @property
    def renumbered(self) -> bool:
        """The cache must follow what the commit wrote (`ClusterCache.follow`), not the decisions."""
        return self.preempted or bool(self.extended) or bool(self.repaired)

    @property
    def unplaced(self) -> tuple[str, ...]:
        """The decided deployments the session left short of replicas."""
        return tuple(d.deployment for d in self.decisions if d.unplaced is not None)


def fast_plan(snap: Snapshot, decisions: tuple[Decision, ...], held: Mapping[str, tuple[Placement, ...]],
              repaired: Mapping[str, Decision], waiting: Mapping[str, Unplaced],
              again: Sequence[dict[str, Any]], settling: Collection[str] = ()) -> FastPlan:
    """The plan of a pass's `decisions` on the session (`ClusterCache.decide`): it speaks for
    the decided deployments and those they preempted replicas of (its scope), with the
    placements the session `held` of the `repaired` ones before the decisions; and for the
    stored deployments `settling` (`ClusterCache.settling`: changed by others, none of them short
    of replicas unless decided here) whole, as they are, so that the commit judges their phase and
    reasons again (a full solve's plan speaks for every deployment: the same as it would)."""
    victims = {(p.deployment, p.replica) for d in decisions for p in d.preempted}
    hit = {name for name, _ in victims}
    decided = {d.deployment for d in decisions}
    extended = frozenset(d["id"] for d in again)
    # Replicas that stop: the victims, and those a decision dropped (a deployment tried again that
    # cannot reach its raised min_replicas runs none): the snapshot and `held` still list them.
    stopped = victims | {(d.deployment, r) for d in decisions for r in d.released}
    carried = hit | extended | held.keys()  # the plan speaks for them whole: with the replicas they hold
    # A rollout's outgoing replicas too; and deployments with shards to release (`apply_deployments`).
    carried_keys = {stored_key(name) for name in carried} | releasing(snap) | set(settling)
    kept = [placement_from_dict(p) for p in snap.index.placements_of(snap.problem, carried_keys)
            if p["deployment"] not in held and (p["deployment"], p["replica"]) not in stopped]
    kept += [p for placements in held.values() for p in placements if (p.deployment, p.replica) not in stopped]
    reasons = {name: waiting[name] for name in sorted(hit - decided) if name in waiting}
    reasons.update((name, d.unplaced) for name, d in repaired.items() if name not in decided and d.unplaced)
    unplaced = list(reasons.values()) + [d.unplaced for d in decisions if d.unplaced is not None]
    plan = Plan(
        status="optimal" if not unplaced else "feasible",
        placements=tuple(kept) + tuple(p for d in decisions for p in d.placements),
        unplaced=tuple(unplaced),
        preempted=tuple(p for d in decisions for p in d.preempted),
        stats={"session_decisions": len(decisions)})
    # Departures (`depart`) are in the scope too: the commit releases their shards, removes their rows.
    scope = (frozenset(stored_key(name) for name in decided | hit | held.keys()) | snap.deleting
             | releasing(snap) | frozenset(settling))
    return FastPlan(plan, decisions, scope, extended, frozenset(held))


def cordon(snap: Snapshot, session: Session | RemoteSession, nodes: Collection[str]) -> tuple[Node, ...]:
    """Cordon the ready nodes among `nodes` in the session (not in the snapshot); the nodes as
    they were, to put back."""
    if not nodes:
        return ()
    ready = [n for n in snap.problem["nodes"] if n["id"] in nodes and n["state"] == "ready"]
    if ready:
        session.apply(ClusterDelta(nodes=tuple(node_from_dict(avoided(n)) for n in ready)))
    return tuple(map(node_from_dict, ready))

"""What a fast pass decided on the session, as the one plan its commit writes.

`ClusterCache.decide` (`cluster.py`) places each deployment whole on the session
(`Session.place`), with the nodes it must avoid cordoned for those decisions alone (`cordon`);
`fast_plan` turns the decisions into a `Plan` speaking for them alone, and the scope of its
`commit_plan(scope=)`: the decided deployments, the victims of their preemptions, the ones
carried whole (tried again, repaired, with shards to release) and the departures.

A pass's decisions are made one after the other on the session, and none is committed before
the next is made: a later decision may preempt replicas an earlier one of the same pass placed
(the session takes every replica it holds as running). Those replicas are neither placed nor
preempted by the plan (`_net`): the session no longer holds them, and a plan that still placed
them put more on a rack or row than the session had judged, which the commit's re-check turned
away (with the victims of the same plan evicted all the same). The plan also says which
deployment each victim was preempted for (`FastPlan.claimants`, `commit_plan(claimants=)`): a
victim goes only when what it was evicted for lands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Snapshot
from controller.usecases.planning import avoided
from scheduler import Plan, Reason, Unplaced
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
    decisions: tuple[Decision, ...]  # as the plan holds them (`_net`)
    scope: frozenset[str]  # the stored deployments the plan speaks for (`commit_plan(scope=)`)
    # Known deployments decided again (`pending_docs`): their new replicas take stored indices
    # the commit chooses, listed before the arrivals', so the cache follows what it wrote.
    extended: frozenset[str] = frozenset()

    @property
    def preempted(self) -> bool:
        return bool(self.plan.preempted)

    # Known deployments whose shards on evicted nodes the session re-placed (`ClusterCache.repairs`).
    repaired: frozenset[str] = frozenset()
    # Each victim (solver deployment, replica) of the plan's preemptions: the solver deployment it
    # was preempted for (`commit_plan(claimants=)`).
    claimants: Mapping[tuple[str, int], str] = field(default_factory=dict)
    # A decision preempted replicas an earlier decision of the pass placed (`_net`): the session's
    # replica numbers have holes the decisions alone cannot be written with.
    netted: bool = False

    @property
    def renumbered(self) -> bool:
        """The cache must follow what the commit wrote (`ClusterCache.follow`), not the decisions."""
        return self.preempted or bool(self.extended) or bool(self.repaired) or self.netted

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
    decisions, claimants, netted = _net(decisions)
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
    # Why the undecided ones it speaks for wait, as the last commit said: the victims', and those
    # of a repaired outgoing replica's deployment (its current revision, not placeable: a stalled
    # rollout whose old replica's node was evicted lost its reasons).
    undecided = (hit | ({stored_key(name) for name in held if stored_key(name) != name} - set(settling))) - decided
    reasons = {name: waiting[name] for name in sorted(undecided) if name in waiting}
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
    return FastPlan(plan, decisions, scope, extended, frozenset(held), claimants, netted)


def _net(decisions: tuple[Decision, ...]) -> tuple[tuple[Decision, ...], dict[tuple[str, int], str], bool]:
    """A pass's decisions as the session holds their outcome after the last one: replicas an
    earlier decision placed and a later one preempted are in neither's (never committed, they
    neither run nor stop: the session holds them nowhere); the claimant of each victim left (the
    deployment of the decision that preempted it); and whether any was taken out so."""
    placed_by: dict[tuple[str, int], int] = {}  # replica -> the decision (index) that placed it this pass
    dropped: dict[int, set[tuple[str, int]]] = {}  # decision index -> its replicas preempted later
    kept_victims: dict[int, list[Any]] = {}
    claimants: dict[tuple[str, int], str] = {}
    for i, decision in enumerate(decisions):
        kept_victims[i] = []
        for victim in decision.preempted:
            at = (victim.deployment, victim.replica)
            earlier = placed_by.pop(at, None)
            if earlier is not None:  # placed by this pass: neither placed nor preempted
                dropped.setdefault(earlier, set()).add(at)
                continue
            kept_victims[i].append(victim)
            claimants[at] = decision.deployment
        for p in decision.placements:
            placed_by[(p.deployment, p.replica)] = i
    if not dropped:
        return decisions, claimants, False
    netted = tuple(
        dataclasses.replace(
            d, placements=tuple(p for p in d.placements if (p.deployment, p.replica) not in dropped.get(i, ())),
            preempted=tuple(kept_victims[i]), unplaced=_short_by(d, len(dropped.get(i, ()))))
        for i, d in enumerate(decisions))
    return netted, claimants, True


def _short_by(decision: Decision, lost: int) -> Unplaced | None:
    """A decision's unplaced replicas, with `lost` more that a later decision preempted."""
    u = decision.unplaced
    if not lost:
        return u
    if u is not None:
        return dataclasses.replace(u, replicas=u.replicas + lost)
    return Unplaced(decision.deployment, lost,
                    (Reason("CAPACITY", f"{lost} replica(s) placed and then taken for higher-priority or reserved "
                                        f"work in the same pass"),))


def cordon(snap: Snapshot, session: Session | RemoteSession, nodes: Collection[str]) -> tuple[Node, ...]:
    """Cordon the ready nodes among `nodes` in the session (not in the snapshot); the nodes as
    they were, to put back."""
    if not nodes:
        return ()
    ready = [n for n in snap.problem["nodes"] if n["id"] in nodes and n["state"] == "ready"]
    if ready:
        session.apply(ClusterDelta(nodes=tuple(node_from_dict(avoided(n)) for n in ready)))
    return tuple(map(node_from_dict, ready))

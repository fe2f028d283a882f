"""`ClusterCache`: the warm cluster's state and the calls its owner makes (the design: the
package's `__init__.py`).

It keeps what those calls move: the snapshot (a copy of its own, replaced with each generation),
the session deciding on it, the keys read so far, the repairs not committed yet and whether the
session may hold work short of replicas. How a change, an arrival, a pass's decisions or a
commit is written into the snapshot and the session is in the package's other modules
(`changes`, `arriving`, `deciding`, `commits`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Arrivals, DeploymentRead, NodeRead, ShardKey, Snapshot, Where
from controller.store.snapshot_index import SnapshotIndex
from scheduler import Plan, Unplaced
from scheduler.decisions import ClusterDelta, Decision
from scheduler.model import Nomination

from controller.scheduling.cache import arriving, changes, commits, deciding
from controller.scheduling.cache.deciding import FastPlan
from controller.scheduling.decider import OpenSession, RemoteSession, held_placements, open_in_process, place_documents

if TYPE_CHECKING:
    from scheduler.session import Session


class ClusterCache:
    """A snapshot kept equal to the database's state by applying this controller's own
    commits, and the session that decides on it."""

    def __init__(self, snapshot: Snapshot, session: Session | RemoteSession) -> None:
        self.snapshot = _own_copy(snapshot)  # updated in place after each commit
        # The stored nominations it was read with go: the reconciler hands the session those in
        # force (`nominations`, below), and the full path puts them in its problem (`into`).
        self.snapshot.problem.pop("nominations", None)
        self.snapshot.index.read(self.snapshot.problem)  # in the worker thread that builds it (`build`)
        self.session = session
        self.last_id = max(snapshot.deployment_ids.values(), default=0)
        # The highest key of `snapshot.deployment_ids` (None: to be found again, `highest_id`).
        self._highest: int | None = self.last_id
        # Generations above the snapshot's that this controller's own commits made, already
        # applied (a commit that landed on a change the cache has not read yet).
        self.own_commits: set[int] = set()
        # What the session re-placed of shards on nodes whose work was evicted (`apply_nodes`),
        # by solver deployment, not committed yet: the next fast plan speaks for them whole.
        self.repairs: dict[str, Decision] = {}
        # The highest key of the deployments another controller placed before this cache read
        # them (`apply_deployments`), taken in above `last_id`: arrivals below it go in key order.
        self._adopted_id = 0
        # The session holds nothing short of replicas (`pending_docs` then asks it nothing): set
        # when it last answered none, cleared by every call that may leave a deployment short
        # (`_may_leave_short`).
        self._none_pending = False
        # Stored deployments others changed (`apply_deployments`), by key, whose phase and reasons
        # no commit has judged since: the next fast plan speaks for them (`deciding.fast_plan`).
        # A change may leave nothing to decide and still make the stored ones wrong: a scale-down
        # to the replicas placed, a drain ended before its replacement could be placed.
        self.settling: set[str] = set()
        # The nominations the session was handed (`scheduling/nominations.py`): none when built.
        self.nominations: tuple[Nomination, ...] = ()

    @classmethod
    def build(cls, snapshot: Snapshot, *, allow_preemption: bool, time_limit_ms: int,
              open_session: OpenSession = open_in_process) -> ClusterCache | None:
        """The cache of a fresh snapshot (blocking: call it in a worker thread), or None when
        the snapshot holds work only a full solve does (shards to release or repair,
        deployments being deleted). `open_session` builds its session from the problem document
        (in this process, or in the decide process: `decider.py`)."""
        if snapshot.released or snapshot.deleting:
            return None
        problem = {key: value for key, value in snapshot.problem.items() if key != "nominations"}  # see __init__
        problem["options"] = {"mode": "online", "time_limit_ms": time_limit_ms, "allow_preemption": allow_preemption}
        session = open_session(problem, time_limit_ms=time_limit_ms)
        if session.repaired_at_load:  # shards on down nodes: the full path places them again
            return None
        return cls(snapshot, session)

    @classmethod
    def settled(cls, snapshot: Snapshot, shards: Mapping[ShardKey, Where | None], generation: int, *,
                allow_preemption: bool, time_limit_ms: int,
                open_session: OpenSession = open_in_process) -> ClusterCache | None:
        """The cache of the state a commit (nothing re-queued) of a full solve of a fresh
        `snapshot` left: the snapshot with what the commit wrote (`shards`), its shards to
        release and deployments being deleted gone (blocking: a worker thread); None when only a
        full solve can go on from there (an outgoing replica's shards written, shards left on
        down nodes)."""
        after = _own_copy(snapshot)
        if commits.write_shards(after, shards, gone=snapshot.deleting) is None:
            return None
        return cls.build(dataclasses.replace(after, released={}, deleting=frozenset(), generation=generation),
                         allow_preemption=allow_preemption, time_limit_ms=time_limit_ms, open_session=open_session)

    # Others' changes, read from the change log (`changes.py`).
    def apply_nodes(self, reads: Sequence[NodeRead], generation: int, reread: Collection[str] = ()) -> bool | None:
        """Apply node changes (the nodes as read now) to the snapshot and to the session (one
        `ClusterDelta`), at `generation` (blocking: a worker thread). Whether they could help
        work short of replicas (a node added, ready or changed); None when the cache cannot
        follow them (a node holding shards removed, resized or moved, or drained, unless in
        `reread`, whose deployments the caller reads again: `apply_deployments`; a rack it does
        not know): drop it.

        A node holding shards whose work is evicted (its state alone turns `down`) is a delta
        too, unless a replica being replaced has shards there (`solver_view` reads those
        differently): the session re-places its shards as `solve()` would (`Session.apply`
        repairs them beside their gangs, or places the gangs again whole), and the next fast
        plan commits that (`repairs`); the snapshot, like `load_snapshot`, keeps them on the
        down node until then."""
        applied = changes.apply_nodes(self.snapshot, self.session, reads, reread)
        if applied is None:
            return None
        helped, repaired = applied
        if repaired:
            self._may_leave_short()
        for decision in repaired:  # a later repair of one deployment holds all of it so far
            self.repairs[decision.deployment] = decision
        self.snapshot = dataclasses.replace(self.snapshot, generation=generation)
        return helped

    def apply_tenants(self, docs: list[dict[str, Any]]) -> bool | None:
        """Tenants as read now, after a contract change, to the snapshot and the session
        (`changes.apply_tenants`; blocking: a worker thread); None: drop the cache."""
        return changes.apply_tenants(self.snapshot, self.session, docs)

    def apply_topology(self, zones: list[dict[str, Any]], rows: list[dict[str, Any]],
                       racks: list[dict[str, Any]]) -> bool | None:
        """Zones, rows and racks as read now, after a topology change, to the snapshot and the
        session (`changes.apply_topology`; blocking: a worker thread); None: drop the cache."""
        return changes.apply_topology(self.snapshot, self.session, zones, rows, racks)

    def apply_deployments(self, reads: Sequence[DeploymentRead], generation: int) -> bool | None:
        """Deployments changed outside this controller's plan commits (updated or rolled, on a
        node drained or no longer drained, failed replicas released, replaced replicas retired; a
        failure reported, which moves nothing), as read now (`load_deployments`), to the snapshot
        and the session (blocking: a worker thread): each one's solver deployments (its current
        revision, and the outgoing ones of a rollout or a drain: store/rollout.py) and their
        placements become what is stored, and the session holds them so (`Session.replace`).
        Shards the view leaves out (replicas beyond a smaller count, an outgoing replica on a
        down node) are the snapshot's `released`, as `load_snapshot` lists them, until the next
        commit, which speaks for the deployment (`releasing`), releases them.
        Whether one changed (a replacement to place, a replica to place again, capacity freed:
        work to decide again); None when the cache cannot follow (shards of a deployment it
        does not hold; one quarantined; a repair not committed yet): drop it."""
        snap = self.snapshot
        applied = changes.apply_deployments(snap, self.session, reads, self.repairs)
        if applied is None:
            return None
        changed, adopted, released = applied
        if changed or adopted:  # replicas released, retired or added: some may wait to be placed
            self._may_leave_short()
        self.settling.update(changed)
        for read in adopted.values():  # placed by another controller before this cache read them
            if self._highest is not None and read.id is not None:
                self._highest = max(self._highest, read.id)
            self._adopted_id = max(self._adopted_id, read.id or 0)
        self.snapshot = dataclasses.replace(snap, generation=generation, released=released)
        snap.index.read(snap.problem)  # the lists it replaced, here rather than on the event loop
        return bool(changed or adopted)

    def depart(self, keys: Collection[str], generation: int) -> bool:
        """Deployments being deleted (by others: `maiactl delete`) leave the snapshot and the
        session (`Session.release`), at `generation`; the next commit speaks for them
        (`snapshot.deleting`: their shards and rows go). Whether one held shards (its departure
        could help work short of replicas). Blocking: a worker thread."""
        snap = self.snapshot
        gone = set(keys)
        if any(snap.deployment_ids.get(key) == self._highest for key in gone):
            self._highest = None  # the newest left: found again when asked
        held = changes.depart(snap, self.session, gone)
        self.settling -= gone
        self.snapshot = dataclasses.replace(snap, generation=generation, deleting=snap.deleting | gone)
        return held

    def reread(self, reads: Sequence[NodeRead]) -> dict[str, frozenset[str]]:
        """The nodes among `reads` holding shards whose deployments must be read again whole
        before the nodes are applied (`apply_nodes(reread=)`), with those deployments
        (`changes.reread`: no call on the session, short Python)."""
        return changes.reread(self.snapshot, reads)

    def holding(self, nodes: Collection[str]) -> dict[str, tuple[frozenset[str], bool]]:
        """For each of `nodes` holding shards: the stored deployments holding them, and whether
        one of those shards is an outgoing replica's (`changes.nodes_holding`)."""
        return changes.nodes_holding(self.snapshot, nodes)

    # Arrivals (`arriving.py`), and what the session holds short of replicas.
    def missed(self, new: Arrivals, schedulable: int) -> bool:
        """Whether the cache and the rows stored since (`new`) do not add up to the
        `count_schedulable_deployments` read with them (`unaccounted`)."""
        return self.unaccounted(new, schedulable) != 0

    def unaccounted(self, new: Arrivals, schedulable: int) -> int:
        """The `count_schedulable_deployments` read with the rows stored since (`new`) less what
        the cache and those rows hold. Above 0: a deployment was stored below the last key read
        (keys are not committed in order under concurrency). Below 0: the cache holds one
        deleted (or quarantined) since the change log was read, which the next read of the log
        takes out (a deletion moves the generation)."""
        return arriving.unaccounted(self.snapshot, new, schedulable)

    def add(self, arrivals: Arrivals) -> list[dict[str, Any]]:
        """Add deployments stored since the last read (as `load_snapshot` would); their documents.
        Ones committed out of order (keys below the last one read, or below one another
        controller placed: `apply_deployments`) take their place by key; ones the cache holds
        already (that one) are not added again."""
        docs, fresh = arriving.add(self.snapshot, arrivals, max(self.last_id, self._adopted_id))
        if self._highest is not None:
            self._highest = max(self._highest, max(fresh.values(), default=0))
        self.last_id = max(self.last_id, arrivals.last_id)
        return docs

    def pending_since(self, known_id: int) -> list[dict[str, Any]] | None:
        """The snapshot's deployments stored after `known_id`, to decide; None: one has placements
        already, the full path decides (`arriving.pending_since`)."""
        return arriving.pending_since(self.snapshot, known_id)

    def highest_id(self) -> int:
        """The highest primary key among the snapshot's deployments (0: none): `max` of
        `snapshot.deployment_ids`, followed as deployments arrive, are adopted and depart (found
        again only when the newest departs)."""
        if self._highest is None:
            self._highest = max(self.snapshot.deployment_ids.values(), default=0)
        return self._highest

    @property
    def may_hold_pending(self) -> bool:
        """Whether `pending_docs` may ask the session (and block on it): False when the session
        last answered none and nothing since could leave a deployment short."""
        return not self._none_pending

    def pending_docs(self, also: Collection[str] = ()) -> list[dict[str, Any]]:
        """The deployments the session holds short of replicas (unplaceable so far, preempted, or
        placed in part) and those of `also` (what the last commits left unplaced: a full solve's
        the session never decided), in arrival order: to decide again after a change that could
        help them. The session is asked (a walk of every deployment it holds; in the decide
        process a round trip) only when it may hold some: not after it answered none and nothing
        since could leave one short (`_may_leave_short`)."""
        short: set[str] = set()
        if not self._none_pending:
            short = set(self.session.pending())
            self._none_pending = not short
        wanted = short | set(also)
        if not wanted:
            return []
        snap = self.snapshot
        return [d for d in snap.index.deployments_of(snap.problem, map(stored_key, wanted)) if d["id"] in wanted]

    def _may_leave_short(self) -> None:
        """A call on the session may have left a deployment short of replicas (a decision left
        one unplaced or preempted, a repair, replicas released or adopted short): `pending_docs`
        asks the session again."""
        self._none_pending = False

    # A pass's decisions on the session (`deciding.py`).
    def decide(self, docs: Sequence[dict[str, Any]], waiting: Mapping[str, Unplaced],
               again: Sequence[dict[str, Any]] = (), avoid: Collection[str] = ()) -> FastPlan:
        """Place each deployment whole on the session, in order (blocking: a worker thread):
        `again` (known ones short of replicas, `pending_docs`), priority first as the full solve
        orders them (`Solver.batch_order`: of one priority, work that is not preemptible first;
        else as given), then the arrivals `docs`; with the nodes `avoid` cordoned for these
        decisions alone (replicas released after failing there are placed on other nodes first,
        as the full path's solve does). In arrival order, capacity a rollout's retired replica
        freed went to preemptible work waiting since its last preemption, and the rollout's
        replacement, decided next, preempted other running work of it for the room it had
        just been given (16 restarts for one replica replaced).

        The plan speaks for the decided deployments and those they preempted replicas of (its
        scope): their placements (the victims' and those tried again's held ones from the
        cache), the decided ones' reasons, and `waiting`'s (the last commit's) for the victims."""
        repaired = self.repairs
        # What the session holds of them before this pass's decisions (the snapshot holds their
        # shards on the evicted nodes).
        held = held_placements(self.session, repaired)
        avoided = deciding.cordon(self.snapshot, self.session, avoid)
        try:
            decisions = place_documents(self.session, (*_priority_first(again), *docs))
        finally:
            if avoided:  # as they were (a flip between ready and cordoned is updated in place)
                self.session.apply(ClusterDelta(nodes=avoided))
        if avoided or any(d.unplaced is not None or d.preempted or d.released for d in decisions):
            self._may_leave_short()
        return deciding.fast_plan(self.snapshot, decisions, held, repaired, waiting, again, self.settling)

    # What a commit leaves (`commits.py`).
    def committed(self, fast: FastPlan, generation: int) -> bool:
        """Apply a plan the applier wrote whole (not stale, nothing re-queued, nothing
        renumbered: else `follow`) to the cached snapshot, at the cost of the decisions; False
        when the cache cannot follow it (drop it)."""
        snap = self.snapshot
        if not commits.write_decisions(snap, fast.decisions):
            return False
        self.snapshot = dataclasses.replace(snap, generation=generation, deleting=frozenset(),
                                            released=commits.released_written(snap))
        self.settling.clear()
        return True

    def follow(self, shards: Mapping[ShardKey, Where | None], generation: int) -> bool:
        """Apply what a commit of a full solve of this very snapshot wrote (`CommitResult.shards`:
        placed, moved, removed) to the snapshot and to the session (`Session.adopt`), so that the
        back-off's full solve does not cost a rebuild; False when the cache cannot follow it."""
        snap = self.snapshot
        # Shards the snapshot left out already (released: `apply_deployments`) are not renumbered.
        touched = commits.write_shards(snap, {key: where for key, where in shards.items() if key not in snap.released},
                                       gone=snap.deleting)
        if touched is None:
            return False
        self.repairs = {}  # written (what was not is re-placed again, from what the session adopts)
        self._may_leave_short()  # what a commit wrote may leave some short (a full solve's unplaced)
        commits.readopt_as_listed(snap, self.session, touched)
        self.snapshot = dataclasses.replace(snap, generation=generation, deleting=frozenset(),
                                            released=commits.released_written(snap))
        snap.index.read(snap.problem)  # the lists it replaced, here rather than on the event loop
        self.settling.clear()  # the commit followed spoke for them
        return True

    def scope_of(self, plan: Plan) -> frozenset[str]:
        """All a commit of a full solve of this snapshot has to speak for (`commits.scope_of`;
        blocking: a worker thread)."""
        return commits.scope_of(self.snapshot, plan)

    @property
    def releasing(self) -> frozenset[str]:
        """The stored deployments with shards the snapshot leaves out, not released yet: the next
        commit speaks for them and releases them (`commits.releasing`)."""
        return commits.releasing(self.snapshot)


def _priority_first(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deployment documents in the order a full solve places them (`Solver.batch_order`): higher
    priority first; of one priority, work that is not preemptible first; else as given."""
    return sorted(docs, key=lambda d: (-int(d.get("priority", 0)), bool(d.get("preemptible", False))))


def _own_copy(snapshot: Snapshot) -> Snapshot:
    """A snapshot whose mappings and lists may be updated in place (shares the documents), with
    an index of its own."""
    return dataclasses.replace(
        snapshot, problem=dict(snapshot.problem, nodes=list(snapshot.problem["nodes"]),
                               deployments=list(snapshot.problem["deployments"]),
                               placements=list(snapshot.problem["placements"])),
        deployment_ids=dict(snapshot.deployment_ids), solver_refs=dict(snapshot.solver_refs),
        replica_indices=dict(snapshot.replica_indices), index=SnapshotIndex())

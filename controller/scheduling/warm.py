"""The reconciler's hold on its warm cluster (`cache.ClusterCache`): when the cache may be
used, how it is (re)built and fed from the database, and what each commit leaves it.

The cache is valid at the cluster generation this controller's own last commit left, or the
one it caught up to since (`own_generation`). Submissions leave the generation alone: what they
add is new deployment rows, read by primary key above the last one seen and counted against
`count_schedulable_deployments` (a key committed out of order makes the counts differ: the
keys the cache lacks, `snapshot.schedulable_keys`, say which, and they are read by key). Every
other change moves the generation
and says what it changed (`store/changes.py`): `catch_up` reads the changes since and applies
node changes as deltas, contract and topology changes (tenants; zones, rows, racks) as deltas
too, deletions as departures, and changes that name deployments (updates, failures reported,
failed replicas released, replaced replicas retired, scaled down; and the deployments on a node
drained or no longer drained, or going down while holding a replica being replaced; and another
controller's plan commits, which name the deployments they touched) as those deployments read
again whole; any other change (one that names nothing: a commit by another controller touching
very many deployments) drops the cache. The log is in the database, so the changes another
controller made (HA) are read the same way. A stale commit of a full solve (`after_stale_full`) leaves a cache at its
snapshot's generation that catches up the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.changes import ChangeKind

from controller.scheduling.cache import ClusterCache, FastPlan
from controller.scheduling.decider import DeciderFailed, OpenSession, open_in_process
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.plans import CommitResult, read_changes_since
from controller.store.snapshot import (
    DeploymentRead, InsertedRow, NodeRead, Snapshot, load_arrivals, load_deployments, load_nodes, load_snapshot, load_tenants,
    load_topology, schedulable_keys, stored_keys)
from scheduler import Plan, Unplaced

log = logging.getLogger(__name__)
T = TypeVar("T")

# The most node changes a catch-up looks over on the event loop (`ClusterCache.reread`: ~3 us of
# CPU a node, 3 ms for 1,024; 55-130 ms for 16,384, a zone going down or a fleet joining at once,
# measured at 16,384 nodes: docs/benchmarks.md, issue 8, `rv-gil`); more in a worker thread, where
# the loop still gets its turns.
REREAD_ON_LOOP_MAX_NODES = 1_024

# Zones, rows and racks as `load_snapshot` lists them.
Topology = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]



@dataclasses.dataclass(frozen=True)
class ArrivalDocs:
    """What `WarmCluster.arrivals` read: the documents of the deployments to decide, and of those
    of them committed out of order."""

    docs: list[dict[str, Any]]
    late: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Of those read as the submit that inserted them wrote them: key -> the row (`Arrivals.as_inserted`).
    as_inserted: dict[str, InsertedRow] = dataclasses.field(default_factory=dict)


# The changes the cache follows (`catch_up`); any other drops it.
_FOLLOWED = (ChangeKind.NODE, ChangeKind.DEPLOYMENT_DELETED, ChangeKind.TENANT, ChangeKind.TOPOLOGY,
             ChangeKind.PLACEMENTS, ChangeKind.DEPLOYMENT)


class WarmCluster:
    def __init__(self, db: Database, *, surge: int, allow_preemption: bool, time_limit_ms: int,
                 open_session: OpenSession = open_in_process, on_built: Callable[[], None] = lambda: None) -> None:
        self.db = db  # the reconciler's (its own thread's, `Reconciler.run`)
        self._open_session = open_session  # in this process, or in the decide process (decider.py)
        # Told each time a cache is built whole (a fresh read, or what a full solve's commit left):
        # the controller's collector policy freezes what it just made (`gcpolicy.WarmHeapFreezer.built`).
        self._on_built = on_built
        self._surge = surge
        self._allow_preemption = allow_preemption
        self._time_limit_ms = time_limit_ms
        self.cache: ClusterCache | None = None
        self.own_generation: int | None = None  # what this controller's last commit left
        self._known_id = 0  # highest deployment key the last commit's snapshot held
        self.unplaced: dict[str, Unplaced] = {}  # the last commits' reasons, by solver deployment

    def _built(self, cache: ClusterCache | None) -> ClusterCache | None:
        """A cache just built whole (None: the session was lost), after telling `on_built`."""
        if cache is not None:
            self._on_built()
        return cache

    def drop(self) -> None:
        """Forget the cache and the generation it was valid for (the next read is a fresh one)."""
        self.cache = None
        self.own_generation = None

    async def arrivals(self, session: AsyncSession, schedulable: int) -> ArrivalDocs | None:
        """The deployments to decide on the cache (building it from a fresh snapshot when there
        is none), and those of them committed out of order (below keys read before); None: not
        only arrivals after all. Read in the caller's unit of work (a pass takes few: on
        PostgreSQL under load their round trips are what it waits for)."""
        cache = self.cache
        if cache is not None:
            new = await load_arrivals(session, after_id=cache.last_id, surge=self._surge)
            # Fewer counted than held: a deletion landed after this pass read the change log (on
            # a busy cluster, most passes with deletions under way). Nothing to look for now: it
            # moved the generation, so the next pass takes it out and counts again (a key
            # committed out of order meanwhile is looked for then, instead of every key now).
            if cache.unaccounted(new, schedulable if new.schedulable is None else new.schedulable) <= 0:
                return ArrivalDocs(cache.add(new), as_inserted=new.as_inserted)
            # More counted: a key committed out of order, or a count read before a submission
            # landed. Which keys the cache lacks says which.
            known = cache.snapshot.deployment_ids.keys() | new.deployment_ids.keys()
            lacking = [i for key, i in (await schedulable_keys(session, up_to_id=new.last_id)).items()
                       if key not in known]
            late = await load_arrivals(session, after_id=0, surge=self._surge, only=lacking) \
                if lacking else None
        else:
            snapshot = await load_snapshot(session, surge=self._surge)
        if cache is not None:
            docs = cache.add(new)
            if late is None:
                return ArrivalDocs(docs, as_inserted=new.as_inserted)
            return ArrivalDocs(docs, cache.add(late), {**new.as_inserted, **late.as_inserted})
        if snapshot.generation != self.own_generation:
            return None
        self.cache = self._built(await _on_session(
            ClusterCache.build, snapshot, allow_preemption=self._allow_preemption, time_limit_ms=self._time_limit_ms,
            open_session=self._open_session))
        docs = None if self.cache is None else self.cache.pending_since(self._known_id)
        return None if docs is None else ArrivalDocs(docs)

    async def catch_up(self, session: AsyncSession, *, generation: int | None = None) -> bool | None:
        """Bring the cache to the current generation (or to `generation`, read earlier in the
        caller's transaction) from the change log: node changes read as
        those rows and applied as deltas (`ClusterCache.apply_nodes`). Whether they could help
        work short of replicas; None when the cache cannot follow (another kind of change, a
        generation whose change is not logged or was pruned, a node whose shards must move): it
        is dropped and the pass reads the whole cluster. Read in the caller's unit of work."""
        cache = self.cache
        if cache is None:
            return None
        since = await read_changes_since(session, cache.snapshot.generation, generation=generation)
        rows = [row for generation, logged in since.changes.items() if generation not in cache.own_commits
                for row in logged]
        if not since.complete or any(kind not in _FOLLOWED or name is None and kind is not ChangeKind.TOPOLOGY
                                     for kind, name in rows):
            self.drop()
            return None
        reads = await load_nodes(session, {name for kind, name in rows if kind is ChangeKind.NODE})
        # A contract change may touch other tenants too (a deleted one leaves their exclusions): all are read.
        tenants = await load_tenants(session) if any(kind is ChangeKind.TENANT for kind, _ in rows) else None
        topology = await load_topology(session) if any(kind is ChangeKind.TOPOLOGY for kind, _ in rows) else None
        departed = {name for kind, name in rows if kind is ChangeKind.DEPLOYMENT_DELETED}
        # Deployments updated, or whose placements changed (another controller's plan commit;
        # failed replicas released, replaced ones retired; a failure reported), or on a node
        # drained or no longer drained, or going down: read again whole.
        # Short Python (no session call): on the loop (`gilthreads`), unless many nodes changed.
        reread = cache.reread(reads) if len(reads) <= REREAD_ON_LOOP_MAX_NODES else \
            await asyncio.to_thread(cache.reread, reads)
        replaced = set(reread)
        keys = {name for kind, name in rows if kind in (ChangeKind.PLACEMENTS, ChangeKind.DEPLOYMENT)}
        keys.update(key for held in reread.values() for key in held)
        changed = await load_deployments(session, keys - departed, surge=self._surge) if keys - departed else []
        # Deployments being deleted whose rows another controller's commit removed: not for this one to remove.
        deleting = keys & (cache.snapshot.deleting | departed)
        removed = deleting - await stored_keys(session, deleting) if deleting else set()
        helped = await _on_session(self._follow, cache, reads, replaced, departed, tenants, topology, changed,
                                   since.generation)
        if helped is not None and removed:
            cache.snapshot = dataclasses.replace(cache.snapshot, deleting=cache.snapshot.deleting - removed)
        if helped is None or self.cache is not cache:
            self.drop()
            return None
        self.own_generation = since.generation
        cache.own_commits.clear()
        return helped

    @staticmethod
    def _follow(cache: ClusterCache, reads: list[NodeRead], replaced: set[str], departed: set[str],
                tenants: list[dict[str, Any]] | None, topology: Topology | None, changed: list[DeploymentRead],
                generation: int) -> bool | None:
        # The topology first: nodes may join racks it adds. The deployments read again go before
        # the nodes when every node they hold shards on is known (a node's work evicted drops an
        # outgoing replica from the view, or keeps one to place again: `solver_view`), else last.
        known = cache.snapshot.index.nodes_by_id(cache.snapshot.problem)
        early = all(p["node"] in known for read in changed for p in read.placements)
        helped: bool | None = False if topology is None else cache.apply_topology(*topology)
        if helped is not None and changed and early:
            deployments = cache.apply_deployments(changed, generation)
            helped = None if deployments is None else helped or deployments
        if helped is not None:
            nodes = cache.apply_nodes(reads, generation, reread=replaced)
            helped = None if nodes is None else helped or nodes
        if helped is not None and tenants is not None:
            contracts = cache.apply_tenants(tenants)
            helped = None if contracts is None else helped or contracts
        if helped is not None and departed:
            helped = cache.depart(departed, generation) or helped
        if helped is None or not changed or early:
            return helped
        deployments = cache.apply_deployments(changed, generation)
        return None if deployments is None else deployments or helped

    async def scope(self, snapshot: Snapshot, plan: Plan) -> frozenset[str] | None:
        """What a commit of a full solve has to speak for: when it was solved from the cache,
        the deployments it changes or leaves short (the others are as the cache holds them,
        committed by this controller); None (everything) when solved from a fresh read."""
        cache = self.cache
        if cache is None or cache.snapshot is not snapshot:
            return None
        return await asyncio.to_thread(cache.scope_of, plan)

    async def snapshot(self) -> Snapshot | None:
        """The cached snapshot with the rows stored since, for a full solve, while it is valid
        (the back-off's retry, a time-limited retry); None: read the cluster."""
        cache = self.cache
        if cache is None:
            return None
        async with self.db.unit_of_work() as uow:
            generation = await repo.read_cluster_generation(uow.session)
            new = await load_arrivals(uow.session, after_id=cache.last_id, surge=self._surge)
            schedulable = await repo.count_schedulable_deployments(uow.session)
        if generation == cache.snapshot.generation == self.own_generation and not cache.missed(new, schedulable):
            cache.add(new)
            return cache.snapshot
        self.drop()
        return None

    def committed(self, snapshot: Snapshot, plan: Plan, result: CommitResult,
                  scope: frozenset[str] | None = None) -> None:
        """After a commit that was not stale, by either path (`scope`: what a fast plan spoke for)."""
        self.own_generation = result.generation
        cache = self.cache
        self._known_id = cache.highest_id() if cache is not None and cache.snapshot is snapshot \
            else max(snapshot.deployment_ids.values(), default=0)
        if scope is None:
            self.unplaced = {}
        for name in scope or ():
            self.unplaced.pop(name, None)
        self.unplaced.update((u.deployment, u) for u in plan.unplaced)

    async def after_fast(self, cache: ClusterCache, fast: FastPlan, result: CommitResult) -> None:
        """The cache follows a fast plan's commit (the decisions appended; with preemptions or
        replicas added to placed deployments, what the commit wrote, renumbered), or is dropped
        (rebuilt when next needed)."""
        # A stale commit (someone changed the cluster meanwhile) wrote all it decided (nothing was
        # re-queued): the cache takes it in at its own generation and remembers the commit as its
        # own; the next `catch_up` reads the change in between from the log and skips this one.
        generation = cache.snapshot.generation if result.stale else result.generation
        if result.requeued:
            keep = False
        elif fast.renumbered:
            keep = await _on_session(cache.follow, result.shards, generation)
        else:
            keep = cache.committed(fast, generation)
        self.cache = cache if keep else None
        if result.stale:
            if keep:
                _own_commit(cache, result)
                self.own_generation = generation
            else:
                self.drop()

    async def after_stale_full(self, snapshot: Snapshot, plan: Plan, result: CommitResult) -> bool:
        """A full solve's commit landed on changes by others (stale: a join storm moves the
        generation while a pass solves): what held is written (re-checked), what did not is
        re-queued. Instead of reading the whole cluster again, the cache is the state its snapshot
        and its commit left, valid at the snapshot's generation (the cache it started from follows
        what the commit wrote; one solved from a fresh read is `settled`); the next `catch_up`
        reads the changes in between from the log as deltas and skips this commit. False: no
        cache can go on from there (an outgoing replica's shards written, shards left on down nodes): read again."""
        cache = self.cache
        if cache is not None and cache.snapshot is snapshot:
            kept = await _on_session(cache.follow, result.shards, snapshot.generation)
            self.cache = cache if kept else None
        else:
            self.cache = self._built(await _on_session(
                ClusterCache.settled, snapshot, result.shards, snapshot.generation,
                allow_preemption=self._allow_preemption, time_limit_ms=self._time_limit_ms,
                open_session=self._open_session))
        if self.cache is None:
            self.drop()
            return False
        self.committed(snapshot, plan, result)
        _own_commit(self.cache, result)
        self.own_generation = snapshot.generation
        return True

    async def after_full(self, snapshot: Snapshot, result: CommitResult) -> None:
        """The cache a full solve started from follows what its commit wrote; one solved from a
        fresh read leaves a cache of what its commit left (`ClusterCache.settled`), so that the
        changes others make next can be followed as deltas; else none."""
        cache = self.cache
        if result.requeued:
            self.cache = None
        elif cache is not None and cache.snapshot is snapshot:
            if not await _on_session(cache.follow, result.shards, result.generation):
                self.cache = None
        else:
            self.cache = self._built(await _on_session(
                ClusterCache.settled, snapshot, result.shards, result.generation,
                allow_preemption=self._allow_preemption, time_limit_ms=self._time_limit_ms,
                open_session=self._open_session))


def _own_commit(cache: ClusterCache, result: CommitResult) -> None:
    """A stale commit of this controller's, applied to the cache already: `catch_up` skips its
    generation. A commit that wrote nothing moved no generation (the one it returns is someone
    else's change, which the cache must still read)."""
    if result.changed_deployments:
        cache.own_commits.add(result.generation)


async def _on_session(work: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`work` in a worker thread (it blocks on the session); None when the session is lost
    (`DeciderFailed`: the decide process died, hung or raised), which the callers read as a
    change the cache cannot follow: it is dropped and the next build starts a fresh process."""
    try:
        return await asyncio.to_thread(work, *args, **kwargs)
    except DeciderFailed as exc:
        log.warning("the warm session is lost (%s): the cache is dropped", exc)
        return None

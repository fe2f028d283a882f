"""What a reconcile pass's two paths share, and what either does once it has committed.

The fast path (`fast_path.py`) and the full path (`full_path.py`) write to the same database, keep
the same warm cluster and scheduling queue, and leave the same bookkeeping for the next pass to
choose its path by (the generation and the arrivals last committed, whether work short of
replicas is to be decided again). The `Reconciler` makes one `PassState` and hands it to both,
so that neither reaches into the other nor into the reconciler; what a commit by either is
followed by (`commit`, `committed`, `report`) is written once, here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from controller.scheduling.nominations import Nominations
from controller.scheduling.warm import WarmCluster
from controller.scheduling.quarantine import Quarantine
from controller.scheduling.queue import SchedulingQueue
from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork
from controller.store.lease import CommitOutcomeUnknown
from controller.store.plans import CommitResult
from controller.store.nominations import write_nominations
from controller.store.snapshot import Snapshot
from controller.domain.values import DeploymentView
from scheduler import Plan

from controller.reconcile.first_checks import FirstChecks
from controller.reconcile.helpers import PassLaps
from controller.reconcile.pacing import RetryBackoff
from controller.reconcile.protocols import ReconcileObserver
from controller.reconcile.publishing import Publisher

log = logging.getLogger("maia.reconcile")


@dataclass(eq=False)
class PassState:
    """The state both paths of a pass share. The collaborators are the reconciler's for its life
    (the paths may keep them); `db` and `push` are swapped while `run` runs on a thread of its own,
    and the bookkeeping below them changes pass by pass: both are read here, never copied."""

    db: Database  # the reconciler's (its own thread's while `run` runs there)
    # Assignment sets to the nodes named (handed to the controller's loop while `run` runs on its own).
    push: Callable[[set[str]], None]
    publisher: Publisher
    warm: WarmCluster  # the fast path's cluster (controller/scheduling/warm.py, cache/)
    observer: ReconcileObserver
    queue: SchedulingQueue  # a new one on `resync`
    quarantined: Quarantine
    retry: RetryBackoff
    clock: Callable[[], float]
    wall_clock: Callable[[], datetime]  # when placements start and stop, for the usage meter
    # Nodes kept for the deployments waiting longest at the head of the line (`scheduling/nominations.py`).
    nominations: Nominations = field(default_factory=Nominations)
    # Failed replicas released and replaced ones retired first in a pass (it commits through `commit`).
    checks: FirstChecks = field(init=False)
    laps: PassLaps = field(default_factory=PassLaps)  # where the pass under way spends its time (the log line)
    last_generation: int | None = None
    # Deployments in the last committed pass's snapshot: more at the same generation are arrivals.
    last_arrivals: int | None = None
    # A stale full commit turned replicas away, or the changes it caught up with could help
    # work short of replicas: the next fast pass decides what is short again (`FullPath._caught_up`).
    redecide: bool = False

    def committed(self, snapshot: Snapshot, plan: Plan, result: CommitResult,
                  scope: frozenset[str] | None = None) -> None:
        """Bookkeeping after a commit that was not stale, by either path (`scope`: what a fast
        plan spoke for)."""
        self.last_generation = result.generation
        self.last_arrivals = len(snapshot.deployment_ids)
        self.warm.committed(snapshot, plan, result, scope)

    async def report(self, result: CommitResult, plan: Plan, published: tuple[set[str], list[DeploymentView]],
                     solve_ms: float, *, waiting: int, path: str) -> set[str]:
        """Log, count, push and publish what a commit changed (`published`: `_to_publish`'s); the
        deployments changed."""
        self.observer.placed(result.first_placed_after_s.values())
        self.nominations.saw(plan, self.clock(), whole=path == "full", requeued={name for name, _ in result.requeued})
        if result.changed_deployments:  # it moved the generation (else the one it returns is another's)
            self.checks.own_commit(result.generation)
        if result.requeued:
            self.observer.requeued(len(result.requeued))
        changed, deleted = published
        self.push(set(result.changed_nodes))
        if changed or deleted:
            self.publisher.publish_in_order(changed, deleted)
        self.laps.lap("publish")
        log.info(
            "reconciled path=%s generation=%s status=%s solve_ms=%.0f placements=%d unplaced=%s waiting=%d "
            "changed_nodes=%d deleted=%s stale=%s requeued=%s published_after_ms=%.0f ms=%s",
            path, result.generation, plan.status, solve_ms, len(plan.placements),
            {u.deployment: u.replicas for u in plan.unplaced}, waiting, len(result.changed_nodes),
            sorted(result.deleted_deployments), result.stale, sorted(result.requeued), self.publisher.published_after_ms,
            self.laps,
        )
        return changed

    async def store_nominations(self) -> None:
        """At a pass's end, commit what the nominations changed that no plan commit of the pass
        took (the set in force and its events): one made or ended by a pass that committed
        nothing, or ended by what its commit placed (`report`'s `saw` runs after the commit).
        Else a snapshot, a dry run and a new leader would go on with a nomination ended here."""
        if self.nominations.unstored:
            async with self.db.unit_of_work() as uow:
                await self.commit(uow, ())

    async def commit(self, uow: UnitOfWork, nodes: Iterable[str], changed: Iterable[str] = (),
                     deleted: Iterable[DeploymentView] = ()) -> None:
        """Commit a unit of work that changed `nodes`' assignment sets and the deployments
        `changed` (keys) and removed those of `deleted` (their last views). A COMMIT whose outcome
        is unknown (`CommitOutcomeUnknown`: the connection lost with it in flight) may have landed:
        before the error goes on, those nodes' agents are sent their sets as stored (a set that did
        not change is sent again, which an agent takes as it is), and those deployments are
        published as stored once the database answers (`Publisher._as_stored`: placed if it landed, as before
        if not). Sets are pushed and deployments published on change, not polled: without this an
        agent would hear of a landed commit only at its node's next change, and a watcher never
        (the next pass finds nothing to change)."""
        events = self.nominations.take_events()
        stored = self.nominations.take_stored(self.clock(), self.wall_clock())
        try:
            if events:
                await repo.record_events(uow.session, events)
            if stored is not None:  # the nominations in force changed: the set stored with this commit
                await write_nominations(uow.session, stored)
            await uow.commit()
        except CommitOutcomeUnknown:
            self.nominations.put_back(events)  # recorded by the next commit (twice if this one landed)
            if stored is not None:
                self.nominations.store_again()
            self.push(set(nodes))
            changed, deleted = set(changed), list(deleted)
            if changed or deleted:
                self.publisher.publish_in_order(changed, deleted, unsure=True)
            raise
        except BaseException:
            self.nominations.put_back(events)  # not written: the next commit records them
            if stored is not None:
                self.nominations.store_again()
            raise


class PathCollaborators:
    """What the fast and the full path each keep of the `PassState`: the collaborators that are
    the reconciler's for its life (the bookkeeping and the swapped `db` and `push` are read
    through `_state`, never copied)."""

    def __init__(self, state: PassState) -> None:
        self._state = state
        self._warm = state.warm
        self._observer = state.observer
        self._checks = state.checks
        self._quarantined = state.quarantined
        self._retry = state.retry
        self._wall_clock = state.wall_clock

"""What a reconcile pass does first, when due, in the unit of work that reads the generation:
replicas whose shards an agent reported FAILED are counted and released once their back-off is
over (`store/failures.py`, rules in `domain/restarts.py`), and outgoing replicas whose
replacements run are retired (rolling updates, drains: `store/rollout.py`).

The released replicas are placed again by the same pass, off the nodes they failed on
(`FirstChecks.avoid`: other nodes first; what finds none is retried without that after the
back-off). Both checks are skipped when the generation moved only by deletions and this
controller's own plan commits since they last ran (`FirstChecks.own_commit`): those fail no shard
and start no replacement; the replaced ones' also when it moved by nodes' changes besides, none of
those nodes draining now (a join, a node up or down: a replica is outgoing for its revision or its
node's drain only)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from controller.store import repositories as repo
from controller.store.changes import ChangesSince, read_changes_since, read_generation_and_schedulable
from controller.store.db import UnitOfWork
from controller.store.failures import FailureStep, handle_failures
from controller.store.rollout import Retired, any_draining, retire_replaced
from controller.domain.changes import ChangeKind
from controller.domain.restarts import RestartPolicy

from controller.reconcile.protocols import ReconcileObserver

log = logging.getLogger("maia.reconcile")


@dataclass(slots=True)
class _Scan:
    """A scan of every placement a pass makes first when due (`FirstChecks.before_pass`): the
    generation it last saw (None: never), so that a pass whose generation only deletions and
    this controller's own plan commits moved since skips it."""

    checked: int | None = None


class FirstChecks:
    """The failed replicas and the replaced ones a pass handles before it places anything
    (`before_pass`), and the nodes its solve keeps released replicas off (`avoid`)."""

    def __init__(
        self, *,
        restarts: RestartPolicy,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
        observer: ReconcileObserver,
        commit: Callable[[UnitOfWork, Iterable[str], Iterable[str]], Awaitable[None]],
        push: Callable[[set[str]], None],
        publish: Callable[[set[str]], None],
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock  # when placements start and stop, for the usage meter
        self._observer = observer
        self._commit = commit    # the reconciler's (`PassState.commit`)
        self._push = push        # assignment sets to the nodes named
        self._publish = publish  # the deployments named, to watchers (in commit order)
        self._replacing = True               # replicas being replaced (store/rollout.py): check every pass
        self._retire = _Scan()               # for replaced replicas to retire (store/rollout.py)
        self._restarts = restarts
        self._failures = _Scan()             # for shards reported FAILED (store/failures.py)
        self._own_commits: set[int] = set()  # generations this controller's plan commits moved to, since those checks
        self._failures_due: float | None = None     # when a failed replica's back-off ends
        self.avoid: frozenset[str] = frozenset()   # nodes the next solve keeps new shards off

    def forget_failures(self) -> None:
        """Check for failed shards on the next pass whatever the generation (a resync)."""
        self._failures.checked = self._failures_due = None

    def own_commit(self, generation: int) -> None:
        """This controller's plan commit moved the generation to `generation`."""
        self._own_commits.add(generation)

    def only_own_commit(self, base: int, generation: int) -> None:
        """Only this controller's commit moved the generation, from `base` to `generation`: no
        FAILED shard or replacement to look for."""
        for scan in (self._failures, self._retire):
            if scan.checked == base:
                scan.checked = generation

    async def before_pass(self, uow: UnitOfWork) -> tuple[int, int]:
        """The cluster generation and the count of schedulable deployments (one statement), after
        the work a pass does first when due, in the pass's unit of work (committed when it wrote
        something): replicas whose shards an agent reported FAILED (`store/failures.py`) and
        outgoing replicas whose replacements run (rolling updates, drains: `store/rollout.py`)."""
        retired: Retired | None = None
        generation, arrivals = await read_generation_and_schedulable(uow.session)
        # Shards reported FAILED bump the generation; a back-off running ends at a known time.
        failures_due = self._failures_due is not None and self._clock() >= self._failures_due
        # Checks due only because the generation moved are skipped when it moved by deletions
        # and this controller's own plan commits alone since (the usual case under load): those
        # fail no shard and start no replacement. One read of the change log instead of two
        # scans of every placement.
        moved = [(scan, scan.checked) for scan, due in ((self._failures, failures_due), (self._retire, self._replacing))
                 if not due and scan.checked is not None and scan.checked != generation]
        if moved:
            changes = await read_changes_since(uow.session, min(seen for _, seen in moved), generation=generation)
            others = changes.last_other_than((ChangeKind.DEPLOYMENT_DELETED,), ignoring=self._own_commits)
            for scan, seen in moved:
                if others is not None and seen >= others:
                    scan.checked = generation
            await self._skip_retire_after_nodes(uow, changes, moved, generation)
        if generation != self._failures.checked or failures_due:
            step = await handle_failures(uow.session, now=self._wall_clock(), policy=self._restarts)
            if step.deployments:
                generation = await repo.read_cluster_generation(uow.session)
                # Committed before the retirements' writes (the session goes on in a new
                # transaction): one that moved the generation takes no row lock after it, else a
                # writer holding those rows and waiting for the generation's row deadlocks with it
                # (PostgreSQL's lock order: store/changes.py).
                await self._commit(uow, step.nodes, step.deployments)
            # Marked checked once committed (a pass whose commit failed checks again).
            self._failures.checked = generation
            self._failures_handled(step)
        # Only while replicas are being replaced, or when the cluster changed (an update or
        # a drain may have started replacing some): an idle cluster costs no scan.
        if self._replacing or generation != self._retire.checked:
            retired = await retire_replaced(uow.session, now=self._wall_clock())
            if retired.deployments:
                generation = await repo.read_cluster_generation(uow.session)
                await self._commit(uow, retired.nodes, retired.deployments)  # the session goes on in a new transaction
            elif retired.locked:  # nothing written: its locks go now, not with the pass's plan commit
                await uow.rollback()
        if retired is not None:
            self._replacing, self._retire.checked = retired.replacing, generation
        checked = [scan.checked for scan in (self._failures, self._retire) if scan.checked is not None]
        self._own_commits = {g for g in self._own_commits if checked and g > min(checked)}
        if retired is not None and retired.deployments:
            for line in retired.lines:
                log.info("replica retired: %s", line)
            self._push(set(retired.nodes))
            self._publish(set(retired.deployments))
        return generation, arrivals

    async def _skip_retire_after_nodes(self, uow: UnitOfWork, changes: ChangesSince,
                                       moved: list[tuple[_Scan, int]], generation: int) -> None:
        """The rollout's scan is skipped too when nodes' changes moved the generation besides
        those (a join: every registration is one), unless one of those nodes is draining now:
        no other change of a node makes a replica outgoing. The failures' scan is not: a node
        gone down fails its shards."""
        seen = next((seen for scan, seen in moved if scan is self._retire), None)
        if seen is None or self._retire.checked == generation:
            return
        others = changes.last_other_than((ChangeKind.DEPLOYMENT_DELETED, ChangeKind.NODE), ignoring=self._own_commits)
        nodes = changes.objects_after(ChangeKind.NODE, seen)
        if others is not None and seen >= others and nodes is not None and not await any_draining(uow.session, nodes):
            self._retire.checked = generation

    def _failures_handled(self, step: FailureStep) -> None:
        """After `handle_failures`: the replicas released are placed again by this pass, off the
        nodes they failed on (avoided by its solve)."""
        self._failures_due = None if step.next_in_s is None else self._clock() + step.next_in_s
        for line in step.lines:
            log.info("failed shards: %s", line)
        for line in step.gave_up:  # work that stays down until someone acts: seen at --log-level WARNING
            log.warning("failed shards: %s", line)
        if step.released:
            self._observer.failed_replicas_released(step.replicas)
            self.avoid = step.avoid
            self._push(set(step.nodes))
        if step.deployments:
            self._publish(set(step.deployments))

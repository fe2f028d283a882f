"""The `Reconciler`: one reconcile pass (`reconcile_once`) and the loop that runs passes (`run`).

A pass (the package docstring tells the whole story) first does what is due before it
(`first_checks.py`), then either skips (nothing moved), goes fast on the warm session
(`FastPath`, `fast_path.py`: new deployments and others' changes as deltas, one scoped commit)
or solves the whole cluster (`FullPath`, `full_path.py`: snapshot, solve in a worker thread,
commit, retried on conflicts), and hands what it committed to the nodes and, through the
`Publisher`, to watchers. The reconciler keeps the loop, the lock a pass holds and the choice of
path; the bookkeeping both paths share (the generation and arrivals last committed, the warm
cluster, the scheduling queue, the quarantine) lives in the `PassState` (`pass_state.py`) it
makes and hands to both."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

from controller import limits
from controller.aio import wait_event
from controller.scheduling.decider import DecideProcess, open_in_process
from controller.scheduling.nominations import Nominations
from controller.scheduling.own_loop import OwnLoop
from controller.scheduling.warm import WarmCluster
from controller.scheduling.quarantine import Quarantine
from controller.scheduling.queue import SchedulingQueue
from controller.store import models as m
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.rollout import DEFAULT_SURGE
from controller.store.snapshot import Snapshot
from controller.store.turns import WritePriority, write_priority
from controller.usecases import planning
from controller.usecases.submits import SubmittedRows
from controller.domain.restarts import RestartPolicy
from scheduler import Plan
from scheduler.model import Nomination

from controller.reconcile.fast_path import FastPath
from controller.reconcile.first_checks import FirstChecks
from controller.reconcile.full_path import FullPath
from controller.reconcile.helpers import PassLaps, _same_database
from controller.reconcile.pacing import MAX_FULL_PASS_PAUSE_S, RetryBackoff, make_room
from controller.reconcile.pass_state import PassState
from controller.reconcile.protocols import (
    AlwaysLeader, Lease, NoObserver, ReconcileObserver, ReconcileOutcome, ViewReader,
)
from controller.reconcile.publishing import Publisher


log = logging.getLogger("maia.reconcile")


class Reconciler:
    """Reconciles the cluster: `run` until cancelled, or one pass at a time (`reconcile_once`)."""

    def __init__(
        self, db: Database, *,
        push: Callable[[set[str]], None],
        publish: Callable[..., Awaitable[None]],
        interval_s: float = 1.0, solve_time_limit_ms: int = 2000,
        lease: Lease | None = None, max_conflict_retries: int = 5, settle_s: float = 0.05,
        retry_backoff_s: float = 2.0, max_retry_backoff_s: float = 60.0,
        solve: Callable[..., Awaitable[Plan]] = planning.solve_online_first,
        clock: Callable[[], float] = time.monotonic,
        observer: ReconcileObserver | None = None,
        wall_clock: Callable[[], datetime] = m.utcnow,
        quarantine_after: int = limits.QUARANTINE_AFTER_FAILURES,
        allow_preemption: bool = True,
        restart_policy: RestartPolicy | None = None,
        max_surge: int = DEFAULT_SURGE,
        backoff_s: float = 1.0,
        nominate_after_s: float = limits.NOMINATE_AFTER_S,
        nomination_max_s: float = limits.NOMINATION_MAX_S,
        decider: DecideProcess | None = None,
        own_thread: bool = False,
        read_views: ViewReader | None = None,
        submitted: SubmittedRows | None = None,
        on_warm_built: Callable[[], None] = lambda: None,
    ) -> None:
        # `run` on a thread of its own (`scheduling/own_loop.py`) only when asked: on neither
        # database by default. On PostgreSQL it was the default until its submit p99 at 50/s was
        # measured both ways (docs/benchmarks.md, `ownloop`): in the controller 14.6-15.0 ms with
        # the passes on the controller's loop against 16.5-18.2 on their own thread (the batches'
        # writes' p99 6.4-7.1 against 7.1-8.4 ms), and no loss at saturation. On a SQLite file no
        # gain was shown either (issue 8, night 2, lead: three of four pairs slower). Not to be
        # asked on an in-memory database (a second engine opens another database).
        self._own_thread = own_thread and db is not None
        self._own: OwnLoop | None = None  # while `run` runs there
        self._publisher = Publisher(db, publish, read_views=read_views, interval_s=interval_s)
        self._interval = interval_s
        self._lease = lease or AlwaysLeader()
        self._settle = settle_s
        self._clock = clock
        self._observer = observer or NoObserver()
        self._retry = RetryBackoff(backoff_s=retry_backoff_s, max_backoff_s=max_retry_backoff_s, clock=clock)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._full_pass_s = 0.0       # how long the last pass took when it was one (else 0)
        self.passes = 0
        self._quarantined = Quarantine(quarantine_after)
        self._pass_started: float | None = None
        self.consecutive_failures = 0        # passes in a row that raised
        # The fast path: the warm cluster (controller/scheduling/warm.py, cache/).
        # `decider`: the warm session lives in that process (decider.py), else in this one.
        self._warm = WarmCluster(db, surge=max_surge, allow_preemption=allow_preemption,
                                 time_limit_ms=solve_time_limit_ms,
                                 open_session=open_in_process if decider is None else decider.open,
                                 on_built=on_warm_built)
        # What both paths share: the collaborators above and the bookkeeping of the last commits.
        self._state = state = PassState(
            db=db, push=push, publisher=self._publisher, warm=self._warm, observer=self._observer,
            queue=SchedulingQueue(backoff_s=backoff_s), quarantined=self._quarantined, retry=self._retry,
            clock=clock, wall_clock=wall_clock,
            nominations=Nominations(after_s=nominate_after_s, max_s=nomination_max_s))
        # Failed replicas released and replaced ones retired first in a pass (`state.push` read
        # when called: `run` on its own thread hands pushes to the controller's loop).
        self._checks = state.checks = FirstChecks(
            restarts=restart_policy or RestartPolicy(), clock=clock, wall_clock=wall_clock,
            observer=self._observer, commit=state.commit,
            push=lambda nodes: state.push(nodes),
            publish=lambda changed: self._publisher.publish_in_order(changed, []))
        self._full = FullPath(state, solve=solve, time_limit_ms=solve_time_limit_ms,
                              max_conflict_retries=max_conflict_retries, allow_preemption=allow_preemption,
                              max_surge=max_surge, wake=lambda: self.wake())
        self._fast = FastPath(state, decider=decider, submitted=submitted)
        # `resync` calls, and those a whole-cluster pass has been done after: until then one is due.
        self._resyncs = self._resynced = 0

    @property
    def fast_passes(self) -> int:
        """Passes that decided on the warm session."""
        return self._fast.passes

    @property
    def delta_passes(self) -> int:
        """Passes that only applied others' changes to the cache (nothing to decide)."""
        return self._fast.delta_passes

    @property
    def full_passes(self) -> int:
        """Passes that read and solved the whole cluster."""
        return self._full.passes

    @property
    def solves(self) -> int:
        """Whole-cluster solves (a pass whose commit went stale solves again)."""
        return self._full.solves

    @property
    def published_after_ms(self) -> float:
        """The last publish done: from its commit to the watchers told (the log line)."""
        return self._publisher.published_after_ms

    def running_for_s(self) -> float:
        """How long the pass under way has been running (0.0: none is)."""
        return 0.0 if self._pass_started is None else self._clock() - self._pass_started

    def wake(self) -> None:
        """Start a pass soon (from the controller's loop; onto the reconciler's own when it has one)."""
        if self._own is not None:
            self._own.call(self._wake.set)
        else:
            self._wake.set()

    @property
    def nominations(self) -> tuple[Nomination, ...]:
        """The nodes kept for the deployments waiting at the head of the line, one a zone
        (`scheduling/nominations.py`)."""
        return self._state.nominations.nominations

    @property
    def warm_snapshot(self) -> Snapshot | None:
        """The cached snapshot the next fast pass decides on (None: the next one reads afresh)."""
        return None if self._warm.cache is None else self._warm.cache.snapshot

    def resync(self) -> None:
        """Solve again on the next pass whatever the generation (a new leader starts afresh:
        every stored deployment judged against the limits again, nothing parked). From the warm
        cache when this controller kept one (it led before and lost the lease between passes: a
        pass the lease was lost in drops it) and it can catch up with what the leader meanwhile
        committed (the change log: its plan commits name what they touched), else from a fresh
        read."""
        if self._own is not None:  # its state belongs to the reconciler's own loop
            self._own.call(self._resync)
        else:
            self._resync()

    def _resync(self) -> None:
        self._resyncs += 1
        self._retry.cancel()
        self._checks.forget_failures()
        self._quarantined.within.clear()
        self._state.queue = SchedulingQueue(backoff_s=self._state.queue.backoff_s)
        self._state.nominations.reset()
        self.wake()

    async def run(self) -> None:
        """Reconcile until cancelled: on a thread of its own with its own event loop and its own
        database connections when so made (`own_thread`, not the default: a pass's round trips
        then never queue behind the agent streams on the controller's loop, nor the RPCs behind
        a pass's CPU, but its Python still shares the interpreter with the loop's); pushes to nodes
        and publishes to watchers are handed to the controller's loop."""
        if not self._own_thread:
            await self._run_then_stop_publishing()
            return
        own = OwnLoop("reconciler")
        push, publish, db = self._state.push, self._publisher.publish, self._state.db
        woken = self._wake.is_set()
        self._wake = asyncio.Event()  # bound to the thread's loop once it waits there
        if woken:
            self._wake.set()
        self._state.push = lambda nodes: own.to_main(push, nodes)
        self._publisher.publish = lambda *args: own.on_main(publish(*args))
        self._own = own  # wakes and resyncs go to the thread's loop from now on
        try:
            await own.run(lambda: self._run_on(_same_database(db)))
        finally:
            self._own = None
            self._state.push, self._publisher.publish = push, publish

    async def _run_on(self, db: Database) -> None:
        """`_run` with `db` (the thread's engine: connections belong to one event loop)."""
        main = self._state.db
        self._state.db = self._warm.db = self._publisher.db = db
        try:
            await self._run_then_stop_publishing()
        finally:
            self._state.db = self._warm.db = self._publisher.db = main
            await db.dispose()

    async def _run_then_stop_publishing(self) -> None:
        """`_run` until cancelled (the controller stops), then the publishes
        still in flight are cancelled and waited for, whatever the run loop was doing when it was
        cancelled: one waiting out a database outage (`Publisher._read_stored` tries again until the
        database answers) would otherwise keep going after the stop, on an engine disposed."""
        try:
            await self._run()
        finally:
            await self._publisher.cancel()

    async def _run(self) -> None:
        last_started: float | None = None
        while True:
            # Woken while the last pass ran: the next starts soon (the burst that woke it has
            # landed meanwhile, and an arrival waiting for it must not wait longer; `_make_room`).
            # Woken while idle with no warm cache: let a burst of changes (many nodes connecting
            # at once) land before the whole cluster is read. With one, the pass costs the
            # changes (the log's deltas, the arrivals): it starts soon too.
            woken_during_pass = self._wake.is_set()
            if await wait_event(self._wake, self._interval) and not woken_during_pass and self._warm.cache is None:
                await asyncio.sleep(self._settle)
            await self._make_room(last_started)
            self._wake.clear()
            if not self._lease.should_run():
                # A follower runs no pass: the failures it had as leader say nothing of it now
                # (kept, health said NOT_SERVING until it led again and a pass went through).
                self.consecutive_failures = 0
                continue
            last_started = time.perf_counter()
            try:
                await self.reconcile_once(wait_published=False)
            except LeaseLost as exc:
                log.warning("reconcile pass discarded: %s", exc)
            except Exception:
                log.exception("reconcile pass failed; retrying in %.1fs", self._interval)
                await asyncio.sleep(self._interval)
            if self._full_pass_s > 0:
                # A whole-cluster pass runs much of its work on the event loop. When changes keep
                # the generation moving (thousands of agents joining, each Register a change),
                # the next one would start at once and the loop would do little else: RPCs,
                # joins and heartbeats stall behind back-to-back snapshots. Pause as long as
                # the pass took (at most half the time goes to them); the changes meanwhile
                # are taken together by the next pass.
                await asyncio.sleep(min(self._full_pass_s, MAX_FULL_PASS_PAUSE_S))

    async def _make_room(self, last_started: float | None) -> None:
        """`pacing.make_room` on the reconciler's database (read once the period is over)."""
        await make_room(self._state.db, last_started)

    async def reconcile_once(self, *, force: bool = False, wait_published: bool = True) -> ReconcileOutcome:
        """One pass; solves only if the cluster generation moved since the last solve, a
        time-limited pass is due for a retry, or `force`. With `wait_published` (the default)
        it returns once the deployments it changed are published to watchers; the run loop
        lets that overlap with its next pass (`Publisher.publish_in_order`)."""
        outcome = await self._one_pass(force=force)
        if wait_published:
            await self.published()
        return outcome

    async def published(self) -> None:
        """Wait until every publish started so far is done."""
        await self._publisher.published()

    async def _one_pass(self, *, force: bool) -> ReconcileOutcome:
        # On SQLite a pass's transactions take the writer after answered batches (submits,
        # deletions), before agents' reports: a deployment is placed when its plan commits.
        with write_priority(WritePriority.SCHEDULE):
            return await self._one_pass_locked(force=force)

    async def _one_pass_locked(self, *, force: bool) -> ReconcileOutcome:
        async with self._lock:
            self.passes += 1
            self._pass_started = self._clock()
            self._state.laps = PassLaps()
            full_before, self._full_pass_s, began = self.full_passes, 0.0, time.perf_counter()
            resyncs = self._resyncs
            force = force or resyncs != self._resynced
            try:
                # One unit of work for a fast pass, reads and commit (each more costs round trips:
                # a connection's check, BEGIN and the end, which on PostgreSQL under load are
                # what a pass waits for); the full path takes its own.
                outcome: ReconcileOutcome | None = None
                async with self._state.db.unit_of_work() as uow:
                    generation, arrivals = await self._checks.before_pass(uow)
                    self._state.laps.lap("generation")
                    now = self._clock()
                    retry_due = self._retry.due(now) or self._state.queue.backoff_due(now)
                    self._state.queue.arrived(arrivals - (self._state.last_arrivals or 0))
                    # Nominations due (one to end, nodes let go) in a cluster where nothing else
                    # changes: on the warm cluster when there is one (a fast pass deciding what
                    # waits again), else the full solve takes them in.
                    nominations_due = self._state.nominations.due(now)
                    self._state.redecide |= nominations_due and self._warm.cache is not None
                    if (not force and not retry_due and generation == self._state.last_generation
                            and arrivals == self._state.last_arrivals and not self._state.redecide
                            and not nominations_due):
                        outcome = ReconcileOutcome(generation=generation)
                        self._observer.pass_taken("idle")  # woken for nothing (or only retired/released first)
                    elif not (force or retry_due) and self._may_go_fast(generation, arrivals):
                        outcome = await self._fast.decide_and_commit(uow, generation, arrivals)
                if outcome is None:
                    outcome = await self._full.solve_and_commit()
                if outcome.solved:
                    self._state.queue.arrived(0)
                self._state.queue.forget(outcome.deleted)
                self._observer.queue_depths(self._state.queue.depths())
                await self._state.store_nominations()
                self._observer.nominated(self._state.nominations.nominated_nodes)
            except LeaseLost:  # not a failure of this pass: another controller schedules now
                self._warm.drop()
                raise
            except BaseException:  # the cache may hold what was never committed
                self._warm.drop()
                self.consecutive_failures += 1
                raise
            finally:
                if self.full_passes != full_before:  # real time, whatever clock the loop is given
                    self._full_pass_s = time.perf_counter() - began
                self._pass_started = None
            self.consecutive_failures = 0
            self._resynced = resyncs
            return outcome

    def _may_go_fast(self, generation: int, arrivals: int) -> bool:
        """Either nobody changed the cluster since this
        controller's last commit and deployments arrived (or work short of replicas is to be
        decided again: `FullPath._caught_up`), or others changed it and the cache may follow
        (`WarmCluster.catch_up` says): the pass may go on the warm cluster."""
        own = self._warm.own_generation
        if self._state.last_arrivals is None or own != self._state.last_generation:
            return False
        if generation == own and not self._state.redecide:
            return arrivals > self._state.last_arrivals
        return self._warm.cache is not None

"""The reconcile loop: snapshot -> solve -> commit -> assign.

Woken by submissions, deletions and node changes (and on an interval as a safety net), one pass
1. skips everything unless the cluster generation moved or deployments arrived since the last
   solve (an idle cluster costs one cheap query per interval, never a solve; submissions leave
   the generation alone so that they never make a plan conflict), or the last solve stopped at its time
   limit with work left unplaced: that pass is retried after a back-off (doubling up to a cap)
   even on an unchanged cluster, or an unlucky time-limited solve would leave work pending
   until something else changed,
2. loads a snapshot, solves it in a worker thread (deployments no change has given a chance
   since they were found unplaceable are left out: `scheduling/queue.py`), and commits the plan
   in one transaction through the plan applier (`store/plans/`): each replica it places is
   re-checked against the committed state, and one that no longer fits is left out and solved
   again after a back-off; if the cluster changed while it solved, what still held is written
   and the cache of what that commit left catches up with the changes in between from the
   change log as deltas (what was turned away, or could be helped, is decided on the warm
   session by the next pass); only when the cache cannot follow them does the pass solve
   again from a fresh snapshot; the commit also releases the shards of DELETING deployments
   and removes their rows,
3. pushes new AssignmentSets to the nodes whose sets changed and publishes deployment events
   (in the background, in commit order: the run loop's next pass does not wait for watchers).
Before step 2, in the unit of work that reads the generation, replicas whose shards an agent
reported FAILED are handled and outgoing replicas whose replacements run are retired (below):
on PostgreSQL under load a pass waits mostly on round trips, so it takes as few transactions
as it can (the log line's `ms=` says where each pass spent its time).
The fast path skips the re-read: while the cached snapshot (`scheduling/cache.py`, `warm.py`)
can follow what changed since this controller's own last commit, a pass reads just the new
deployment rows, decides them on a warm `Session` kept with the cached snapshot, and commits
them in one scoped transaction; an arrival the session cannot place gets one more try from the
full solve after `backoff_s` (the back-off; from the cache, which follows its commit), which
parks it if it fails again. Changes by others are read from the change log
(`store/changes.py`): node changes (joins, hellos, cordons, suspects, nodes removed or
resized, evictions: their shards re-placed on the session, committed by the pass; drains),
tenant contracts, the topology, and deployments changed (updates and rollouts, scale downs,
failed shards reported, failed replicas released, replaced replicas retired; an outgoing
replica's node going down; another controller's plan commits: each read again whole, the
shards the view leaves out released by the pass's scoped commit) are
applied to the cache as deltas, and when they could help, the work still short of replicas
(the unschedulable queue's included; a rollout's or a drain's replacements, within the surge)
is decided again on the session; deployments being deleted leave the cache and the session as
departures, their shards and rows removed by the pass's scoped commit. Anything else (a commit
by another controller touching very many deployments, a fast commit that was re-queued, a pass
the lease was lost in) drops the cache and takes the full path above, which leaves a cache of
what it committed for the next changes. A controller leading again (`resync`) solves the whole
cluster once, from the cache it kept when it can catch up with what the leader meanwhile
committed.
Before step 2, replicas whose shards an agent reported FAILED are counted and, once their back-off
is over, released (`store/failures.py`, rules in `domain/restarts.py`): that pass places them
again with the nodes they failed on cordoned for it alone (other nodes first; what finds none
is retried without that after the back-off). The report and the release are deltas (the
release logs the deployments it touched: their shards are read again), so the pass places them
on the warm session (`ClusterCache.decide(avoid=)`), or with the full solve when it takes the
full path.
A `Lease` decides whether this controller may reconcile at all: with several controllers on one
database only the leader does (`controller.leadership`; `AlwaysLeader` alone). The leader's
database is fenced (`Database.fenced`): a pass whose lease was lost meanwhile commits nothing
(`LeaseLost`), and the loop waits until it leads again.

One bad deployment never stalls the others: one beyond today's limits, or one the solver
raises on, is quarantined (`scheduling/quarantine.py`) and the rest solved again.
`consecutive_failures` and `running_for_s()` tell the health monitor whether it is doing its job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from controller import limits
from controller.aio import cancel_and_wait, wait_event
from controller.scheduling.decider import DecideProcess, DeciderFailed, open_in_process
from controller.scheduling.own_loop import OwnLoop
from controller.scheduling.warm import ArrivalDocs, WarmCluster
from controller.scheduling.quarantine import Quarantine
from controller.scheduling.queue import QueueDepths, SchedulingQueue
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.changes import read_changes_since, read_generation_and_schedulable
from controller.store.db import Database, UnitOfWork, database_failed
from controller.store.lease import CommitOutcomeUnknown, LeaseLost
from controller.store.failures import FailureStep, handle_failures
from controller.store.plans import CommitResult, commit_plan
from controller.store.rollout import DEFAULT_SURGE, Retired, retire_replaced, stored_key
from controller.store.snapshot import Snapshot
from controller.store.turns import WritePriority, write_priority
from controller.usecases import planning
from controller.usecases.deployments import views_of
from controller.usecases.submits import SubmittedRows
from controller.domain.changes import ChangeKind
from controller.domain.restarts import RestartPolicy
from controller.domain.values import DeploymentView, deployment_key, split_deployment_key
from scheduler import Plan

log = logging.getLogger("maia.reconcile")


class Lease(Protocol):
    def should_run(self) -> bool: ...


class ReconcileObserver(Protocol):
    """What the loop reports as it goes (the metrics implement it)."""

    def solved(self, status: str, seconds: float) -> None: ...

    def plan_conflict(self) -> None: ...

    def requeued(self, replicas: int) -> None: ...

    def failed_replicas_released(self, replicas: int) -> None: ...

    def placed(self, latencies_s: Iterable[float]) -> None: ...

    def queue_depths(self, depths: QueueDepths) -> None: ...

    def pass_taken(self, path: str) -> None: ...


class NoObserver:
    def solved(self, status: str, seconds: float) -> None:
        pass

    def plan_conflict(self) -> None:
        pass

    def requeued(self, replicas: int) -> None:
        pass

    def failed_replicas_released(self, replicas: int) -> None:
        pass

    def placed(self, latencies_s: Iterable[float]) -> None:
        pass

    def queue_depths(self, depths: QueueDepths) -> None:
        pass

    def pass_taken(self, path: str) -> None:
        pass


class AlwaysLeader:
    """The single-controller lease: always the leader."""

    def should_run(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class ReconcileOutcome:
    solved: bool = False
    generation: int = 0
    conflicts: int = 0
    changed_nodes: frozenset[str] = frozenset()
    changed_deployments: frozenset[str] = frozenset()
    deleted: tuple[str, ...] = ()
    # Seconds until a pass is solved again although nothing changed (None: no retry): it was
    # time-limited with work left, or the plan applier turned replicas away.
    retry_in_s: float | None = None


def waits_on_report(view: DeploymentView) -> bool:
    """Whether a pass may have work once agents' reports changed this deployment's shards
    (`view`: as the report flush committed it), so the reports' flush wakes the reconciler.

    A pass reads shard phases for two things alone: a rollout's or a drain's outgoing replicas
    are stopped once their replacements run (`store/rollout.py`: only a deployment that still has
    outgoing replicas; one not running goes at once), and replicas with a FAILED shard are
    counted and released (`store/failures.py`; the flush bumps the cluster generation for a
    newly failed shard). Nothing else a pass does follows a report: a deletion releases shards
    without waiting for them to stop, and a shard that loads or runs frees and takes no
    capacity. So a new deployment's shards going LOADING -> RUNNING, most reports at
    saturation, wake nothing."""
    return view.outgoing_replicas > 0 or any(p.phase == _FAILED for p in view.placements)


_FAILED = m.ShardPhase.FAILED.value


def time_limited(plan: Plan) -> bool:
    """The solver stopped at its time limit with work left unplaced: another try may place it.

    The solver says so itself (`stats.time_limit_hit`, a TIME_LIMIT reason); a `feasible`
    status alone only means optimality was not proved, not that more could be placed."""
    if not plan.unplaced:
        return False
    return bool(plan.stats.get("time_limit_hit")) or any(
        r.code == "TIME_LIMIT" for u in plan.unplaced for r in u.reasons)


class PassLaps:
    """Where one pass spends its wall-clock time, step by step (milliseconds, for the log line):
    the event loop's other work shows up inside the steps that await."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.ms[step] = self.ms.get(step, 0.0) + (now - self._last) * 1000
        self._last = now

    def __str__(self) -> str:
        return ",".join(f"{step}:{ms:.0f}" for step, ms in self.ms.items())


def _on_thread_cpu(work: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`work(*args)` and the CPU seconds this thread spent on it (in a worker thread: the wall
    time beyond it is time the work waited for the GIL, held by the event loop)."""
    began = time.thread_time()
    return work(*args), time.thread_time() - began


async def _deleting_views(session: AsyncSession, keys: frozenset[str]) -> dict[str, DeploymentView]:
    """The last state of deployments a commit will remove (for their DELETED events): read as
    plain columns (`repo.deployments_named`), not ORM rows."""
    if not keys:
        return {}
    views = {}
    for named in await repo.deployments_named(session, {split_deployment_key(key)[1] for key in keys}):
        key = deployment_key(named.row.tenant_id, named.row.name)
        if key in keys and named.row.phase == m.DeploymentPhase.DELETING:
            views[key] = named.view()
    return views


def _to_publish(result: CommitResult, deleting: dict[str, DeploymentView]) -> tuple[set[str], list[DeploymentView]]:
    """What watchers are told of a plan commit: the deployments it changed (keys: their views are
    read as committed) and the last views of those it removed (`deleting`: read before it)."""
    changed = (result.changed_deployments | result.updated_deployments) - result.deleted_deployments
    return changed, [deleting[name] for name in sorted(result.deleted_deployments) if name in deleting]


def _same_database(db: Database) -> Database:
    """A handle of its own (engine, pool) on `db`'s database, fenced as `db` is: for another
    event loop (a connection belongs to the loop that opened it)."""
    own = Database(db.url)
    return own if db.fence is None else own.fenced(db.fence)


@dataclass(slots=True)
class _Scan:
    """A scan of every placement a pass makes first when due (`Reconciler._before_pass`): the
    generation it last saw (None: never), so that a pass whose generation only deletions and
    this controller's own plan commits moved since skips it."""

    checked: int | None = None


# The longest pause after a whole-cluster pass (`Reconciler.run`).
MAX_FULL_PASS_PAUSE_S = 5.0
# Passes start at most this often; then each waits while answered batches are written, until the
# second more since the last one began (`Reconciler._make_room`).
PASS_PERIOD_S = 0.1
ANSWER_YIELD_MAX_S = 0.05
# A publish whose read of the deployments failed for the database tries again after the reconcile
# interval (at least the first), doubling up to the second (`Reconciler._read_stored`).
MIN_PUBLISH_RETRY_S = 0.05
MAX_PUBLISH_RETRY_S = 30.0

# Reads the views of deployments by key (TENANT/NAME) in a unit of work (`usecases.deployments.views_of`).
ViewReader = Callable[[UnitOfWork, set[str]], Awaitable[list[DeploymentView]]]


class Reconciler:
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
        decider: DecideProcess | None = None,
        own_thread: bool | None = None,
        read_views: ViewReader | None = None,
        submitted: SubmittedRows | None = None,
        on_warm_built: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        # `run` on a thread of its own (`scheduling/own_loop.py`): by default on PostgreSQL. On a
        # SQLite file it can (its writers take turns across threads, `db.SqliteWriters`) but does
        # not by default: no gain was shown at 4,096 nodes (docs/benchmarks.md, issue 8, night 2,
        # lead: three of four pairs slower, and runs of one code varied more than the versions did),
        # and each of a plan commit's trips back to the reconciler's thread may wait for the GIL
        # behind the busy controller's loop while it holds SQLite's writer. Never on an in-memory
        # one (a second engine opens another database).
        self._own_thread = db is not None and not db.is_sqlite if own_thread is None else own_thread
        self._own: OwnLoop | None = None  # while `run` runs there
        self._push = push
        self._publish = publish
        # Given: the views of the deployments a commit changed are read here, on the reconciler's
        # own connection (and loop), and handed to `publish(changed, deleted, views)`; else `publish`
        # reads them (on the controller's loop).
        self._read_views = read_views
        self._publishing: asyncio.Task[None] | None = None  # the last of the publishes in flight (in order)
        self._publishes: set[asyncio.Task[None]] = set()    # every one in flight (cancelled when `run` ends)
        self._interval = interval_s
        self._time_limit_ms = solve_time_limit_ms
        self._lease = lease or AlwaysLeader()
        self._retries = max_conflict_retries
        self._settle = settle_s
        self._retry_backoff = retry_backoff_s
        self._max_retry_backoff = max_retry_backoff_s
        self._solve = solve
        self._clock = clock
        self._observer = observer or NoObserver()
        self._wall_clock = wall_clock  # when placements start and stop, for the usage meter
        self._time_limited_passes = 0  # in a row: the back-off doubles with each
        self._retry_at: float | None = None
        self._wake = asyncio.Event()
        self._last_generation: int | None = None
        # Deployments in the last committed pass's snapshot: more at the same generation are arrivals.
        self._last_arrivals: int | None = None
        self._queue = SchedulingQueue(backoff_s=backoff_s)
        self._lock = asyncio.Lock()
        self.full_passes = 0          # passes that read and solved the whole cluster
        self._full_pass_s = 0.0       # how long the last pass took when it was one (else 0)
        self.passes = 0
        self.solves = 0
        self._quarantined = Quarantine(quarantine_after)
        # The deployments this process's submit batches validated and inserted (not judged again).
        self._submitted = submitted
        self._allow_preemption = allow_preemption
        self._max_surge = max_surge
        self._replacing = True               # replicas being replaced (store/rollout.py): check every pass
        self._retire = _Scan()               # for replaced replicas to retire (store/rollout.py)
        self._restarts = restart_policy or RestartPolicy()
        self._failures = _Scan()             # for shards reported FAILED (store/failures.py)
        self._own_commits: set[int] = set()  # generations this controller's plan commits moved to, since those checks
        self._failures_due: float | None = None     # when a failed replica's back-off ends
        self._avoid: frozenset[str] = frozenset()   # nodes the next solve keeps new shards off
        self._pass_started: float | None = None
        self._laps = PassLaps()              # where the pass under way spends its time (the log line)
        self.consecutive_failures = 0        # passes in a row that raised
        self.published_after_ms = 0.0        # the last publish done: from its commit to the watchers told (the log line)
        # The fast path: the warm cluster (controller/scheduling/warm.py, cache.py).
        # `decider`: the warm session lives in that process (decider.py), else in this one.
        self._warm = WarmCluster(db, surge=max_surge, allow_preemption=allow_preemption,
                                 time_limit_ms=solve_time_limit_ms,
                                 open_session=open_in_process if decider is None else decider.open,
                                 on_built=on_warm_built)
        self._decider = decider
        self.fast_passes = 0   # passes that decided on the warm session
        self.delta_passes = 0  # passes that only applied others' changes to the cache (nothing to decide)
        # A stale full commit turned replicas away, or the changes it caught up with could help
        # work short of replicas: the next fast pass decides what is short again (`_caught_up`).
        self._redecide = False
        # `resync` calls, and those a whole-cluster pass has been done after: until then one is due.
        self._resyncs = self._resynced = 0

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
        self._retry_at = None
        self._failures.checked = self._failures_due = None
        self._quarantined.within.clear()
        self._queue = SchedulingQueue(backoff_s=self._queue.backoff_s)
        self.wake()

    async def run(self) -> None:
        """Reconcile until cancelled: on a thread of its own with its own event loop and its own
        database connections when so made (`own_thread`, by default on PostgreSQL: a pass's
        round trips then never queue behind the agent streams on the controller's loop, nor the
        RPCs behind a pass's CPU); pushes to nodes and publishes to watchers are handed to the
        controller's loop."""
        if not self._own_thread:
            await self._run_then_stop_publishing()
            return
        own = OwnLoop("reconciler")
        push, publish, db = self._push, self._publish, self._db
        woken = self._wake.is_set()
        self._wake = asyncio.Event()  # bound to the thread's loop once it waits there
        if woken:
            self._wake.set()
        self._push = lambda nodes: own.to_main(push, nodes)
        self._publish = lambda *args: own.on_main(publish(*args))
        self._own = own  # wakes and resyncs go to the thread's loop from now on
        try:
            await own.run(lambda: self._run_on(_same_database(db)))
        finally:
            self._own = None
            self._push, self._publish = push, publish

    async def _run_on(self, db: Database) -> None:
        """`_run` with `db` (the thread's engine: connections belong to one event loop)."""
        main = self._db
        self._db = self._warm.db = db
        try:
            await self._run_then_stop_publishing()
        finally:
            self._db = self._warm.db = main
            await db.dispose()

    async def _run_then_stop_publishing(self) -> None:
        """`_run` until cancelled (the controller stops), then the publishes
        still in flight are cancelled and waited for, whatever the run loop was doing when it was
        cancelled: one waiting out a database outage (`_read_stored` tries again until the
        database answers) would otherwise keep going after the stop, on an engine disposed."""
        try:
            await self._run()
        finally:
            await cancel_and_wait(tuple(self._publishes))

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
        """Before a pass that follows the last one closely: wait until `PASS_PERIOD_S` after the
        last one started, then while submit or delete batches (their callers waiting) are being
        written or are about to be (`WriterTurns.answering`), until `ANSWER_YIELD_MAX_S` more.
        At 50 submits a second on 4,096 nodes passes ran back to back, a core's worth, each
        taking the event loop and SQLite's writer from the batches a caller waits for; the
        arrivals a pass waits for here are decided by it rather than by one more pass. A pass
        that took longer than both (saturation) is followed at once, as before. The pass goes as
        soon as the last such batch leaves the writer (`WriterTurns.wait_until_not_answering`, woken
        by the turns, not a poll)."""
        if last_started is None:
            return
        wait_s = last_started + PASS_PERIOD_S - time.perf_counter()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        turns = None if self._db is None else self._db.turns
        if turns is None:
            return
        left_s = last_started + PASS_PERIOD_S + ANSWER_YIELD_MAX_S - time.perf_counter()
        if left_s > 0:
            await turns.wait_until_not_answering(left_s)

    async def reconcile_once(self, *, force: bool = False, wait_published: bool = True) -> ReconcileOutcome:
        """One pass; solves only if the cluster generation moved since the last solve, a
        time-limited pass is due for a retry, or `force`. With `wait_published` (the default)
        it returns once the deployments it changed are published to watchers; the run loop
        lets that overlap with its next pass (`_publish_in_order`)."""
        outcome = await self._one_pass(force=force)
        if wait_published:
            await self.published()
        return outcome

    def _publish_in_order(self, changed: set[str], deleted: list[DeploymentView], *, unsure: bool = False) -> None:
        """Publish what a commit changed without holding up the pass: reading the deployments'
        views for the watchers costs round trips that, on PostgreSQL under load, took a sixth of
        every pass. Publishes run one after the other, in the order of the commits. `unsure`: the
        commit's outcome is unknown (`_commit`): watchers are told what is stored (`_as_stored`)."""
        self._publishing = asyncio.get_running_loop().create_task(
            self._publish_after(self._publishing, changed, deleted, time.perf_counter(), unsure=unsure))
        self._publishes.add(self._publishing)
        self._publishing.add_done_callback(self._publishes.discard)

    async def _publish_after(self, previous: asyncio.Task[None] | None, changed: set[str],
                             deleted: list[DeploymentView], queued: float, *, unsure: bool = False) -> None:
        if previous is not None:  # cancelled while it waits: `run` ended, and cancels every publish in flight
            await asyncio.wait([previous])
        try:
            views: list[DeploymentView] = []
            if unsure:
                changed, deleted, views = await self._as_stored(changed, deleted)
            elif self._read_views is not None and changed:
                views = await self._read_stored(changed, self._read_views)
            if (changed or deleted) and self._read_views is None:  # `publish` reads the views itself
                await self._publish(changed, deleted)
            elif changed or deleted:
                await self._publish(changed, deleted, views)
        except Exception:
            log.exception("publishing %d changed and %d deleted deployments failed", len(changed), len(deleted))
        self.published_after_ms = (time.perf_counter() - queued) * 1000

    async def _read_stored(self, keys: set[str], read: ViewReader) -> list[DeploymentView]:
        """`read(uow, keys)` once the database answers: a read that fails for the database
        (`database_failed`: a connection lost, none in time) is tried again, after the reconcile
        interval doubling up to `MAX_PUBLISH_RETRY_S`, until it answers; the publishes behind it
        wait (they stay in commit order). A commit that landed is so told to watchers after an
        outage rather than never."""
        wait = max(self._interval, MIN_PUBLISH_RETRY_S)
        while True:
            try:
                async with self._db.unit_of_work() as uow:
                    return await read(uow, keys)
            except Exception as exc:
                if not database_failed(exc):
                    raise
                log.warning("reading %d deployments to publish failed (%s: %s); trying again in %.1fs", len(keys),
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, MAX_PUBLISH_RETRY_S)

    async def _as_stored(self, changed: set[str], deleted: list[DeploymentView],
                         ) -> tuple[set[str], list[DeploymentView], list[DeploymentView]]:
        """What a commit whose outcome is unknown would have changed, as stored once the database
        answers (`_read_stored`): whether it landed or not, watchers are told only what is stored.
        The deployments it changed that exist, with their views as read (placed if it landed, as
        before if not: an event that repeats a state, never one that was not stored); of those it
        would have removed, the ones gone, with their last views (deleted). One it would have
        removed that is still there was DELETING and still is: nothing to say of it."""
        stored = await self._read_stored(changed | {view.spec.key for view in deleted}, self._read_views or views_of)
        keys = {view.spec.key for view in stored}
        return (changed & keys, [view for view in deleted if view.spec.key not in keys],
                [view for view in stored if view.spec.key in changed])

    async def published(self) -> None:
        """Wait until every publish started so far is done."""
        while self._publishing is not None and not self._publishing.done():
            await asyncio.wait([self._publishing])

    async def _one_pass(self, *, force: bool) -> ReconcileOutcome:
        # On SQLite a pass's transactions take the writer after answered batches (submits,
        # deletions), before agents' reports: a deployment is placed when its plan commits.
        with write_priority(WritePriority.SCHEDULE):
            return await self._one_pass_locked(force=force)

    async def _one_pass_locked(self, *, force: bool) -> ReconcileOutcome:
        async with self._lock:
            self.passes += 1
            self._pass_started = self._clock()
            self._laps = PassLaps()
            full_before, self._full_pass_s, began = self.full_passes, 0.0, time.perf_counter()
            resyncs = self._resyncs
            force = force or resyncs != self._resynced
            try:
                # One unit of work for a fast pass, reads and commit (each more costs round trips:
                # a connection's check, BEGIN and the end, which on PostgreSQL under load are
                # what a pass waits for); the full path takes its own.
                outcome: ReconcileOutcome | None = None
                async with self._db.unit_of_work() as uow:
                    generation, arrivals = await self._before_pass(uow)
                    self._laps.lap("generation")
                    now = self._clock()
                    retry_due = self._retry_at is not None and now >= self._retry_at or self._queue.backoff_due(now)
                    self._queue.arrived(arrivals - (self._last_arrivals or 0))
                    if (not force and not retry_due and generation == self._last_generation
                            and arrivals == self._last_arrivals and not self._redecide):
                        outcome = ReconcileOutcome(generation=generation)
                        self._observer.pass_taken("idle")  # woken for nothing (or only retired/released first)
                    elif not (force or retry_due) and self._may_go_fast(generation, arrivals):
                        outcome = await self._fast_pass(uow, generation, arrivals)
                if outcome is None:
                    outcome = await self._solve_and_commit()
                if outcome.solved:
                    self._queue.arrived(0)
                self._observer.queue_depths(self._queue.depths())
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

    async def _before_pass(self, uow: UnitOfWork) -> tuple[int, int]:
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
            others = (await read_changes_since(uow.session, min(seen for _, seen in moved),
                                               generation=generation)).last_other_than(
                (ChangeKind.DEPLOYMENT_DELETED,), ignoring=self._own_commits)
            for scan, seen in moved:
                if others is not None and seen >= others:
                    scan.checked = generation
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
        if retired is not None:
            self._replacing, self._retire.checked = retired.replacing, generation
        checked = [scan.checked for scan in (self._failures, self._retire) if scan.checked is not None]
        self._own_commits = {g for g in self._own_commits if checked and g > min(checked)}
        if retired is not None and retired.deployments:
            for line in retired.lines:
                log.info("replica retired: %s", line)
            self._push(set(retired.nodes))
            self._publish_in_order(set(retired.deployments), [])
        return generation, arrivals

    def _failures_handled(self, step: FailureStep) -> None:
        """After `handle_failures`: the replicas released are placed again by this pass, off the
        nodes they failed on (avoided by its solve)."""
        self._failures_due = None if step.next_in_s is None else self._clock() + step.next_in_s
        for line in step.lines:
            log.info("failed shards: %s", line)
        if step.released:
            self._observer.failed_replicas_released(step.replicas)
            self._avoid = step.avoid
            self._push(set(step.nodes))
        if step.deployments:
            self._publish_in_order(set(step.deployments), [])

    def _schedule_retry(self, plan: Plan, *, requeued: bool = False) -> float | None:
        """After a commit: when to solve again although nothing changed (None: not needed):
        the solve stopped at its time limit with work left, or the applier turned replicas away."""
        if not (requeued or time_limited(plan)):
            self._time_limited_passes, self._retry_at = 0, None
            return None
        delay = min(self._retry_backoff * 2 ** self._time_limited_passes, self._max_retry_backoff)
        self._time_limited_passes += 1
        self._retry_at = self._clock() + delay
        return delay

    def _may_go_fast(self, generation: int, arrivals: int) -> bool:
        """Either nobody changed the cluster since this
        controller's last commit and deployments arrived (or work short of replicas is to be
        decided again: `_caught_up`), or others changed it and the cache may follow
        (`WarmCluster.catch_up` says): the pass may go on the warm cluster."""
        own = self._warm.own_generation
        if self._last_arrivals is None or own != self._last_generation:
            return False
        if generation == own and not self._redecide:
            return arrivals > self._last_arrivals
        return self._warm.cache is not None

    async def _fast_pass(self, uow: UnitOfWork, generation: int, arrivals: int) -> ReconcileOutcome | None:
        """Follow others' changes (up to `generation`, read first in `uow`), then decide the
        arrivals (and, after a change that could help them, what is still short of replicas) on
        the warm cluster and commit them, all in the pass's unit of work `uow` (module doc of
        controller/scheduling/cache.py); None: the full path must run instead."""
        started = time.perf_counter()
        helped, self._redecide = self._redecide, False
        if generation != self._warm.own_generation:
            caught_up = await self._warm.catch_up(uow.session, generation=generation)
            self._laps.lap("catch_up")
            if caught_up is None:
                return None
            helped |= caught_up
            self._last_generation = self._warm.own_generation
        read = await self._warm.arrivals(uow.session, arrivals) if arrivals != self._last_arrivals else ArrivalDocs([])
        self._laps.lap("arrivals")
        cache = self._warm.cache
        if read is None or cache is None or self._quarantined.judge(read.docs + read.late, self._submitted_here(read)):
            self._warm.drop()  # a deployment beyond the limits is quarantined by the full path
            return None
        docs, late = read.docs, read.late
        if helped:  # everything unschedulable is active again: decided now, on the session
            self._queue.helped()
        # Arrivals committed out of order go first, followed as the commit lists them.
        try:
            # A worker thread only when the session is asked (it blocks on it): not after it answered none.
            retried = (await asyncio.to_thread(cache.pending_docs) if cache.may_hold_pending else []) + late \
                if helped else late
        except DeciderFailed:  # the session in the decide process is lost
            log.exception("the warm session is lost; solving the whole cluster")
            self._warm.drop()
            return None
        departed = cache.snapshot.deleting
        avoided = self._avoid  # nodes replicas just failed on: other nodes first, for this pass
        if not docs and not retried and not departed and not cache.repairs and not cache.releasing:
            self._avoid = frozenset()
            # Deployments another controller placed are held now (`ClusterCache.apply_deployments`).
            self._last_arrivals = len(cache.snapshot.deployment_ids)
            self.delta_passes += 1
            self._observer.pass_taken("delta")
            return ReconcileOutcome(generation=cache.snapshot.generation)
        child_cpu_s = 0.0 if self._decider is None else self._decider.cpu_s
        try:
            fast, cpu_s = await asyncio.to_thread(_on_thread_cpu, cache.decide, docs, self._warm.unplaced, retried,
                                                  avoided)
        except Exception:
            log.exception("the session failed to decide %d arrivals; solving the whole cluster", len(docs))
            self._warm.drop()
            return None
        decided_s = time.perf_counter() - started
        self._laps.lap("decide")
        self._laps.ms["decide_cpu"] = cpu_s * 1000  # against `decide`: what waiting for the GIL cost
        if self._decider is not None:  # the session's own CPU, in the decide process
            self._laps.ms["decide_child_cpu"] = (self._decider.cpu_s - child_cpu_s) * 1000
        self._observer.solved(fast.plan.status, decided_s)
        base = cache.snapshot.generation
        deleting = await _deleting_views(uow.session, departed)
        result = await commit_plan(uow.session, cache.snapshot, fast.plan, scope=fast.scope, actor="controller",
                                   now=self._wall_clock(), laps=self._laps.lap)
        self._laps.lap("commit_plan")
        published = _to_publish(result, deleting)
        await self._commit(uow, result.changed_nodes, *published)
        self._laps.lap("commit")
        self.fast_passes += 1
        self._observer.pass_taken("fast")
        changed = await self._report(result, fast.plan, published, decided_s * 1000, waiting=0, path="fast")
        if result.stale:  # someone changed the cluster meanwhile: what held is written (re-checked)
            self._observer.plan_conflict()
            if result.requeued:  # what did not hold: solve it all
                self._warm.drop()
                return None
        else:  # only this commit moved the generation: no FAILED shard or replacement to look for
            for scan in (self._failures, self._retire):
                if scan.checked == base:
                    scan.checked = result.generation
        self._committed(cache.snapshot, fast.plan, result, fast.scope)
        self._quarantined.good.update(d["id"] for d in docs + late)
        await self._warm.after_fast(cache, fast, result)
        self._laps.lap("after")
        if result.stale:  # the next pass reads the change that made it stale from the log
            self._last_generation = self._warm.own_generation
        # The full solve tries the arrivals left short (and what was preempted) once more; it may
        # move others. What was tried again waits for the next change that could help it.
        arrived = {d["id"] for d in docs + late}
        self._queue.back_off([name for name in fast.unplaced if name in arrived]
                             + [p.deployment for p in fast.plan.preempted], self._clock())
        self._avoid = frozenset()
        # What found no other node than the ones it failed on is placed anywhere by the full
        # solve after the back-off, as on the full path.
        short = avoided and any(name in fast.extended for name in fast.unplaced)
        retry_in_s = self._schedule_retry(fast.plan, requeued=True) if result.requeued or short else None
        return ReconcileOutcome(
            solved=True, generation=result.generation, changed_nodes=frozenset(result.changed_nodes),
            changed_deployments=frozenset(changed), deleted=tuple(sorted(result.deleted_deployments)),
            retry_in_s=retry_in_s)

    def _submitted_here(self, read: ArrivalDocs) -> set[str]:
        """The arrivals this process's submit batches validated and inserted, read as inserted
        (`SubmittedRows`): the quarantine's judge would check the same fields against the same
        limits again. Each is taken from `SubmittedRows` once, whatever it is found to be."""
        if self._submitted is None:
            return set()
        inserted = self._submitted.take(doc["id"] for doc in read.docs + read.late)
        return {key for key, row in inserted.items() if row == read.as_inserted.get(key)}

    def _committed(self, snapshot: Snapshot, plan: Plan, result: CommitResult,
                   scope: frozenset[str] | None = None) -> None:
        """Bookkeeping after a commit that was not stale, by either path (`scope`: what a fast
        plan spoke for)."""
        self._last_generation = result.generation
        self._last_arrivals = len(snapshot.deployment_ids)
        self._warm.committed(snapshot, plan, result, scope)

    async def _report(self, result: CommitResult, plan: Plan, published: tuple[set[str], list[DeploymentView]],
                      solve_ms: float, *, waiting: int, path: str) -> set[str]:
        """Log, count, push and publish what a commit changed (`published`: `_to_publish`'s); the
        deployments changed."""
        self._observer.placed(result.first_placed_after_s.values())
        if result.changed_deployments:  # it moved the generation (else the one it returns is another's)
            self._own_commits.add(result.generation)
        if result.requeued:
            self._observer.requeued(len(result.requeued))
        changed, deleted = published
        self._push(set(result.changed_nodes))
        if changed or deleted:
            self._publish_in_order(changed, deleted)
        self._laps.lap("publish")
        log.info(
            "reconciled path=%s generation=%s status=%s solve_ms=%.0f placements=%d unplaced=%s waiting=%d "
            "changed_nodes=%d deleted=%s stale=%s requeued=%s published_after_ms=%.0f ms=%s",
            path, result.generation, plan.status, solve_ms, len(plan.placements),
            {u.deployment: u.replicas for u in plan.unplaced}, waiting, len(result.changed_nodes),
            sorted(result.deleted_deployments), result.stale, sorted(result.requeued), self.published_after_ms,
            self._laps,
        )
        return changed

    async def _full_snapshot(self) -> tuple[Snapshot, dict[str, DeploymentView]]:
        """The snapshot a full solve starts from, and the deployments being deleted (their last
        state, for the DELETED events once the commit removes them): the warm one while it can
        follow what others changed (the back-off's retry, a time-limited retry: it catches up
        first, `WarmCluster.catch_up`), else a fresh read."""
        if self._warm.cache is not None and self._warm.own_generation == self._last_generation:
            async with self._db.unit_of_work() as uow:
                if await repo.read_cluster_generation(uow.session) != self._last_generation \
                        and await self._warm.catch_up(uow.session) is not None:
                    self._last_generation = self._warm.own_generation
        warm = await self._warm.snapshot()
        if warm is not None:
            async with self._db.unit_of_work() as uow:
                return warm, await _deleting_views(uow.session, warm.deleting)
        async with self._db.unit_of_work() as uow:
            snapshot = await planning.load_snapshot(uow.session, surge=self._max_surge)
            return snapshot, await _deleting_views(uow.session, snapshot.deleting)

    async def _solve_and_commit(self) -> ReconcileOutcome:
        self.full_passes += 1
        self._observer.pass_taken("full")
        changed_nodes: set[str] = set()
        changed_deployments: set[str] = set()
        deleted_names: set[str] = set()
        for attempt in range(self._retries + 1):
            snapshot, deleting = await self._full_snapshot()
            self._laps.lap("snapshot")
            beyond = self._quarantined.beyond_limits(snapshot.problem)
            if beyond:  # stored before today's limits: never handed to the solver
                await self._quarantine(beyond)
                continue
            admitted, waiting = self._queue.admit(snapshot.problem)
            problem = planning.with_options(admitted, time_limit_ms=self._time_limit_ms,
                                            allow_preemption=self._allow_preemption)
            avoided = self._avoid  # nodes replicas just failed on: other nodes first, for this pass
            problem = planning.with_cordoned(problem, avoided)
            started = time.perf_counter()
            try:
                plan = SchedulingQueue.with_waiting(await self._solve(problem, time_limit_ms=self._time_limit_ms), waiting)
            except Exception as exc:
                log.error("the solver failed on the whole cluster (%s: %s); isolating the deployment it trips on",
                          type(exc).__name__, exc)
                culprits = await self._quarantined.isolate(snapshot.problem, self._solve, time_limit_ms=self._time_limit_ms)
                if not culprits:
                    raise
                await self._quarantine(culprits)
                continue
            self.solves += 1
            self._laps.lap("solve")
            solve_ms = (time.perf_counter() - started) * 1000
            self._observer.solved(plan.status, solve_ms / 1000)
            scope = await self._warm.scope(snapshot, plan)
            async with self._db.unit_of_work() as uow:
                result = await commit_plan(uow.session, snapshot, plan, scope=scope, actor="controller",
                                           now=self._wall_clock(), laps=self._laps.lap)
                published = _to_publish(result, deleting)
                await self._commit(uow, result.changed_nodes, *published)
            self._laps.lap("commit")
            changed = await self._report(result, plan, published, solve_ms, waiting=len(waiting), path="full")
            changed_nodes |= result.changed_nodes
            changed_deployments |= changed
            deleted_names |= result.deleted_deployments
            if result.stale:  # the cluster changed while solving: what still held is written
                self._observer.plan_conflict()
                log.info("attempt %d: the plan was solved from generation %d, committed on a newer one",
                         attempt + 1, snapshot.generation)
                if avoided or not await self._caught_up(snapshot, plan, result):
                    continue  # solve again from a fresh read
            else:
                self._committed(snapshot, plan, result)
                self._redecide = False
            self._quarantined.good = {d["id"] for d in snapshot.problem.get("deployments", ())}
            self._avoid = frozenset()
            if avoided:  # what found no other node is placed anywhere by the retry: nothing parked
                self._queue.after_retry()
                retry_in_s = self._schedule_retry(plan, requeued=bool(result.requeued or plan.unplaced))
            else:
                self._queue.after_commit(snapshot.problem, plan, time_limited=time_limited(plan))
                retry_in_s = self._schedule_retry(plan, requeued=bool(result.requeued) and not result.stale)
            if not result.stale:
                await self._warm.after_full(snapshot, result)
            return ReconcileOutcome(
                solved=True, generation=result.generation, conflicts=attempt + int(result.stale),
                changed_nodes=frozenset(changed_nodes), changed_deployments=frozenset(changed_deployments),
                deleted=tuple(sorted(deleted_names)), retry_in_s=retry_in_s,
            )
        log.warning("%d stale plans in a row; solving again on the next wake", self._retries + 1)
        self._last_generation = None
        self._warm.drop()
        return ReconcileOutcome(solved=True, conflicts=self._retries + 1, changed_nodes=frozenset(changed_nodes),
                                changed_deployments=frozenset(changed_deployments),
                                deleted=tuple(sorted(deleted_names)))

    async def _caught_up(self, snapshot: Snapshot, plan: Plan, result: CommitResult) -> bool:
        """After a stale commit of a full solve (a join storm moved the generation while it
        solved): the cache is the state its snapshot and its commit left (`after_stale_full`) and
        catches up with the changes in between from the log, as deltas, instead of the pass
        reading and solving the whole cluster again; what the commit turned away, or what those
        changes could help, is decided on the session by the next pass (woken now). False: the
        cache cannot follow (another kind of change in between): solve again from a fresh read."""
        if not await self._warm.after_stale_full(snapshot, plan, result):
            return False
        async with self._db.unit_of_work() as uow:
            helped = await self._warm.catch_up(uow.session)
        self._laps.lap("catch_up")
        if helped is None:
            return False
        cache = self._warm.cache
        assert cache is not None  # caught up
        self._last_generation = self._warm.own_generation
        self._last_arrivals = len(cache.snapshot.deployment_ids)  # departures caught up with are gone
        # Departures and repairs caught up with are committed by the next pass too.
        self._redecide = helped or bool(result.requeued or cache.snapshot.deleting or cache.repairs or cache.releasing)
        if self._redecide:
            self.wake()
        return True

    async def _commit(self, uow: UnitOfWork, nodes: Iterable[str], changed: Iterable[str] = (),
                      deleted: Iterable[DeploymentView] = ()) -> None:
        """Commit a unit of work that changed `nodes`' assignment sets and the deployments
        `changed` (keys) and removed those of `deleted` (their last views). A COMMIT whose outcome
        is unknown (`CommitOutcomeUnknown`: the connection lost with it in flight) may have landed:
        before the error goes on, those nodes' agents are sent their sets as stored (a set that did
        not change is sent again, which an agent takes as it is), and those deployments are
        published as stored once the database answers (`_as_stored`: placed if it landed, as before
        if not). Sets are pushed and deployments published on change, not polled: without this an
        agent would hear of a landed commit only at its node's next change, and a watcher never
        (the next pass finds nothing to change)."""
        try:
            await uow.commit()
        except CommitOutcomeUnknown:
            self._push(set(nodes))
            changed, deleted = set(changed), list(deleted)
            if changed or deleted:
                self._publish_in_order(changed, deleted, unsure=True)
            raise

    async def _quarantine(self, reasons: dict[str, str]) -> None:
        changed: set[str] = set()
        async with self._db.unit_of_work() as uow:
            for name, reason in reasons.items():
                changed |= await repo.quarantine_deployment(uow.session, stored_key(name), reason)
            await self._commit(uow, changed, {stored_key(name) for name in reasons})
        self._quarantined.quarantined(reasons)
        for name, reason in reasons.items():
            log.error("deployment quarantined deployment=%s reason=%s", name, reason)
        self._push(changed)
        self._publish_in_order({stored_key(name) for name in reasons}, [])


"""The full path of a reconcile pass: the whole cluster read (or taken from the warm cache while it
can follow), solved in a worker thread and committed through the plan applier, solved again when
the commit went stale and the cache cannot catch up.

The `Reconciler` takes it when nothing is warm, on a resync or a retry due, and when the fast
path (`fast_path.py`) cannot follow what changed. A deployment beyond today's limits, or one the
solver raises on, is quarantined here and the rest solved again. What it shares with the fast
path (the warm cluster, the queue, the last commit's bookkeeping) is the `PassState`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from controller.store import repositories as repo
from controller.store.nominations import in_force, read_nominations
from controller.store.plans import CommitResult, commit_plan
from controller.store.rollout import stored_key
from controller.store.snapshot import Snapshot
from controller.scheduling.queue import SchedulingQueue
from controller.usecases import planning
from controller.domain.values import DeploymentView
from scheduler import Plan

from controller.reconcile.helpers import _deleting_views, _to_publish, time_limited
from controller.reconcile.pass_state import PassState, PathCollaborators
from controller.reconcile.protocols import ReconcileOutcome

log = logging.getLogger("maia.reconcile")


class FullPath(PathCollaborators):
    """One pass that solves the whole cluster (`solve_and_commit`), and how many were taken."""

    def __init__(
        self, state: PassState, *,
        solve: Callable[..., Awaitable[Plan]], time_limit_ms: int, max_conflict_retries: int,
        allow_preemption: bool, max_surge: int, wake: Callable[[], None],
    ) -> None:
        super().__init__(state)
        self._publisher = state.publisher
        self._solve = solve
        self._time_limit_ms = time_limit_ms
        self._retries = max_conflict_retries
        self._allow_preemption = allow_preemption
        self._max_surge = max_surge
        self._wake = wake  # the reconciler's: a pass soon, for what a stale commit left to decide
        self.passes = 0  # passes that read and solved the whole cluster
        self.solves = 0

    async def _full_snapshot(self) -> tuple[Snapshot, dict[str, DeploymentView]]:
        """The snapshot a full solve starts from, and the deployments being deleted (their last
        state, for the DELETED events once the commit removes them): the warm one while it can
        follow what others changed (the back-off's retry, a time-limited retry: it catches up
        first, `WarmCluster.catch_up`), else a fresh read."""
        if self._warm.cache is not None and self._warm.own_generation == self._state.last_generation:
            async with self._state.db.unit_of_work() as uow:
                if await repo.read_cluster_generation(uow.session) != self._state.last_generation:
                    helped = await self._warm.catch_up(uow.session)
                    if helped is not None:
                        self._state.last_generation = self._warm.own_generation
                    if helped:  # a change that could help unschedulable work (it stayed parked)
                        self._state.queue.helped()
        warm = await self._warm.snapshot()
        if warm is not None:
            async with self._state.db.unit_of_work() as uow:
                return warm, await _deleting_views(uow.session, warm.deleting)
        async with self._state.db.read_unit() as uow:  # every table as of one moment (`Database.read_unit`)
            snapshot = await planning.load_snapshot(uow.session, surge=self._max_surge)
            return snapshot, await _deleting_views(uow.session, snapshot.deleting)

    async def _adopt_nominations(self, snapshot: Snapshot) -> None:
        """Take up the stored nominations this snapshot still has (`store.nominations.in_force`)."""
        async with self._state.db.unit_of_work() as uow:
            stored = await read_nominations(uow.session)
        if stored:
            problem = snapshot.problem
            stored = in_force(stored, snapshot.deployment_ids, {d["id"] for d in problem["deployments"]},
                              {n["id"] for n in problem["nodes"]})
        self._state.nominations.adopt(stored, self._state.clock(), self._wall_clock())

    async def solve_and_commit(self) -> ReconcileOutcome:
        """Solve the whole cluster and commit the plan; a commit gone stale is followed by the
        cache (`_caught_up`) or solved again from a fresh read, `max_conflict_retries` more times
        at most."""
        self.passes += 1
        self._observer.pass_taken("full")
        changed_nodes: set[str] = set()
        changed_deployments: set[str] = set()
        deleted_names: set[str] = set()
        for attempt in range(self._retries + 1):
            snapshot, deleting = await self._full_snapshot()
            self._state.laps.lap("snapshot")
            beyond = self._quarantined.beyond_limits(snapshot.problem)
            if beyond:  # stored before today's limits: never handed to the solver
                await self._quarantine(beyond)
                continue
            # The nominations in force (`scheduling/nominations.py`), ended first when due; the
            # queue sees them too, so work one parked is let go when it ends. A new leadership's
            # first full pass takes up those stored.
            if self._state.nominations.adopting:
                await self._adopt_nominations(snapshot)
            self._state.nominations.expire(self._state.clock(), snapshot)
            nominated = self._state.nominations.into(snapshot.problem)
            self._state.nominations.let_go = False  # this solve decides everything with them let go
            # In a worker thread: comparing the problem with the last one's parts and placements
            # took ~0.2 s of the event loop at 16,384 nodes and 60,000 placements (only this pass
            # touches the queue meanwhile).
            admitted, waiting = await asyncio.to_thread(self._state.queue.admit, nominated)
            problem = planning.with_options(admitted, time_limit_ms=self._time_limit_ms,
                                            allow_preemption=self._allow_preemption)
            avoided = self._checks.avoid  # nodes replicas just failed on: other nodes first, for this pass
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
            self._state.laps.lap("solve")
            solve_ms = (time.perf_counter() - started) * 1000
            self._observer.solved(plan.status, solve_ms / 1000)
            scope = await self._warm.scope(snapshot, plan)
            async with self._state.db.unit_of_work() as uow:
                result = await commit_plan(uow.session, snapshot, plan, scope=scope, actor="controller",
                                           now=self._wall_clock(), laps=self._state.laps.lap)
                published = _to_publish(result, deleting)
                await self._state.commit(uow, result.changed_nodes, *published)
            self._state.laps.lap("commit")
            changed = await self._state.report(result, plan, published, solve_ms, waiting=len(waiting), path="full")
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
                self._state.committed(snapshot, plan, result)
                self._state.redecide = False
            self._quarantined.good = {d["id"] for d in snapshot.problem.get("deployments", ())}
            self._checks.avoid = frozenset()
            if avoided:  # what found no other node is placed anywhere by the retry: nothing parked
                self._state.queue.after_retry()
                self._state.queue.placed(plan)
                retry_in_s = self._retry.schedule(plan, requeued=bool(result.requeued or plan.unplaced))
            else:
                await asyncio.to_thread(self._state.queue.after_commit, nominated, plan,
                                        time_limited=time_limited(plan))
                retry_in_s = self._retry.schedule(plan, requeued=bool(result.requeued) and not result.stale)
            if not result.stale:
                await self._warm.after_full(snapshot, result)
            return ReconcileOutcome(
                solved=True, generation=result.generation, conflicts=attempt + int(result.stale),
                changed_nodes=frozenset(changed_nodes), changed_deployments=frozenset(changed_deployments),
                deleted=tuple(sorted(deleted_names)), retry_in_s=retry_in_s,
            )
        log.warning("%d stale plans in a row; solving again on the next wake", self._retries + 1)
        self._state.last_generation = None
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
        async with self._state.db.unit_of_work() as uow:
            helped = await self._warm.catch_up(uow.session)
        self._state.laps.lap("catch_up")
        if helped is None:
            return False
        cache = self._warm.cache
        assert cache is not None  # caught up
        self._state.last_generation = self._warm.own_generation
        self._state.last_arrivals = len(cache.snapshot.deployment_ids)  # departures caught up with are gone
        # Departures and repairs caught up with are committed by the next pass too.
        self._state.redecide = helped or bool(result.requeued or cache.snapshot.deleting or cache.repairs or cache.releasing)
        if self._state.redecide:
            self._wake()
        return True

    async def _quarantine(self, reasons: dict[str, str]) -> None:
        changed: set[str] = set()
        async with self._state.db.unit_of_work() as uow:
            for name, reason in reasons.items():
                changed |= await repo.quarantine_deployment(uow.session, stored_key(name), reason,
                                                            self._wall_clock())
            await self._state.commit(uow, changed, {stored_key(name) for name in reasons})
        self._quarantined.quarantined(reasons)
        for name, reason in reasons.items():
            log.error("deployment quarantined deployment=%s reason=%s", name, reason)
        self._state.push(changed)
        self._publisher.publish_in_order({stored_key(name) for name in reasons}, [])

"""The fast path of a reconcile pass: arrivals and others' changes decided on the warm session.

The fast path runs for every batch of submits (hundreds a second), so it reads no more than
what changed: others' changes from the change log, applied to the cached snapshot as deltas, and
the new deployment rows; it decides them on the warm `Session` kept with the cache (in a worker
thread, or in the decide process) and commits what it decided in the pass's one scoped
transaction. When the cache cannot follow, or the session fails, it hands the pass to the full
path (`full_path.py`) by returning None. What it shares with the full path (the warm cluster,
the queue, the last commit's bookkeeping) is the `PassState`."""

from __future__ import annotations

import asyncio
import logging
import time

from controller.scheduling.decider import DecideProcess, DeciderFailed
from controller.scheduling.warm import ArrivalDocs
from controller.store.db import UnitOfWork
from controller.store.plans import commit_plan
from controller.usecases.submits import SubmittedRows

from controller.reconcile.helpers import _deleting_views, _on_thread_cpu, _to_publish
from controller.reconcile.pass_state import PassState, PathCollaborators
from controller.reconcile.protocols import ReconcileOutcome

log = logging.getLogger("maia.reconcile")


class FastPath(PathCollaborators):
    """One pass on the warm cluster (`decide_and_commit`), and how many were taken."""

    def __init__(self, state: PassState, *, decider: DecideProcess | None, submitted: SubmittedRows | None) -> None:
        super().__init__(state)
        self._clock = state.clock
        self._decider = decider  # the warm session lives in that process (decider.py), else in this one
        # The deployments this process's submit batches validated and inserted (not judged again).
        self._submitted = submitted
        self.passes = 0        # passes that decided on the warm session
        self.delta_passes = 0  # passes that only applied others' changes to the cache (nothing to decide)

    def _helps(self, helped: bool) -> bool:
        """`helped`; when True, everything unschedulable is active again (`SchedulingQueue.helped`):
        decided by this pass on the session, or by the full solve a pass that ends early hands
        over to (it was let go only once the pass got that far, and parked work stayed parked)."""
        if helped:
            self._state.queue.helped()
        return helped

    async def _bring_nominations(self) -> bool | None:
        """`Nominations.bring` on the warm cluster: whether nodes were let go; None: the warm
        session is lost (the full path runs instead)."""
        try:
            if self._warm.cache is None:
                return False
            return await self._state.nominations.bring(self._warm.cache, self._clock())
        except DeciderFailed:  # the session in the decide process is lost
            log.exception("the warm session is lost; solving the whole cluster")
            self._warm.drop()
            return None

    async def decide_and_commit(self, uow: UnitOfWork, generation: int, arrivals: int) -> ReconcileOutcome | None:
        """Follow others' changes (up to `generation`, read first in `uow`), then decide the
        arrivals (and, after a change that could help them, what is still short of replicas) on
        the warm cluster and commit them, all in the pass's unit of work `uow` (module doc of
        controller/scheduling/cache/); None: the full path must run instead."""
        started = time.perf_counter()
        # What could help unschedulable work lets it go at once (`_helps`): a full pass this
        # one hands over to would otherwise leave it parked.
        helped, self._state.redecide = self._helps(self._state.redecide), False
        # The nominations in force (`scheduling/nominations.py`), before the changes' repairs decide.
        brought = await self._bring_nominations()
        if brought is None:
            return None
        helped |= self._helps(brought)
        if generation != self._warm.own_generation:  # others' changes to follow
            caught_up = await self._warm.catch_up(uow.session, generation=generation)
            self._state.laps.lap("catch_up")
            if caught_up is None:
                return None
            helped |= self._helps(caught_up)
            self._state.last_generation = self._warm.own_generation
            if self._state.nominations.held:  # an update followed may end one (and it is made again at once)
                brought = await self._bring_nominations()
                if brought is None:
                    return None
                helped |= self._helps(brought)
        read = await self._warm.arrivals(uow.session, arrivals) if self._may_have_arrivals(arrivals) else ArrivalDocs([])
        self._state.laps.lap("arrivals")
        cache = self._warm.cache
        if read is None or cache is None or self._quarantined.judge(read.docs + read.late, self._submitted_here(read)):
            self._warm.drop()  # a deployment beyond the limits is quarantined by the full path
            return None
        docs, late = read.docs, read.late
        # Arrivals committed out of order go first, followed as the commit lists them.
        try:
            await self._state.nominations.hand(cache)  # a cache this pass built holds none yet
            # A worker thread only when the session is asked (it blocks on it): not after it answered none.
            unplaced = list(self._warm.unplaced)  # the session may never have decided a full solve's
            retried = (await asyncio.to_thread(cache.pending_docs, unplaced) if cache.may_hold_pending or unplaced
                       else []) + late if helped else late
        except DeciderFailed:  # the session in the decide process is lost
            log.exception("the warm session is lost; solving the whole cluster")
            self._warm.drop()
            return None
        departed = cache.snapshot.deleting
        avoided = self._checks.avoid  # nodes replicas just failed on: other nodes first, for this pass
        if not docs and not retried and not departed and not cache.repairs and not cache.releasing \
                and not cache.settling:
            self._checks.avoid = frozenset()
            # Deployments another controller placed are held now (`ClusterCache.apply_deployments`).
            self._state.last_arrivals = len(cache.snapshot.deployment_ids)
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
        self._state.laps.lap("decide")
        self._state.laps.ms["decide_cpu"] = cpu_s * 1000  # against `decide`: what waiting for the GIL cost
        if self._decider is not None:  # the session's own CPU, in the decide process
            self._state.laps.ms["decide_child_cpu"] = (self._decider.cpu_s - child_cpu_s) * 1000
        self._observer.solved(fast.plan.status, decided_s)
        base = cache.snapshot.generation
        deleting = await _deleting_views(uow.session, departed)
        result = await commit_plan(uow.session, cache.snapshot, fast.plan, scope=fast.scope, actor="controller",
                                   now=self._wall_clock(), laps=self._state.laps.lap, claimants=fast.claimants)
        self._state.laps.lap("commit_plan")
        published = _to_publish(result, deleting)
        await self._state.commit(uow, result.changed_nodes, *published)
        self._state.laps.lap("commit")
        self.passes += 1
        self._observer.pass_taken("fast")
        changed = await self._state.report(result, fast.plan, published, decided_s * 1000, waiting=0, path="fast")
        if result.stale:  # someone changed the cluster meanwhile: what held is written (re-checked)
            self._observer.plan_conflict()
            if result.requeued:  # what did not hold: solve it all
                self._warm.drop()
                return None
        else:  # only this commit moved the generation: no FAILED shard or replacement to look for
            self._checks.only_own_commit(base, result.generation)
        self._state.committed(cache.snapshot, fast.plan, result, fast.scope)
        self._state.queue.placed(fast.plan)
        self._quarantined.good.update(d["id"] for d in docs + late)
        await self._warm.after_fast(cache, fast, result)
        self._state.laps.lap("after")
        if result.stale:  # the next pass reads the change that made it stale from the log
            self._state.last_generation = self._warm.own_generation
        # The full solve tries the arrivals left short (and what was preempted) once more; it may
        # move others. So it does the replicas an eviction left short: the session repairs them
        # without preempting (`Session._repair`), and higher-priority or reserved work must not
        # wait for an unrelated change to claim what lower-priority work holds. What was tried
        # again waits for the next change that could help it.
        arrived = {d["id"] for d in docs + late}
        repaired_short = [u.deployment for u in fast.plan.unplaced if u.deployment in fast.repaired]
        self._state.queue.back_off([name for name in fast.unplaced if name in arrived] + repaired_short
                                   + [p.deployment for p in fast.plan.preempted], self._clock())
        self._checks.avoid = frozenset()
        # What found no other node than the ones it failed on is placed anywhere by the full
        # solve after the back-off, as on the full path.
        short = avoided and any(name in fast.extended for name in fast.unplaced)
        retry_in_s = self._retry.schedule(fast.plan, requeued=True) if result.requeued or short else None
        return ReconcileOutcome(
            solved=True, generation=result.generation, changed_nodes=frozenset(result.changed_nodes),
            changed_deployments=frozenset(changed), deleted=tuple(sorted(result.deleted_deployments)),
            retry_in_s=retry_in_s)

    def _may_have_arrivals(self, schedulable: int) -> bool:
        """Whether rows may have been stored since the cache last read them: the schedulable count
        differs from what the last pass left, or from what the cache holds now that it followed
        others' changes (a deletion among them leaves the count as the last pass left it when a
        submission landed beside it; the cache has taken the deleted one out)."""
        cache = self._warm.cache
        return schedulable != self._state.last_arrivals or \
            (cache is not None and schedulable != len(cache.snapshot.deployment_ids))

    def _submitted_here(self, read: ArrivalDocs) -> set[str]:
        """The arrivals this process's submit batches validated and inserted, read as inserted
        (`SubmittedRows`): the quarantine's judge would check the same fields against the same
        limits again. Each is taken from `SubmittedRows` once, whatever it is found to be."""
        if self._submitted is None:
            return set()
        inserted = self._submitted.take(doc["id"] for doc in read.docs + read.late)
        return {key for key, row in inserted.items() if row == read.as_inserted.get(key)}

"""The reconcile loop: snapshot -> solve -> commit -> assign.

Woken by submissions, deletions and node changes (and on an interval as a safety net), one pass
1. skips everything unless the cluster generation moved since the last solve (an idle cluster
   costs one cheap query per interval, never a solve),
2. loads a snapshot, solves it in a worker thread, and commits the plan in one transaction; if
   the cluster changed meanwhile (`PlanConflict`) it starts over from a fresh snapshot; the
   commit also releases the shards of DELETING deployments and removes their rows,
3. pushes new AssignmentSets to the nodes whose sets changed and publishes deployment events.
A `Lease` decides whether this controller may reconcile at all: the seam for leader election
when several controllers share one database (today `AlwaysLeader`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import planning
from controller.usecases.domain import DeploymentView

log = logging.getLogger("maia.reconcile")


class Lease(Protocol):
    def should_run(self) -> bool: ...


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
    unplaced: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _reason_docs(plan: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for unplaced in plan.unplaced:
        out.setdefault(unplaced.deployment, []).extend(
            {"code": r.code, "message": r.message, "scope": r.scope or ""} for r in unplaced.reasons
        )
    return out


class Reconciler:
    def __init__(
        self, db: Database, *,
        push: Callable[[set[str]], None],
        publish: Callable[[set[str], list[DeploymentView]], Awaitable[None]],
        interval_s: float = 1.0, solve_time_limit_ms: int = 2000,
        lease: Lease | None = None, max_conflict_retries: int = 5, settle_s: float = 0.05,
    ) -> None:
        self._db = db
        self._push = push
        self._publish = publish
        self._interval = interval_s
        self._time_limit_ms = solve_time_limit_ms
        self._lease = lease or AlwaysLeader()
        self._retries = max_conflict_retries
        self._settle = settle_s
        self._wake = asyncio.Event()
        self._last_generation: int | None = None
        self._lock = asyncio.Lock()
        self.passes = 0
        self.solves = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Reconcile until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            else:  # let a burst of changes (many nodes connecting at once) land before snapshotting
                await asyncio.sleep(self._settle)
            self._wake.clear()
            if not self._lease.should_run():
                continue
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed; retrying in %.1fs", self._interval)
                await asyncio.sleep(self._interval)

    async def reconcile_once(self, *, force: bool = False) -> ReconcileOutcome:
        """One pass; solves only if the cluster generation moved since the last solve (or `force`)."""
        async with self._lock:
            self.passes += 1
            async with self._db.unit_of_work() as uow:
                generation = await repo.read_cluster_generation(uow.session)
            if not force and generation == self._last_generation:
                return ReconcileOutcome(generation=generation)
            return await self._solve_and_commit()

    async def _solve_and_commit(self) -> ReconcileOutcome:
        from controller.store.plans import PlanConflict, commit_plan

        for attempt in range(self._retries + 1):
            async with self._db.unit_of_work() as uow:
                snapshot = await planning.load_snapshot(uow.session)
                # Their last state, for the DELETED events once the commit removes them.
                deleting = {r.name: repo.deployment_view(r) for r in await repo.list_deployment_rows(
                    uow.session, phases=[m.DeploymentPhase.DELETING])}
            problem = planning.with_options(snapshot.problem, time_limit_ms=self._time_limit_ms)
            started = time.perf_counter()
            plan = await planning.solve_in_thread(problem, time_limit_ms=self._time_limit_ms)
            self.solves += 1
            solve_ms = (time.perf_counter() - started) * 1000
            try:
                async with self._db.unit_of_work() as uow:
                    result = await commit_plan(uow.session, snapshot, plan, actor="controller")
                    await uow.commit()
            except PlanConflict as exc:
                log.info("attempt %d: %s", attempt + 1, exc)
                continue
            self._last_generation = result.generation
            changed = (result.changed_deployments | result.updated_deployments) - result.deleted_deployments
            log.info(
                "reconciled generation=%s status=%s solve_ms=%.0f placements=%d unplaced=%s "
                "changed_nodes=%d deleted=%s",
                result.generation, plan.status, solve_ms, len(plan.placements),
                {u.deployment: u.replicas for u in plan.unplaced}, len(result.changed_nodes),
                sorted(result.deleted_deployments),
            )
            self._push(set(result.changed_nodes))
            deleted = [deleting[name] for name in sorted(result.deleted_deployments) if name in deleting]
            if changed or deleted:
                await self._publish(changed, deleted)
            return ReconcileOutcome(
                solved=True, generation=result.generation, conflicts=attempt,
                changed_nodes=frozenset(result.changed_nodes), changed_deployments=frozenset(changed),
                deleted=tuple(sorted(result.deleted_deployments)), unplaced=_reason_docs(plan),
            )
        log.warning("gave up after %d plan conflicts; will retry on the next wake", self._retries + 1)
        return ReconcileOutcome(solved=True, conflicts=self._retries + 1)

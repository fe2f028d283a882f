"""Small pure helpers of a reconcile pass: which agents' reports wake it (`waits_on_report`), when a
plan is worth solving again (`time_limited`), where a pass spends its time (`PassLaps`), what a
commit tells watchers (`_to_publish`, `_deleting_views`), and the reconciler's own database handle
for its own thread (`_same_database`). None holds state across passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.plans import CommitResult
from controller.domain.values import DeploymentView, deployment_key, split_deployment_key
from scheduler import Plan


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

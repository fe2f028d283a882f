"""FAILED shards, the reconciler's half (rules: `domain/restarts.py`).

The report path marks a shard FAILED and gives its deployment the agent's message as a
SHARD_FAILED reason. Here, once per failure, the deployment's failures in a row are counted and
its back-off starts (or, past the limit, it is FAILED and left alone); once the back-off is over,
every replica with a FAILED shard is released as a whole gang, so the next solve places it again.
The reconciler hands the nodes they failed on to that solve as nodes to avoid.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.restarts import SHARD_FAILED, RestartPolicy
from controller.domain.values import deployment_key
from controller.store.changes import will_move_generation
from controller.store.inlist import any_of
from controller.store.models import Deployment, DeploymentPhase, Placement, ShardPhase, as_utc
from controller.store.release import record_decisions, stop_placements


FAILED_KIND = "deployment.failed"  # the event of a deployment failed for good (past the restart limit)


@dataclass(frozen=True, slots=True)
class FailureStep:
    """What `handle_failures` did; `next_in_s`: when a back-off still running ends (None: none)."""

    nodes: frozenset[str] = frozenset()        # nodes whose assignment sets changed
    deployments: frozenset[str] = frozenset()  # keys (TENANT/NAME) of deployments changed (to publish)
    avoid: frozenset[str] = frozenset()        # nodes the released replicas failed on
    next_in_s: float | None = None
    lines: tuple[str, ...] = ()                # what it did, a line a deployment (the log's INFO)
    gave_up: tuple[str, ...] = ()              # ... of the deployments it failed for good (WARNING)
    replicas: int = 0                          # replicas released

    @property
    def released(self) -> bool:
        return bool(self.nodes)


async def handle_failures(session: AsyncSession, *, now: datetime, policy: RestartPolicy,
                          actor: str = "controller") -> FailureStep:
    """Count new failures, give up on deployments past the limit, release failed replicas whose
    back-off is over (the caller commits)."""
    failed_rows = await session.execute(
        select(Placement.deployment_id, Placement.replica, Placement.node_id)
        .join(Deployment, Placement.deployment_id == Deployment.id)
        .where(Placement.phase == ShardPhase.FAILED)
        .where(Deployment.phase.not_in([DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED,
                                        DeploymentPhase.FAILED])))
    failed: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for dep_id, replica, node_id in failed_rows:
        failed[dep_id][replica].add(node_id)
    if not failed:
        return FailureStep()
    deps = {d.id: d for d in await session.scalars(select(Deployment).where(any_of(session, Deployment.id, failed)))}
    # What it writes moves the generation (`stop_placements`): the generation writers' lock
    # before the first row (PostgreSQL's lock order: store/changes.py). Only when it writes: a
    # step that writes nothing (back-offs running) is not committed before the pass's plan
    # commit, whose fallback takes the lock exclusive in the same transaction: held shared from
    # here, that was an upgrade, and two at once deadlocked.
    if any(_writes(deps[dep_id], now) for dep_id in failed):
        await will_move_generation(session)
    changed: set[str] = set()
    events: list[dict[str, Any]] = []
    released_ids: list[int] = []
    nodes: set[str] = set()
    released: set[str] = set()  # keys of the deployments whose replicas are released
    avoid: set[str] = set()
    next_in_s: float | None = None
    released_replicas = 0
    for dep_id, replicas in sorted(failed.items()):
        dep = deps[dep_id]
        failed_on = sorted(set().union(*replicas.values()))
        last = next((r for r in dep.reasons or () if r.get("code") == SHARD_FAILED), None)
        said = last["message"] if last else "a shard failed"
        if dep.restart_after is None:  # a failure not counted yet
            dep.failures = policy.failures_after(dep.failures, as_utc(dep.last_failure_at), now)
            dep.last_failure_at = now
            changed.add(deployment_key(dep.tenant_id, dep.name))
            if policy.gives_up(dep.failures):
                dep.phase = DeploymentPhase.FAILED
                message = (f"failed {dep.failures} times in a row (last: {said}); not placed again: "
                           f"update the deployment or delete it")
                dep.reasons = [{"code": SHARD_FAILED, "scope": last.get("scope", "") if last else "",
                                "message": message}] + [r for r in dep.reasons or () if r.get("code") != SHARD_FAILED]
                events.append(_event(FAILED_KIND, dep, message, {"failures": dep.failures, "nodes": failed_on}))
                continue
            delay = policy.delay_s(dep.failures)
            dep.restart_after = now + timedelta(seconds=delay)
            events.append(_event(
                "deployment.replicas_failed", dep,
                f"replicas {sorted(replicas)} failed ({said}; failure {dep.failures} in a row, restart "
                f"{dep.failures} of at most {policy.limit}): placed again in {delay:g} s, preferably on other nodes "
                f"than {', '.join(failed_on)}",
                {"replicas": sorted(replicas), "failures": dep.failures, "delay_s": delay, "nodes": failed_on}))
        due = as_utc(dep.restart_after)
        assert due is not None
        if now < due:
            wait = (due - now).total_seconds()
            next_in_s = wait if next_in_s is None else min(next_in_s, wait)
            continue
        gang = await session.execute(select(Placement.id, Placement.node_id).where(
            Placement.deployment_id == dep.id, any_of(session, Placement.replica, replicas)))
        for pid, node_id in gang:
            released_ids.append(pid)
            nodes.add(node_id)
        avoid.update(failed_on)
        released_replicas += len(replicas)
        dep.restart_after = None
        dep.generation = dep.generation + 1
        changed.add(deployment_key(dep.tenant_id, dep.name))
        released.add(deployment_key(dep.tenant_id, dep.name))
        events.append(_event("deployment.replicas_released", dep,
                             f"replicas {sorted(replicas)} released after their back-off, to be placed again "
                             f"(they failed on {', '.join(failed_on)})",
                             {"replicas": sorted(replicas), "nodes": failed_on}))
    if released_ids:
        await stop_placements(session, released_ids, nodes, now, released)
    if events:
        await record_decisions(session, events, now, actor)
    return FailureStep(nodes=frozenset(nodes), deployments=frozenset(changed), avoid=frozenset(avoid),
                       next_in_s=next_in_s, replicas=released_replicas,
                       lines=tuple(f"{e['object_id']}: {e['message']}" for e in events if e["kind"] != FAILED_KIND),
                       gave_up=tuple(f"{e['object_id']}: {e['message']}" for e in events if e["kind"] == FAILED_KIND))


def _writes(dep: Deployment, now: datetime) -> bool:
    """Whether `handle_failures` writes `dep`'s row: a failure not counted yet, or a back-off over."""
    due = as_utc(dep.restart_after)
    return due is None or now >= due


def _event(kind: str, dep: Deployment, message: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "object_id": deployment_key(dep.tenant_id, dep.name), "tenant": dep.tenant_id,
            "message": message, "data": data}

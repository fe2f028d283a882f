"""Plan → database: apply a solver plan in one transaction, optimistically.

The solver works on a `Snapshot` taken at some cluster generation, without holding any lock
(solving takes seconds). `commit_plan` first checks, with a compare-and-set on
`cluster_state.generation`, that nothing placement-relevant changed since; if something did
it raises `PlanConflict` before writing anything and the caller re-snapshots and solves again
(optimistic concurrency; the plan's placements themselves are not re-checked). Otherwise it
writes the difference between the stored placements and the plan: new shard rows, removed
shard rows, moved shard rows, deployment phases/reasons/generations, node assignment
generations, events, and audit entries for the
decisions that place, preempt, remove or move a tenant's work (in the same transaction: a
decision is audited exactly when it is committed).

Every other writer that changes what the solver reads (a node going down, a cordon, a new or
deleted deployment, a tenant contract) must call `bump_cluster_generation` in its own
transaction, or a plan computed before its change could be committed after it.

The caller owns the transaction: run both inside one unit of work and `commit()` it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import audit
from controller.store.models import (
    ClusterState,
    Deployment,
    DeploymentPhase,
    Event,
    Node,
    Placement,
    ShardPhase,
    utcnow,
)
from controller.store.metering import StartedShard, start_intervals, stop_intervals
from controller.store.snapshot import ShardKey, Snapshot
from controller.domain.phases import deployment_phase, replica_counts

if TYPE_CHECKING:  # the controller may import the solver's types; it never needs them at run time
    from scheduler import Plan

# Keeps `IN (...)` lists well under every backend's bound-parameter limit.
_CHUNK = 500


class PlanConflict(RuntimeError):
    """The cluster changed since the snapshot the plan was computed from: nothing was written."""

    def __init__(self, expected: int, actual: int | None, detail: str = "") -> None:
        self.expected = expected
        self.actual = actual
        reason = detail or f"cluster generation is {actual}, the plan was computed at {expected}"
        super().__init__(f"plan conflicts with the current cluster state ({reason}); re-snapshot and solve again")


@dataclass(frozen=True)
class CommitResult:
    """What a committed plan changed (empty sets: the plan matched the stored state)."""

    # Nodes whose desired shard set changed: send them a new AssignmentSet.
    changed_nodes: set[str]
    # Deployments whose placements changed (or that were deleted): their generation was bumped.
    changed_deployments: set[str]
    # The cluster generation after the commit (unchanged when no placement changed).
    generation: int
    # Deployments whose phase or reasons changed without a placement change.
    updated_deployments: set[str] = field(default_factory=set)
    # Deployments in phase DELETING whose shards were removed and whose row was deleted.
    deleted_deployments: set[str] = field(default_factory=set)
    # Deployments placed for the first time by this commit: seconds since they were created.
    first_placed_after_s: dict[str, float] = field(default_factory=dict)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


async def bump_cluster_generation(session: AsyncSession) -> int:
    """Mark a placement-relevant change (in the caller's transaction); returns the new generation.

    Any in-flight plan computed before this change will then fail to commit with PlanConflict.
    """
    result = await session.execute(
        update(ClusterState)
        .where(ClusterState.id == 1)
        .values(generation=ClusterState.generation + 1)
        .returning(ClusterState.generation)
        .execution_options(synchronize_session=False)
    )
    generation = result.scalar_one_or_none()
    if generation is None:
        raise RuntimeError("cluster_state row id=1 is missing: is the schema migrated?")
    return generation


async def _check_generation(session: AsyncSession, expected: int) -> None:
    # Compare-and-set that changes nothing yet: it takes the row's write lock (PostgreSQL row
    # lock, SQLite write lock) so concurrent commits serialise here, and fails if anyone bumped
    # the generation since the snapshot. The bump itself comes once we know the plan changes
    # placements, so a pass that changes nothing does not wake every watcher of the generation.
    result = await session.execute(
        update(ClusterState)
        .where(ClusterState.id == 1, ClusterState.generation == expected)
        .values(generation=expected)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        actual = (
            await session.execute(select(ClusterState.generation).where(ClusterState.id == 1))
        ).scalar_one_or_none()
        raise PlanConflict(expected, actual)


def _reason_dicts(reasons: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in reasons:
        reason: dict[str, Any] = {"code": r.code, "message": r.message}
        if getattr(r, "scope", None) is not None:
            reason["scope"] = r.scope
        out.append(reason)
    return out


@dataclass
class _Row:
    id: int
    deployment_id: int
    key: ShardKey
    node: str
    indices: list[int]
    milli: int | None
    phase: ShardPhase


async def commit_plan(
    session: AsyncSession, snapshot: Snapshot, plan: Plan, *, actor: str = "controller", now: datetime | None = None,
) -> CommitResult:
    """Apply `plan` (solved from `snapshot`) in the caller's transaction; the caller commits.

    Raises `PlanConflict` when the cluster generation moved since the snapshot, or the plan names
    a deployment or node that no longer exists; nothing is written then (roll back anyway).
    """
    await _check_generation(session, snapshot.generation)
    now = now or utcnow()

    # Current state, one query per table (read under the generation lock).
    deployments = {
        d.name: d
        for d in await session.execute(
            select(Deployment.id, Deployment.name, Deployment.tenant_id, Deployment.phase, Deployment.generation,
                   Deployment.reasons, Deployment.replicas, Deployment.shards_per_replica, Deployment.created_at)
        )
    }
    names_by_id = {d.id: d.name for d in deployments.values()}
    live = {name for name, d in deployments.items()
            if d.phase not in (DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED)}
    current: dict[ShardKey, _Row] = {}
    deleting_rows: list[_Row] = []
    for p in await session.execute(
        select(
            Placement.id, Placement.deployment_id, Placement.replica, Placement.shard, Placement.node_id,
            Placement.accelerator_indices, Placement.accelerator_milli, Placement.phase,
        )
    ):
        name = names_by_id[p.deployment_id]
        row = _Row(p.id, p.deployment_id, (name, p.replica, p.shard), p.node_id,
                   list(p.accelerator_indices), p.accelerator_milli, p.phase)
        if name in live:
            current[row.key] = row
        else:  # its deployment is being deleted or is quarantined: the plan no longer holds it
            deleting_rows.append(row)

    # The plan's whole desired set in stored keys (store/rollout.py), checked against what exists.
    keys = snapshot.plan_keys()
    desired: dict[ShardKey, Any] = {}
    revision_of: dict[ShardKey, int] = {}
    sizes: dict[str, dict[int, int]] = defaultdict(dict)  # shards per replica, where not the deployment's
    for pl in plan.placements:
        mapped = keys.key(pl.deployment, pl.replica, pl.shard)
        if mapped is None:  # an outgoing replica is never placed anew
            continue
        key, revision_of[key] = mapped
        if key in desired:
            raise ValueError(f"plan places shard {key} twice")
        if key[0] not in live:
            raise PlanConflict(snapshot.generation, snapshot.generation,
                               f"deployment {key[0]!r} no longer exists or is being deleted")
        desired[key] = pl
        size = keys.shards_per_replica(pl.deployment)
        if size is not None:
            sizes[key[0]][key[1]] = size
    plan_nodes = {pl.node for pl in desired.values()}
    if plan_nodes:
        known_nodes = set((await session.execute(select(Node.id))).scalars())
        missing = sorted(plan_nodes - known_nodes)
        if missing:
            raise PlanConflict(snapshot.generation, snapshot.generation, f"unknown nodes {missing[:5]}")

    # The diff, per shard.
    inserts: list[ShardKey] = [key for key in desired if key not in current]
    deletes: list[_Row] = [row for key, row in current.items() if key not in desired] + deleting_rows
    updates: list[tuple[_Row, Any]] = []
    for key, row in current.items():
        pl = desired.get(key)
        if pl is not None and (
            pl.node != row.node or list(pl.accelerator_indices) != row.indices or pl.accelerator_milli != row.milli
        ):
            updates.append((row, pl))

    changed_nodes: set[str] = {desired[key].node for key in inserts}
    changed_nodes.update(row.node for row in deletes)
    for row, pl in updates:
        changed_nodes.update((row.node, pl.node))
    changed_deployments: set[str] = {key[0] for key in inserts}
    changed_deployments.update(row.key[0] for row in deletes)
    changed_deployments.update(row.key[0] for row, _ in updates)

    # Deployments: generation, phase (the rule of domain/phases over the plan's shards), reasons.
    new_generation = {
        name: deployments[name].generation + (1 if name in changed_deployments else 0) for name in live
    }
    shard_phases: dict[str, list[tuple[int, ShardPhase]]] = defaultdict(list)
    moved_keys = {row.key for row, _ in updates}
    for key in desired:
        row = current.get(key)
        kept = row is not None and key not in moved_keys  # new and moved shards start over as ASSIGNED
        shard_phases[key[0]].append((key[1], row.phase if kept else ShardPhase.ASSIGNED))
    unplaced = {keys.name(u.deployment): u for u in plan.unplaced
                if keys.name(u.deployment) in live and not keys.is_outgoing(u.deployment)}
    preempted: dict[str, set[int]] = defaultdict(set)
    for victim in plan.preempted:
        replica = keys.replica(victim.deployment, victim.replica)
        if replica is not None:
            preempted[keys.name(victim.deployment)].add(replica)
    deployment_updates: list[dict[str, Any]] = []
    updated_deployments: set[str] = set()
    reasons_changed: set[str] = set()
    first_placed: dict[str, float] = {}
    for name in sorted(live):
        d = deployments[name]
        reasons = _reason_dicts(unplaced[name].reasons) if name in unplaced else []
        if name in preempted:  # told why, and kept while what was preempted waits to be placed again
            reasons = [preempted_reason(sorted(preempted[name]))] + reasons
        elif name in unplaced:
            reasons = [r for r in d.reasons or () if r.get("code") == PREEMPTED][:1] + reasons
        counts = replica_counts(d.shards_per_replica, shard_phases[name], sizes=sizes.get(name))
        phase = DeploymentPhase(deployment_phase(d.replicas, counts))
        if reasons != (d.reasons or []):
            reasons_changed.add(name)
        if d.generation == 0 and d.phase is DeploymentPhase.PENDING and phase is not DeploymentPhase.PENDING:
            first_placed[name] = _seconds_between(d.created_at, now)
        if name in changed_deployments or phase is not d.phase or name in reasons_changed:
            deployment_updates.append(
                {"id": d.id, "phase": phase, "reasons": reasons, "generation": new_generation[name], "updated_at": now}
            )
            if name not in changed_deployments:
                updated_deployments.add(name)

    # Write: placements, deployments, nodes, the cluster generation, events.
    delete_ids = [row.id for row in deletes]
    for chunk in _chunks(delete_ids):
        await session.execute(
            delete(Placement).where(Placement.id.in_(chunk)).execution_options(synchronize_session=False)
        )
    if updates:
        await session.execute(
            update(Placement),
            [
                {
                    "id": row.id,
                    "node_id": pl.node,
                    "accelerator_indices": list(pl.accelerator_indices),
                    "accelerator_milli": pl.accelerator_milli,
                    "phase": ShardPhase.ASSIGNED,
                    "message": "",
                    "generation": new_generation[row.key[0]],
                    "updated_at": now,
                }
                for row, pl in updates
            ],
        )
    started: list[StartedShard] = [
        StartedShard(row.id, row.deployment_id, row.key[1], row.key[2], pl.node, pl.accelerator_milli)
        for row, pl in updates
    ]
    if inserts:
        written = await session.execute(
            insert(Placement).returning(Placement.id, Placement.deployment_id, Placement.replica, Placement.shard,
                                        Placement.node_id, Placement.accelerator_milli),
            [
                {
                    "deployment_id": deployments[key[0]].id,
                    "replica": key[1],
                    "shard": key[2],
                    "node_id": desired[key].node,
                    "accelerator_indices": list(desired[key].accelerator_indices),
                    "accelerator_milli": desired[key].accelerator_milli,
                    "phase": ShardPhase.ASSIGNED,
                    "message": "",
                    "generation": new_generation[key[0]],
                    "revision": revision_of[key],
                    "updated_at": now,
                }
                for key in inserts
            ],
        )
        started += [StartedShard(*row) for row in written]
    # The usage meter follows the placements: moved shards stop on the old node, start on the new.
    await stop_intervals(session, [row.id for row in deletes] + [row.id for row, _ in updates], now)
    await start_intervals(session, started, now)
    if deployment_updates:
        await session.execute(update(Deployment), deployment_updates)
    deleted_deployments = {name for name, d in deployments.items() if d.phase is DeploymentPhase.DELETING}
    for chunk in _chunks(sorted(deployments[name].id for name in deleted_deployments)):
        await session.execute(
            delete(Deployment).where(Deployment.id.in_(chunk)).execution_options(synchronize_session=False)
        )
    for chunk in _chunks(sorted(changed_nodes)):
        await session.execute(
            update(Node)
            .where(Node.id.in_(chunk))
            .values(assignment_generation=Node.assignment_generation + 1)
            .execution_options(synchronize_session=False)
        )
    generation = snapshot.generation
    if changed_deployments or deleted_deployments:
        generation = await bump_cluster_generation(session)

    events = _events(current, desired, deletes, updates, preempted, unplaced, reasons_changed, deleted_deployments)
    if events:
        await session.execute(insert(Event), [{**e, "actor": actor, "at": now} for e in events])
        tenants = {name: d.tenant_id for name, d in deployments.items()}
        await audit.append(session, _decision_records(events, tenants, actor), at=now)

    return CommitResult(
        changed_nodes=changed_nodes,
        changed_deployments=changed_deployments | deleted_deployments,
        generation=generation,
        updated_deployments=updated_deployments,
        deleted_deployments=deleted_deployments,
        first_placed_after_s=first_placed,
    )


PREEMPTED = "PREEMPTED"


def preempted_reason(replicas: list[int]) -> dict[str, Any]:
    """Why a deployment lost replicas to preemption (no other tenant's names: tenants read it)."""
    return {"code": PREEMPTED, "scope": "",
            "message": f"replica(s) {replicas} preempted (stopped) for work of higher priority or a tenant's "
                       f"reservation; re-queued: placed again when capacity frees up"}


# Placement decisions that start, stop or move a tenant's work: audited with the plan commit.
AUDITED_DECISIONS = frozenset({"deployment.placed", "deployment.preempted", "deployment.replicas_removed",
                               "shard.moved"})


def _decision_records(events: list[dict[str, Any]], tenants: dict[str, str], actor: str) -> list[audit.AuditRecord]:
    """The audit entries of one commit's decisions; one request id ties them together."""
    request_id = f"plan-{uuid.uuid4().hex}"
    return [
        audit.AuditRecord(actor=actor, role="controller", tenant=tenants.get(e["object_id"], ""), action=e["kind"],
                          object_kind=e["object_kind"], object_id=e["object_id"], request_id=request_id,
                          detail={"message": e["message"], **e["data"]})
        for e in events if e["kind"] in AUDITED_DECISIONS
    ]


def _seconds_between(earlier: datetime, later: datetime) -> float:
    if earlier.tzinfo is None:  # SQLite hands back naive UTC
        earlier = earlier.replace(tzinfo=timezone.utc)
    return max(0.0, (later - earlier).total_seconds())


def _events(
    current: dict[ShardKey, _Row],
    desired: dict[ShardKey, Any],
    deletes: list[_Row],
    updates: list[tuple[_Row, Any]],
    preempted: dict[str, set[int]],
    unplaced: dict[str, Any],
    reasons_changed: set[str],
    deleted_deployments: set[str],
) -> list[dict[str, Any]]:
    """The history of this commit: placed/removed replicas, moved shards, new 'why not's."""
    before: dict[str, set[int]] = defaultdict(set)
    for name, replica, _ in current:
        before[name].add(replica)
    after: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for (name, replica, _), pl in desired.items():
        after[name][replica].add(pl.node)
    events: list[dict[str, Any]] = []

    def add(kind: str, name: str, message: str, data: dict[str, Any]) -> None:
        events.append({"kind": kind, "object_kind": "deployment", "object_id": name, "message": message, "data": data})

    for name in sorted(set(before) | set(after)):
        placed = sorted(set(after.get(name, {})) - before.get(name, set()))
        if placed:
            nodes = sorted(set().union(*(after[name][r] for r in placed)))
            add("deployment.placed", name, f"placed replicas {placed} on {', '.join(nodes)}",
                {"replicas": placed, "nodes": nodes})
        removed = sorted(before.get(name, set()) - set(after.get(name, {})))
        by_preemption = [r for r in removed if r in preempted.get(name, ())]
        otherwise = [r for r in removed if r not in preempted.get(name, ())]
        if by_preemption:
            add("deployment.preempted", name,
                f"preempted replicas {by_preemption}: stopped for work of higher priority or a tenant's "
                f"reservation; re-queued", {"replicas": by_preemption})
        if otherwise:
            add("deployment.replicas_removed", name,
                f"replicas {otherwise} are no longer placed (node down, scaled down or not placeable again)",
                {"replicas": otherwise})
    for row, pl in updates:
        name, replica, shard = row.key
        if pl.node != row.node:
            add("shard.moved", name, f"moved replica {replica} shard {shard} from {row.node} to {pl.node}",
                {"replica": replica, "shard": shard, "from": row.node, "to": pl.node})
    for name in sorted(reasons_changed & set(unplaced)):
        u = unplaced[name]
        reasons = _reason_dicts(u.reasons)
        add("deployment.unplaceable", name,
            f"{u.replicas} replica(s) not placed: " + "; ".join(r["message"] for r in reasons),
            {"replicas": u.replicas, "reasons": reasons})
    for name in sorted(deleted_deployments):
        shards = sum(1 for row in deletes if row.key[0] == name)
        add("deployment.deleted", name, f"deleted; {shards} shard(s) released", {"shards": shards})
    return events

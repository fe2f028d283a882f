"""A checked plan landed (`_land`), and what a commit tells its caller (`CommitResult`).

`_land` turns a check's changes (plans/check.py) into what the commit writes: each deployment's
phase, reasons and generation (the rule of domain/phases over its shards as written), the writes
(plans/writes.py), the cluster generation and its change log entry, and the events and audit
entries (plans/events.py). It serves both orders in which a commit takes the generation's lock
(plans/commit.py): holding it, it moves the generation and logs the change itself; taking it last,
it leaves both to the statement that takes the lock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import audit
from controller.store.unnest import InsertRows
from controller.store.changes import move_generation, log_change
from controller.store.models import DeploymentPhase, ShardPhase, as_utc
from controller.store.recheck import ReplicaKey
from controller.store.rollout import shards_of
from controller.store.snapshot import ShardKey, Snapshot, Where
from controller.domain.changes import ClusterChange
from controller.domain.phases import deployment_phase, replica_counts
from controller.domain.restarts import failure_reasons
from controller.store.plans.check import _Checked
from controller.store.plans.committed import _PlacedRows, _where
from controller.store.plans.events import (PREEMPTED, _decision_records, _event_rows, _events, _reason_dicts,
                                           preempted_before, preempted_reason)
from controller.store.plans.writes import _as_written, _write

if TYPE_CHECKING:  # the controller may import the solver's types; it never needs them at run time
    from scheduler import Plan


# A commit names at most this many deployments in the change log (`domain.changes`), else none.
LOGGED_DEPLOYMENTS_MAX = 1_000


@dataclass(frozen=True)
class CommitResult:
    """What a committed plan changed (empty sets: the plan matched the stored state).

    Deployments are named by their keys, `TENANT/NAME` (`domain.deployment_key`)."""

    # Nodes whose desired shard set changed: send them a new AssignmentSet.
    changed_nodes: set[str]
    # Deployments whose placements changed (or that were deleted; each is named in the change log):
    # the live ones' generation was bumped. Empty exactly when the cluster generation did not move.
    changed_deployments: set[str]
    # The cluster generation after the commit (unchanged when no placement changed).
    generation: int
    # Deployments whose phase or reasons changed without a placement change.
    updated_deployments: set[str] = field(default_factory=set)
    # Deployments in phase DELETING whose shards were removed and whose row was deleted.
    deleted_deployments: set[str] = field(default_factory=set)
    # Deployments placed for the first time by this commit: seconds since they were created.
    first_placed_after_s: dict[str, float] = field(default_factory=dict)
    # The plan was solved from an older generation than the one it committed on: solve again.
    stale: bool = False
    # Replicas (stored deployment, replica) the plan placed or moved that no longer fit the
    # committed state, with why: not written, left for the next pass.
    requeued: dict[ReplicaKey, tuple[str, ...]] = field(default_factory=dict)
    # Every shard the commit wrote, by stored key (TENANT/NAME, replica, shard): where it is now
    # (node, accelerator indices, milli per accelerator or None for whole ones), None when
    # removed (preempted, scaled down, released, its deployment deleted). With `requeued`, what a
    # cache of the committed state needs to follow the commit without reading it again.
    shards: dict[ShardKey, Where | None] = field(default_factory=dict)


@dataclass(frozen=True)
class _Landed:
    """A plan's changes as written (`_land`): the result, the audit entries still to append with
    its events (`audit.append(along=)`: on PostgreSQL in one statement), what it changed for the
    change log (logged already by a commit that holds the lock), and for one that takes the lock
    last the rows its read should find after its writes (`_rows`)."""

    result: CommitResult
    audited: list[audit.AuditRecord]
    events: InsertRows
    change: ClusterChange | None  # what moves the generation (placements), logged; None: nothing
    rows: tuple[dict[str, Any], _PlacedRows]
    # The deployments whose rows it wrote (by id), each with the shards (replica, shard, phase) its
    # phase was judged by: their placements as the commit leaves them (`_ReportsSettled`).
    judged_by: dict[int, frozenset[tuple[int, int, ShardPhase]]] = field(default_factory=dict)
    shards_written: frozenset[int] = frozenset()  # the placements (ids) it deleted or moved


async def _land(session: AsyncSession, snapshot: Snapshot, plan: Plan, checked: _Checked, *, stale: bool,
                generation: int | None, bumped: bool, actor: str, now: datetime) -> _Landed:
    """Write `plan`'s changes as `checked` found them (placements, meters, deployments, nodes;
    the events are the caller's to write, with the audit entries); `generation`: the cluster
    generation after the commit, its row locked and moved by `bumped` already (a wrong guess put
    right here), and the change logged at it; None: the caller moves it last, by one when the
    commit changes placements, and logs the change (`_commit_locking_last`)."""
    committed, released, changes = checked.committed, checked.released, checked.changes
    deployments, live, current = committed.deployments, committed.live, committed.current
    inserts, updates = changes.inserts, changes.updates
    deletes = changes.deletes + committed.leaving + released
    deleted_keys = {row.key for row in deletes}
    final: dict[ShardKey, str] = {k: row.node for k, row in current.items() if k not in deleted_keys}
    final.update((row.key, pl.node) for row, pl in updates)
    final.update((key, pl.node) for key, pl in inserts.items())

    changed_nodes: set[str] = {pl.node for pl in inserts.values()}
    changed_nodes.update(row.node for row in deletes)
    for row, pl in updates:
        changed_nodes.update((row.node, pl.node))
    changed_deployments: set[str] = {key[0] for key in inserts}
    changed_deployments.update(row.key[0] for row in deletes if row.key[0] in live)
    changed_deployments.update(row.key[0] for row, _ in updates)

    # Deployments the plan knows (in its snapshot): generation, phase (the rule of domain/phases
    # over the shards written), reasons. One submitted after the snapshot is left to the next pass.
    keys = snapshot.plan_keys()
    planned = {name for name in live if name in snapshot.deployment_ids}  # a cost of the scope, not of the cluster
    new_generation = {
        name: deployments[name].generation + (1 if name in changed_deployments else 0) for name in live
    }
    shard_phases: dict[str, list[tuple[int, ShardPhase]]] = defaultdict(list)
    judged_by: dict[str, set[tuple[int, int, ShardPhase]]] = defaultdict(set)
    sizes: dict[str, dict[int, int]] = defaultdict(dict)  # shards per replica, where not the deployment's
    restarted = set(inserts) | {row.key for row, _ in updates}  # new and moved shards start over as ASSIGNED
    for key in final:
        row = current.get(key)
        shard_phase = ShardPhase.ASSIGNED if key in restarted or row is None else row.phase
        shard_phases[key[0]].append((key[1], shard_phase))
        judged_by[key[0]].add((key[1], key[2], shard_phase))
        d = deployments[key[0]]
        revision = changes.revision_of[key] if row is None else row.revision
        if revision != d.template_revision:
            sizes[key[0]][key[1]] = shards_of(d, revision)
    unplaced = {keys.name(u.deployment): u for u in plan.unplaced
                if keys.name(u.deployment) in planned and not keys.is_outgoing(u.deployment)}
    # Victims kept (their claimant turned away: `_Changes.spared`) run: not short any more.
    kept: dict[str, int] = defaultdict(int)
    for name, _ in changes.spared:
        kept[name] += 1
    for name, count in kept.items():
        u = unplaced.get(name)
        if u is not None:
            if u.replicas <= count:
                del unplaced[name]
            else:
                unplaced[name] = replace(u, replicas=u.replicas - count)
    preempted: dict[str, set[int]] = defaultdict(set)
    for victim in plan.preempted:
        replica = keys.replica(victim.deployment, victim.replica)
        if replica is not None and (keys.name(victim.deployment), replica) not in changes.spared:
            preempted[keys.name(victim.deployment)].add(replica)
    deployment_updates: list[dict[str, Any]] = []
    updated_deployments: set[str] = set()
    reasons_changed: set[str] = set()
    # ... of those, the ones whose rules changed: an event says so (not each new count of nodes in
    # the words: a node going suspect and back rewrote every waiting deployment's event).
    reasons_told: set[str] = set()
    first_placed: dict[str, float] = {}
    for name in sorted(planned | changed_deployments):
        d = deployments[name]
        reasons = _reason_dicts(unplaced[name].reasons) if name in unplaced else []
        if name not in planned:
            reasons = d.reasons or []
        elif name in preempted or name in unplaced:  # told why, kept while what was preempted waits
            placed_now = {replica for replica, _ in shard_phases[name]}
            before = [r for r in d.reasons or () if r.get("code") == PREEMPTED][:1]
            waiting = preempted_before(before) - placed_now  # an earlier preemption's, still waiting
            if name in preempted or waiting:
                reasons = [preempted_reason(sorted(preempted.get(name, set()) | waiting))] + reasons
            elif before and "replicas" not in before[0]:  # stored before the replicas were kept with it
                reasons = before + reasons
        failure = failure_reasons(d.reasons or ())  # kept until it runs again (domain/restarts.py)
        counts = replica_counts(d.shards_per_replica, shard_phases[name], sizes=sizes.get(name))
        phase = DeploymentPhase(deployment_phase(d.replicas, counts, failed=d.phase is DeploymentPhase.FAILED,
                                                 failing=bool(failure), min_replicas=d.min_replicas))
        if name in planned and phase is not DeploymentPhase.RUNNING:
            reasons = failure + reasons
        if reasons != (d.reasons or []):
            reasons_changed.add(name)
            if _codes(reasons) != _codes(d.reasons or []):
                reasons_told.add(name)
        if d.generation == 0 and d.phase is DeploymentPhase.PENDING and phase is not DeploymentPhase.PENDING:
            first_placed[name] = _seconds_between(d.created_at, now)
        if name in changed_deployments or phase is not d.phase or name in reasons_changed:
            deployment_updates.append(
                {"b_id": d.id, "phase": phase, "reasons": reasons, "generation": new_generation[name],
                 "updated_at": now}
            )
            if name not in changed_deployments:
                updated_deployments.add(name)

    deleted_deployments = {name for name, d in deployments.items()
                           if d.phase is DeploymentPhase.DELETING and name in snapshot.deleting}
    written = await _write(session, changes=changes, deletes=deletes, deployments=deployments,
                           new_generation=new_generation, deployment_updates=deployment_updates,
                           changed_nodes=changed_nodes, changed_deployments=changed_deployments,
                           deleted_deployments=deleted_deployments, now=now)
    # What it touched, as written: every deployment whose placement rows it deleted, moved or
    # inserted (those of deployments being deleted or quarantined among them, which no plan holds:
    # `_Committed.leaving`), or whose row it deleted. The generation moves when it touched one, and
    # the change log names them: another controller's cache (HA) and the isolation watchdog's view
    # read those deployments again (`warm.catch_up`, `watchdog`; this controller's cache knows
    # them). One touching very many names none: they read the whole cluster, which then costs little more.
    touched = written | deleted_deployments
    moved = bool(touched)
    change = ClusterChange.placements(touched if len(touched) <= LOGGED_DEPLOYMENTS_MAX else ()) if moved else None
    if generation is not None:
        generation = await _move_to(session, generation, bumped, moved)
        if change is not None:
            await log_change(session, generation, change)
    # With the replicas the view released whole (a scale-down's, a drain's whose replacement ran):
    # removed, and said so (the history only said "replicas: 3 -> 2", never which, nor where).
    events = _events(current, final, deletes, updates, preempted, unplaced, reasons_told, deleted_deployments,
                     changes.requeued, released)
    tenants = {name: d.tenant_id for name, d in deployments.items()}
    result = CommitResult(
        changed_nodes=changed_nodes,
        changed_deployments=touched,
        generation=checked.read.generation + int(moved) if generation is None else generation,
        updated_deployments=updated_deployments,
        deleted_deployments=deleted_deployments,
        first_placed_after_s=first_placed,
        stale=stale,
        requeued=dict(changes.requeued),
        shards={**{row.key: None for row in deletes}, **{row.key: _where(pl) for row, pl in updates},
                **{key: _where(pl) for key, pl in inserts.items()}},
    )
    written = {update_["b_id"] for update_ in deployment_updates}
    return _Landed(result, _decision_records(events, tenants, actor),
                   _event_rows(events, actor, now), change,
                   _as_written(checked.read, deletes, updates, inserts, changes.revision_of, deployment_updates,
                               deleted_deployments) if generation is None else ({}, {}),
                   {d.id: frozenset(judged_by[name]) for name, d in deployments.items() if d.id in written},
                   frozenset(row.id for row in deletes) | frozenset(row.id for row, _ in updates))


async def _move_to(session: AsyncSession, generation: int, bumped: bool, moved: bool) -> int:
    """The generation after a commit that moved it by `bumped` when it took the lock and changes
    placements or not (`moved`): a wrong guess put right (nobody sees the row before the commit)."""
    return generation if moved == bumped else await move_generation(session, -1 if bumped else 1)


def _codes(reasons: list[dict[str, Any]]) -> list[Any]:
    """What a deployment's reasons say, less their words and numbers: the rules, in order."""
    return [r.get("code") for r in reasons]


def _seconds_between(earlier: datetime, later: datetime) -> float:
    return max(0.0, (later - as_utc(earlier)).total_seconds())

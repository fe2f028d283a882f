"""Placements (shards on nodes): reported shard states, releases when a node goes or shrinks,
quarantine, and the assignment sets pushed to each node's agent."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, bindparam, case, cast, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import audit
from controller.store import models as m
from controller.store.metering import shard_milli, stop_intervals, stop_intervals_on_node
from controller.store.inlist import (POSTGRESQL, any_of, any_of_in_order, any_of_named, dialect_of, in_order,
                                     locked_in_order)
from controller.store.marks import rowcount_unread
from controller.store.unnest import update_rows
from controller.store.changes import bump_cluster_generation, will_move_generation
from controller.domain.changes import ClusterChange
from controller.domain import values as d
from scheduler.interchange import shard_spec_from_dict
from controller.store.repositories.events import record_event
from controller.store.repositories.nodes import _NODES
from controller.store.repositories.deployments import (DeploymentRow, PlacementColumns, _DEPLOYMENTS, _PLACEMENTS,
                                                       _named_as_any, deployment_view, get_deployment)


async def placements_of_deployments(session: AsyncSession, keys: Iterable[str]) -> list[tuple[m.Placement, str]]:
    """Every placement of the deployments with these keys (`TENANT/NAME`), with its deployment's key."""
    wanted = set(keys)
    rows = await session.execute(
        select(m.Placement, m.Deployment.tenant_id, m.Deployment.name).join(m.Deployment)
        .where(_named_as_any(session, wanted))
    )
    return [(placement, key) for placement, tenant, name in rows
            if (key := d.deployment_key(tenant, name)) in wanted]


@dataclass(frozen=True, slots=True)
class ShardState:
    """One placement as an agent's report is judged against (plain columns, no row loaded), or as a
    report says it is now (`write_reported_shards`)."""

    key: str  # its deployment's, TENANT/NAME
    replica: int
    shard: int
    node_id: str
    generation: int
    phase: m.ShardPhase
    message: str
    placement_id: int  # the row's id
    deployment_id: int = 0  # its deployment's row id (what an agent says as the deployment's uid)


# A placement's `ShardState` columns, its deployment's tenant and name first (`_shard_states`).
_SHARD_STATES = (select(m.Deployment.tenant_id, m.Deployment.name, m.Placement.replica, m.Placement.shard,
                        m.Placement.node_id, m.Placement.generation, m.Placement.phase, m.Placement.message,
                        m.Placement.id, m.Placement.deployment_id)
                 .select_from(m.Placement).join(m.Deployment))


def _shard_states(rows: Iterable[Any]) -> Iterator[ShardState]:
    for tenant, name, replica, shard, node_id, generation, phase, message, placement_id, deployment_id in rows:
        yield ShardState(d.deployment_key(tenant, name), replica, shard, node_id, generation or 0, phase,
                         message or "", placement_id, deployment_id)


async def shard_states(session: AsyncSession, keys: Iterable[str]) -> list[ShardState]:
    """Every placement of the deployments with these keys (`TENANT/NAME`), as `ShardState`s: one
    statement of plain columns, for the agents' report flush to find which reports change anything
    before it loads those deployments whole."""
    wanted = set(keys)
    rows = await session.execute(_SHARD_STATES.where(_named_as_any(session, wanted)))
    return [state for state in _shard_states(rows) if state.key in wanted]


async def shard_states_on_nodes(session: AsyncSession, node_ids: Iterable[str],
                                phases: Iterable[m.ShardPhase]) -> list[ShardState]:
    """The placements on these nodes in any of `phases`, as `ShardState`s (one statement of plain
    columns), locked to the end of the transaction in ascending id (PostgreSQL: the lock order,
    store/changes.py; a report flush's write landing meanwhile is waited for and read): what the
    node lifecycle marks UNKNOWN when their node goes down, and writes back if it does not."""
    ids = set(node_ids)
    if not ids:
        return []
    rows = await session.execute(
        _SHARD_STATES.where(any_of(session, m.Placement.node_id, ids), m.Placement.phase.in_(list(phases)))
        .order_by(m.Placement.id).with_for_update(of=m.Placement, key_share=True))
    return list(_shard_states(rows))


# The agents' report flush, without the ORM: the placements reports changed and the deployments
# whose phase or reasons followed, each kind in one executemany by id.
_REPORTED_SHARD = rowcount_unread(
    update(_PLACEMENTS)
    .where(_PLACEMENTS.c.id == bindparam("placement"), _PLACEMENTS.c.node_id == bindparam("at_node"),
           _PLACEMENTS.c.generation <= bindparam("report_generation"))
    .values(phase=bindparam("new_phase"), message=bindparam("new_message"), updated_at=bindparam("at")))


_REPORTED_DEPLOYMENT = rowcount_unread(
    update(_DEPLOYMENTS)
    .where(_DEPLOYMENTS.c.id == bindparam("deployment"), _DEPLOYMENTS.c.phase == bindparam("was_phase"))
    .values(phase=bindparam("new_phase"), reasons=bindparam("new_reasons"), updated_at=bindparam("at")))


async def write_reported_shards(session: AsyncSession, shards: Sequence[ShardState], at: datetime) -> None:
    """These placements (by id) as reports say they are now: their phase and message, updated
    `at`, in one executemany in ascending id (as a plan commit locks them: the lock order,
    store/changes.py); each only while it is still on the node that reported it (`node_id`) and of
    the generation the report answers (`generation`) or an older one (the report's test,
    `agents._changes`, as of the write): a placement a plan commit moved since the report was
    judged keeps what that commit wrote, and one it removed (or placed again: a row of its own)
    is not written."""
    if shards:
        await session.execute(_REPORTED_SHARD, [
            {"placement": r.placement_id, "at_node": r.node_id, "report_generation": r.generation,
             "new_phase": r.phase, "new_message": r.message, "at": at}
            for r in sorted(shards, key=lambda r: r.placement_id)])


async def write_deployment_phases(
        session: AsyncSession,
        deployments: Sequence[tuple[int, m.DeploymentPhase, m.DeploymentPhase, list[dict[str, Any]]]],
        at: datetime) -> None:
    """The phase and reasons of these deployments (id, the phase they were read in, the new phase,
    the new reasons), updated `at`, in one executemany (PostgreSQL: one statement over arrays,
    `unnest.update_rows`; the flush locked these rows as it read them, in the lock order); each
    only while still in the phase it was read in: a deletion or a quarantine committed since the
    read is not undone."""
    await update_rows(session, _DEPLOYMENTS, _REPORTED_DEPLOYMENT, [
        {"deployment": dep_id, "was_phase": was, "new_phase": phase, "new_reasons": reasons, "at": at}
        for dep_id, was, phase, reasons in deployments],
        key=("id", "deployment"), values={"phase": "new_phase", "reasons": "new_reasons", "updated_at": "at"},
        match={"phase": "was_phase"})


def view_as_written(row: DeploymentRow, placements: Sequence[PlacementColumns], **written: object) -> d.DeploymentView:
    """The view of a deployment read without the ORM (`deployments_named`) with its `placements`
    and the columns `written` (by attribute name) as they are now."""
    return deployment_view(row._replace(**written) if written else row, placements)


async def bump_node_assignment_generations(session: AsyncSession, node_ids: Iterable[str]) -> None:
    ids = set(node_ids)
    if ids:
        await session.execute(  # in ascending id, as a plan commit and a report flush lock nodes
            update(m.Node).where(any_of_in_order(session, m.Node.id, ids, deletes=False))
            .values(assignment_generation=m.Node.assignment_generation + 1)
        )


async def remove_placements_on_node(session: AsyncSession, node_id: str, *, now: datetime | None = None) -> set[str]:
    """Delete every placement on a node (drain), stopping their usage meters; returns {node_id}
    if its set changed."""
    deployment_ids = set(await session.scalars(
        select(m.Placement.deployment_id).where(m.Placement.node_id == node_id)
    ))
    if not deployment_ids:
        return set()
    # each table's rows in ascending id (the lock order: store/changes.py)
    await session.execute(delete(m.Placement).where(
        in_order(dialect_of(session), m.Placement.node_id == node_id, m.Placement.id, deletes=True)))
    await stop_intervals_on_node(session, node_id, now or m.utcnow())
    await _after_placements_removed(session, deployment_ids, [node_id])
    return {node_id}


async def _after_placements_removed(session: AsyncSession, deployment_ids: Iterable[int], node_ids: Iterable[str]) -> None:
    """The generations of the deployments and the assignment generations of the nodes whose
    placements were deleted, after those (each table's rows in ascending id: the lock order)."""
    await session.execute(
        update(m.Deployment).where(any_of_in_order(session, m.Deployment.id, set(deployment_ids), deletes=False))
        .values(generation=m.Deployment.generation + 1)
    )
    await bump_node_assignment_generations(session, node_ids)


async def _lock_placements(session: AsyncSession, where: ColumnElement[bool]) -> None:
    """PostgreSQL: the placements `where` matches locked in ascending id (`FOR UPDATE`), before the
    ORM deletes them: its flush writes a deployment's row before it deletes the deployment's
    placements (a parent's UPDATE before its children's DELETEs), the other order than a plan
    commit's and a report flush's (the lock order: store/changes.py)."""
    if dialect_of(session) == POSTGRESQL:
        await session.execute(locked_in_order(where, m.Placement.id, deletes=True))


async def placed_host_use(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
    """The CPUs (milli) and memory (MiB) the shards placed on these nodes ask, by node (one with
    none left out), summed by the database from their deployments' current shard specs."""
    ids = sorted(set(node_ids))
    if not ids:
        return {}
    rows = await session.execute(
        select(m.Placement.node_id, func.sum(m.Deployment.shard_cpu_milli), func.sum(m.Deployment.shard_memory_mib))
        .join(m.Deployment).where(any_of(session, m.Placement.node_id, ids)).group_by(m.Placement.node_id))
    return {node_id: (int(cpu or 0), int(memory or 0)) for node_id, cpu, memory in rows}


async def release_placements_beyond(session: AsyncSession,
                                    accelerators: Mapping[str, int | None]) -> dict[str, list[list[object]]]:
    """Delete the placements of nodes that registered with fewer accelerators (`accelerators`: how
    many each has now) on the indices they no longer have, or (None) every one of the node's
    (`release_placements_off`)."""
    return await release_placements_off(
        session, {node_id: None if n is None else range(n) for node_id, n in accelerators.items()})


async def release_placements_off(session: AsyncSession,
                                 usable: Mapping[str, Container[int] | None]) -> dict[str, list[list[object]]]:
    """Delete the placements of these nodes that use an accelerator index not in the node's
    `usable` ones (it has fewer now, or some failed), or every placement of a node whose `usable`
    is None (another machine as far as its shards go: those that use no accelerator go too),
    stopping their usage meters; returns them by node as [TENANT/NAME, replica, shard] (a node
    that lost none left out).

    In a report flush's table order (PostgreSQL's lock order: store/changes.py): every placement
    of those nodes locked first, in ascending id, then read (one a plan commit moved or removed
    while this waited for it is seen as that commit left it, not released from where it was); the
    released ones deleted (the isolation trigger), then their deployments', then their nodes' rows.
    Node by node, a node's row came before the next node's placements: a flush holding one of
    those and waiting for that node's heartbeat row waited for this, and this for it."""
    nodes = sorted(usable)
    if not nodes:
        return {}
    on_nodes = any_of(session, m.Placement.node_id, nodes)
    await _lock_placements(session, on_nodes)
    rows = await session.execute(
        select(m.Placement.id, m.Placement.node_id, m.Placement.deployment_id, m.Placement.replica, m.Placement.shard,
               m.Placement.accelerator_indices, m.Deployment.tenant_id, m.Deployment.name)
        .join(m.Deployment).where(on_nodes)
        .order_by(m.Placement.node_id, m.Deployment.name, m.Placement.replica, m.Placement.shard))
    gone = [row for row in rows if (kept := usable[row.node_id]) is None
            or any(i not in kept for i in row.accelerator_indices or ())]
    if not gone:
        return {}
    ids = sorted(row.id for row in gone)  # locked above, in this order
    await session.execute(delete(m.Placement).where(any_of(session, m.Placement.id, ids)))
    await stop_intervals(session, ids, m.utcnow())
    await _after_placements_removed(session, {row.deployment_id for row in gone}, {row.node_id for row in gone})
    released: dict[str, list[list[object]]] = defaultdict(list)
    for row in gone:
        released[row.node_id].append([d.deployment_key(row.tenant_id, row.name), row.replica, row.shard])
    return dict(released)


ASSIGNMENT_READ_CHUNK = 500  # nodes per query of `assignment_sets` (bound on the IN list)


ASSIGNED_SPECS_KEPT = 4096  # distinct (shard spec, shards per replica) pairs `_assigned_spec` keeps


@lru_cache(maxsize=ASSIGNED_SPECS_KEPT, typed=True)
def _assigned_spec(revision: int, older_specs: str | None, accelerators: int, accelerator_milli: int, hbm_gib: float,
                   cpu_milli: int, memory_mib: int, power_w: float, models: str,
                   shards_per_replica: int) -> tuple[d.ShardSpec, int]:
    """(shard spec, shards per replica) of a placement of `revision`: of the deployment's current
    columns (`models`: its accelerator models' JSON text), or of `older_specs` (the JSON text of
    its `revision_specs`, given only when `revision` is not the current one) where it holds that
    revision. Keyed by everything it is built of, not by deployment id and revision: a revision's
    spec is written once, but an id is not (one process may open many databases; SQLite gave a
    deleted last row's id to the next deployment until migration 0024), so a cached value is
    never stale."""
    doc = (json.loads(older_specs) or {}).get(str(revision)) if older_specs is not None else None
    if doc is not None:
        return shard_spec_from_dict(doc["shard"]), doc.get("shards_per_replica", shards_per_replica)
    listed = json.loads(models)
    return d.ShardSpec(accelerators=accelerators, accelerator_milli=accelerator_milli, hbm_gib=hbm_gib,
                       cpu_milli=cpu_milli, memory_mib=memory_mib, power_w=power_w,
                       accelerator_models=tuple(listed or ()) or None), shards_per_replica


@lru_cache(maxsize=ASSIGNED_SPECS_KEPT)
def _indices(text: str) -> tuple[int, ...]:
    """A placement's accelerator indices from their JSON text (a few distinct lists repeat)."""
    return tuple(json.loads(text) or ())


def _assignment_queries(dialect: str) -> tuple[Select, Select]:
    """`assignment_sets`' two queries for `dialect`, their node list named `nodes`: the nodes'
    assignment generations; their placements as plain columns of the tables (no ORM entity, no
    ORM result processing) in a set's order, the JSON columns as text (decoded once per distinct
    value: `_assigned_spec`, `_indices`), a deployment's `revision_specs` only on placements of an
    older revision."""
    p, dep, node = _PLACEMENTS.c, _DEPLOYMENTS.c, _NODES.c
    generations = select(node.id, node.assignment_generation).where(any_of_named(dialect, node.id, "nodes"))
    placements = (
        select(p.node_id, dep.name, dep.tenant_id, p.deployment_id, p.replica, p.shard,
               cast(p.accelerator_indices, Text), p.accelerator_milli, p.generation, dep.generation, p.revision,
               case((p.revision != dep.template_revision, cast(dep.revision_specs, Text)), else_=None),
               dep.shard_accelerators, dep.shard_accelerator_milli, dep.shard_hbm_gib, dep.shard_cpu_milli,
               dep.shard_memory_mib, dep.shard_power_w, cast(dep.shard_accelerator_models, Text),
               dep.shards_per_replica)
        .select_from(_PLACEMENTS.join(_DEPLOYMENTS, p.deployment_id == dep.id))
        .where(any_of_named(dialect, p.node_id, "nodes"))
        .order_by(p.node_id, dep.name, dep.tenant_id, p.replica, p.shard))
    return generations, placements


_ASSIGNMENT_QUERIES = {dialect: _assignment_queries(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def assignment_sets(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, d.AssignmentSet]:
    """The complete AssignmentSet of each of these nodes that exists, in two queries per
    `ASSIGNMENT_READ_CHUNK` nodes (their assignment generations; their placements with their
    deployments' columns). A node's assignments are in (deployment name, tenant, replica, shard)
    order; the shard specs are built once per distinct spec in the process (`_assigned_spec`)."""
    ids = sorted(set(node_ids))
    sets: dict[str, d.AssignmentSet] = {}
    generations_query, placements_query = _ASSIGNMENT_QUERIES[dialect_of(session)]
    for start in range(0, len(ids), ASSIGNMENT_READ_CHUNK):
        chunk = {"nodes": ids[start:start + ASSIGNMENT_READ_CHUNK]}
        generations = {node_id: generation for node_id, generation in await session.execute(generations_query, chunk)}
        assignments: dict[str, list[d.Assignment]] = defaultdict(list)
        for (node_id, name, tenant, deployment_id, replica, shard, indices, placed_milli, generation, dep_generation,
             revision, older, accelerators, *spec_columns) in await session.execute(placements_query, chunk):
            spec, shards_per_replica = _assigned_spec(revision if older is not None else 0, older, accelerators,
                                                      *spec_columns)
            milli = shard_milli(accelerators, placed_milli)
            assignments[node_id].append(d.Assignment(
                deployment=name, tenant=tenant, replica=replica, shard=shard, shards_per_replica=shards_per_replica,
                accelerator_indices=_indices(indices), accelerator_milli=milli if milli < 1000 else 0, spec=spec,
                generation=generation or dep_generation, deployment_uid=deployment_id,
            ))
        for node_id, node_generation in generations.items():
            sets[node_id] = d.AssignmentSet(node_id=node_id, generation=node_generation,
                                            assignments=tuple(assignments.get(node_id, ())))
    return sets


async def quarantine_deployment(session: AsyncSession, key: str, reason: str, now: datetime) -> set[str]:
    """Set a deployment (by key, `TENANT/NAME`) aside: phase QUARANTINED with the reason, its
    shards released and their usage meters stopped at `now`. Returns the nodes whose assignment
    sets changed."""
    row = await get_deployment(session, *d.split_deployment_key(key))
    if row is None or row.phase in (m.DeploymentPhase.DELETING, m.DeploymentPhase.QUARANTINED):
        return set()
    await will_move_generation(session)  # before its rows (PostgreSQL's lock order: store/changes.py)
    await _lock_placements(session, m.Placement.deployment_id == row.id)
    nodes = {p.node_id for p in row.placements}
    await stop_intervals(session, [p.id for p in row.placements], now)
    row.placements.clear()
    row.phase = m.DeploymentPhase.QUARANTINED
    row.reasons = [{"code": "QUARANTINED", "message": reason, "scope": ""}]
    row.generation = row.generation + 1
    await bump_node_assignment_generations(session, nodes)
    await bump_cluster_generation(session, ClusterChange.deployment(key))
    record_event(session, actor="controller", kind="deployment.quarantined", object_kind="deployment",
                 object_id=key, message=reason)
    await audit.append(session, [audit.AuditRecord(
        actor="controller", action="deployment.quarantined", role="controller", tenant=row.tenant_id,
        object_kind="deployment", object_id=key, detail={"reason": reason, "released_on_nodes": sorted(nodes)})])
    return nodes


async def release_quarantined(session: AsyncSession, row: m.Deployment, now: datetime) -> None:
    """Delete a quarantined deployment's row, and the shards it may still hold (their usage meters
    stopped at `now`), for a submit of its name (a fresh start: the caller inserts the new row
    after this). Logged as a change of the deployment (`ClusterChange.deployment`): the isolation
    watchdog's view reads its key again and forgets the old row and its shards; a reconciler's
    cache finds an arrival not read yet."""
    await will_move_generation(session)  # before its rows (PostgreSQL's lock order: store/changes.py)
    nodes = {p.node_id for p in row.placements}
    await stop_intervals(session, [p.id for p in row.placements], now)
    await session.delete(row)
    await session.flush()
    await bump_node_assignment_generations(session, nodes)
    await bump_cluster_generation(session, ClusterChange.deployment(d.deployment_key(row.tenant_id, row.name)))

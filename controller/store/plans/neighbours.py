"""What a scoped commit's re-check reads beyond its scope (`_recheck`, plans/check.py).

A commit with a scope reads only its own deployments' rows (plans/committed.py), but the
re-check of its landing replicas judges them with what lies beside them: the shards of other
deployments on the racks they touch, or on the nodes they land on alone when no rule of wider
scope applies there (`_judged_alone`), and totals of the rest where a row's power budget or a
tenant's quota needs them (`_read_unread`). These come from the snapshot while it is current or
stale by deletions alone (`_specs_since`, `_snapshot_racks`, `_snapshot_neighbours`: no statement
under the writer's lock), else from the database (`_read_racks`, `_neighbours`). They are what
keeps a scoped commit a cost of its scope, not of the cluster.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.changes import read_changes_since
from controller.store.inlist import any_of
from controller.store.models import Deployment, Node, Placement, Rack
from controller.store.recheck import ReplicaKey, TenantUsage, Unread, capped, rack_rules_apply, shard_usage
from controller.store.snapshot import ShardKey, Snapshot, Where
from controller.domain.changes import ChangeKind
from controller.domain.values import deployment_key
from controller.store.plans.committed import _LEAVING, _Committed, _chunks, _where


def _snapshot_racks(snapshot: Snapshot, nodes: Collection[str]) -> tuple[set[str], set[str]]:
    """The racks holding `nodes` and their rows, as `snapshot` has them (current while the
    topology and the nodes are: `_specs_since`), looked up in its index."""
    by_id = snapshot.index.nodes_by_id(snapshot.problem)
    row_of = snapshot.index.row_of(snapshot.problem)
    racks = {by_id[n]["rack"] for n in nodes if n in by_id}
    return racks, {row_of[r] for r in racks if r in row_of}


async def _read_racks(session: AsyncSession, nodes: Collection[str]) -> tuple[set[str], set[str]]:
    """The racks holding `nodes` and their rows, as committed."""
    racks: set[str] = set()
    rows: set[str] = set()
    for chunk in _chunks(sorted(set(nodes))):
        for rack, row in await session.execute(
            select(Node.rack_id, Rack.row_id).join(Rack, Rack.id == Node.rack_id)
            .where(any_of(session, Node.id, chunk)).distinct()
        ):
            racks.add(rack)
            rows.add(row)
    return racks, rows


async def _neighbours(session: AsyncSession, committed: _Committed, racks: Collection[str],
                      ) -> tuple[dict[ShardKey, tuple[int, Where]], dict[str, tuple[int, int]]]:
    """What a scoped commit's re-check reads beyond its scope on `racks` (those holding the
    nodes its landing replicas touch): the shards of live deployments outside the scope there
    ((revision, where) by key), with those deployments' (id, template revision). Every rule the
    re-check applies in full lies within one rack (recheck.py); rows and tenants come as totals
    (`_unread`)."""
    shards: dict[ShardKey, tuple[int, Where]] = {}
    outside: dict[str, tuple[int, int]] = {}
    if not racks:
        return shards, outside
    known = {d.id for d in committed.deployments.values()}
    for p in await session.execute(
        select(Deployment.id, Deployment.tenant_id, Deployment.name, Deployment.template_revision, Placement.replica,
               Placement.shard, Placement.node_id, Placement.accelerator_indices, Placement.accelerator_milli,
               Placement.revision)
        .join(Placement, Placement.deployment_id == Deployment.id).join(Node, Node.id == Placement.node_id)
        .where(any_of(session, Node.rack_id, sorted(racks)), Deployment.phase.not_in(_LEAVING))
    ):
        if p.id in known:
            continue
        key = deployment_key(p.tenant_id, p.name)
        outside[key] = (p.id, p.template_revision)
        shards[(key, p.replica, p.shard)] = (p.revision, (p.node_id, tuple(p.accelerator_indices), p.accelerator_milli))
    return shards, outside


async def _unread(session: AsyncSession, committed: _Committed, racks: Collection[str], by: tuple[Any, ...],
                  *where: Any) -> dict[tuple[Any, ...], TenantUsage]:
    """What the live shards a scoped commit did not read (outside its scope and the `racks` it
    read) and `where` selects hold, by the columns `by`: summed by the database for shards of a
    deployment's current template, one by one for those of older revisions (a rollout in flight:
    a second query, only when the first counted some)."""
    fractional = and_(Deployment.shard_accelerators == 1, Deployment.shard_accelerator_milli < 1000)
    milli = case((fractional, func.coalesce(func.nullif(Placement.accelerator_milli, 0),
                                            Deployment.shard_accelerator_milli)), else_=1000)
    held = func.json_array_length(Placement.accelerator_indices) * milli
    unread = (Deployment.phase.not_in(_LEAVING), Deployment.id.not_in(sorted(d.id for d in committed.deployments.values())),
              Node.rack_id.not_in(sorted(racks)), *where)

    def outside(query: Any) -> Any:
        return (query.join(Placement, Placement.deployment_id == Deployment.id)
                .join(Node, Node.id == Placement.node_id).join(Rack, Rack.id == Node.rack_id).where(*unread))

    current = Placement.revision == Deployment.template_revision
    held_now = case((current, held), else_=0)
    usage: dict[tuple[Any, ...], TenantUsage] = defaultdict(TenantUsage)
    older = 0
    for row in await session.execute(
        outside(select(*by, func.sum(held_now), func.sum(held_now * Deployment.shard_power_w / 1000.0),
                       func.sum(case((current, 0), else_=1)))).group_by(*by)
    ):
        usage[tuple(row[:len(by)])] += TenantUsage(float(row[-3] or 0), float(row[-2] or 0))
        older += int(row[-1] or 0)
    if not older:  # the usual case: no rollout in flight there
        return usage
    for row in await session.execute(
        outside(select(*by, Deployment.revision_specs, Placement.revision, Placement.node_id,
                       Placement.accelerator_indices, Placement.accelerator_milli)).where(~current)
    ):
        spec = (row.revision_specs or {}).get(str(row.revision))
        if spec is not None:
            usage[tuple(row[:len(by)])] += shard_usage(
                spec["shard"], (row.node_id, tuple(row.accelerator_indices), row.accelerator_milli))
    return usage


async def _read_unread(session: AsyncSession, committed: _Committed, doc: dict[str, Any],
                       landing: dict[ReplicaKey, dict[int, Where]], racks: set[str], rows: set[str]) -> Unread:
    """The totals a scoped commit's re-check needs of what it did not read: what the landing
    replicas' tenants with a quota hold, and what the shards on the other racks of the touched
    rows with a power budget draw."""
    quota = {t["id"] for t in doc["tenants"] if capped(t)} & {committed.deployments[rk[0]].tenant_id for rk in landing}
    budgeted = {r["id"] for r in doc["rows"] if r["id"] in rows and r.get("power_budget_w") is not None}
    tenants: dict[str, TenantUsage] = {}
    if quota:
        held = await _unread(session, committed, racks, (Deployment.tenant_id,),
                             any_of(session, Deployment.tenant_id, sorted(quota)))
        tenants = {tenant: usage for (tenant,), usage in held.items()}
    by_row: dict[str, dict[str, float]] = defaultdict(dict)
    if budgeted:
        drawn = await _unread(session, committed, racks, (Rack.row_id, Deployment.tenant_id),
                              any_of(session, Rack.row_id, sorted(budgeted)))
        for (row, tenant), usage in drawn.items():
            by_row[row][tenant] = usage.power_w
    return Unread(tenants, by_row)


@dataclass(frozen=True)
class _Since:
    """What the change log says changed since a stale commit's snapshot, when the re-check may
    still judge by that snapshot's document (`_specs_since`)."""

    # Deployments being deleted since (their shards leave); None: a deletion that names none.
    deleted: frozenset[str] | None
    placed: bool  # another commit changed shards of deployments the snapshot knows


async def _specs_since(session: AsyncSession, snapshot: Snapshot, generation: int) -> _Since | None:
    """Whether what the re-check judges by (topology, nodes, tenants, the specs of deployments)
    is as `snapshot` has it at `generation`, said by the change log in between: only deletions
    (a deployment being deleted is judged by nothing: its shards leave) and placements changed
    of deployments the snapshot knows (shards released, failures reported, another controller's
    plan; the shards themselves are read under the lock); None: something else changed. One
    query instead of the six that read the document again; the usual staleness under load is
    deletions."""
    since = await read_changes_since(session, snapshot.generation, generation=generation)
    if not since.complete:
        return None
    known = snapshot.deployment_ids
    deleted: set[str] | None = set()
    placed = False
    for kind, name in (change for logged in since.changes.values() for change in logged):
        if kind is ChangeKind.DEPLOYMENT_DELETED:
            deleted = None if deleted is None or name is None else deleted | {name}
        elif kind is ChangeKind.PLACEMENTS and name is not None and name in known:
            placed = True
        else:
            return None
    return _Since(None if deleted is None else frozenset(deleted), placed)


def _snapshot_neighbours(snapshot: Snapshot, committed: _Committed, racks: Collection[str], since: _Since | None,
                         nodes: Collection[str] | None = None,
                         ) -> tuple[dict[ShardKey, tuple[int, Where]], dict[str, tuple[int, int]]] | None:
    """`_neighbours` from `snapshot` instead of the database, for a commit whose snapshot is
    current (`since` None) or stale by deletions alone (`since.deleted`: their shards are left
    out, as the database's live shards leave them out): the snapshot holds every committed shard
    of the deployments outside the commit's scope. Only those on `nodes` of the racks when given
    (`_judged_alone`). None when it cannot tell: another commit changed shards since, or the
    snapshot left out shards still stored there (`Snapshot.released`). No statement under the
    writer's lock, and a cost of the snapshot's placements there (its index), not of a join of
    every placement on the racks (a 64-shard gang touches dozens)."""
    if not racks:
        return {}, {}
    if since is not None and (since.placed or since.deleted is None):
        return None
    problem, index = snapshot.problem, snapshot.index
    on = {n["id"] for n in index.nodes_on(problem, racks)}
    if nodes is not None:
        on.intersection_update(nodes)
    if any(where[0] in on for where in snapshot.released.values()):
        return None
    gone = frozenset() if since is None or since.deleted is None else since.deleted
    keys = snapshot.plan_keys()
    shards: dict[ShardKey, tuple[int, Where]] = {}
    outside: dict[str, tuple[int, int]] = {}
    for p in index.placements_on(problem, on):
        mapped = keys.key(p["deployment"], p["replica"], p["shard"])
        if mapped is None:
            return None
        key, revision = mapped
        if committed.speaks_for(key[0]) or key[0] in committed.deployments or key[0] in gone:
            continue
        if key[0] not in outside:
            ref = snapshot.solver_refs.get(key[0])
            template = ref.revision if ref is not None and not ref.outgoing else revision
            outside[key[0]] = (snapshot.deployment_ids.get(key[0], 0), template)
        shards[key] = (revision, _where(p))
    return shards, outside


def _judged_alone(snapshot: Snapshot, committed: _Committed, landing: Mapping[ReplicaKey, Mapping[int, Where]],
                  racks: Collection[str], rows: Collection[str]) -> bool:
    """Whether the re-check judges the nodes the landing replicas touch alone and needs no totals
    of what lies around them: no rule of a rack's scope applies on `racks`
    (`recheck.rack_rules_apply`, as the re-check itself tells from the same documents), no row of
    `rows` has a power budget and no landing replica's tenant a quota. A scoped commit then takes
    the shards beside its scope on those nodes alone, else on every node of `racks`."""
    problem, index = snapshot.problem, snapshot.index
    tenants = problem.get("tenants", ())
    landing_tenants = {committed.deployments[rk[0]].tenant_id for rk in landing}
    return not (rack_rules_apply([r for r in index.racks_in(problem, rows) if r["id"] in racks], tenants)
                or any(r.get("power_budget_w") is not None for r in problem.get("rows", ()) if r["id"] in rows)
                or any(capped(t) for t in tenants if t["id"] in landing_tenants))

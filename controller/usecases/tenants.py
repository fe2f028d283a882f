"""Tenants and their isolation contracts: create, update, read with usage, delete.

A tenant's contract is input to every placement, so a change bumps the cluster generation and
wakes the reconciler. Every reference (excluded tenants, zones) must exist when it is written.
A change that makes the contract stricter (a stricter isolation, a tenant excluded, fewer zones)
is refused while what runs now breaks it (`broken_by`, FAILED_PRECONDITION naming where): the
reconciler never moves placed work for a contract, so it would stand as an isolation violation
(the watchdog's alarm) until that work went. Move or delete it first (a drain moves a node's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from controller import limits
from controller.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ReasonDetail, ResourceExhausted,
)
from controller.identity import Principal
from controller.store import audit, metering
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.usecases import policy, tokens
from controller.domain.changes import ClusterChange
from controller.domain.values import ISOLATIONS, TenantSpec, TenantView, Usage
from controller.usecases import paging
from controller.usecases.paging import Page, PageRequest
from controller.usecases.ports import Signals
from controller.usecases.validation import check_count, check_id, check_quantity, check_tenant_id, check_unique


async def _validate(uow: UnitOfWork, spec: TenantSpec, *, writing: bool) -> None:
    """Every check of `spec`'s fields and references; `writing` (not a dry run): the zones it names
    are locked for the write (`_check_zones`), after the generation writers' lock (the lock order,
    store/changes.py), which the caller took first."""
    check_tenant_id(spec.id)
    if spec.isolation not in ISOLATIONS:
        raise InvalidArgument(f"tenant {spec.id}: isolation {spec.isolation!r} is not one of {', '.join(ISOLATIONS)}")
    check_quantity(f"tenant {spec.id}: reserved_accelerators", spec.reserved_accelerators,
                   limits.ACCELERATORS_QUANTITY_MAX)
    check_quantity(f"tenant {spec.id}: max_accelerators", spec.max_accelerators, limits.ACCELERATORS_QUANTITY_MAX)
    check_quantity(f"tenant {spec.id}: max_power_w", spec.max_power_w, limits.TENANT_POWER_W_MAX)
    check_count(f"tenant {spec.id}: excludes", spec.excludes, limits.EXCLUDES_MAX)
    check_count(f"tenant {spec.id}: zones", spec.zones, limits.ZONES_MAX)
    for other in spec.excludes:
        check_id(f"tenant {spec.id}: excluded tenant", other)
    for zone in spec.zones:
        check_id(f"tenant {spec.id}: zone", zone)
    if (spec.reserved_accelerators is not None and spec.max_accelerators is not None
            and spec.reserved_accelerators > spec.max_accelerators):
        raise InvalidArgument(
            f"tenant {spec.id}: reserved_accelerators {spec.reserved_accelerators:g} "
            f"exceeds max_accelerators {spec.max_accelerators:g}"
        )
    check_unique(f"tenant {spec.id}: excluded tenant", spec.excludes)
    check_unique(f"tenant {spec.id}: zone", spec.zones)
    if spec.id in spec.excludes:
        raise InvalidArgument(f"tenant {spec.id} cannot exclude itself")
    await _check_excludes(uow, spec, key_share=writing)
    await _check_zones(uow, spec, key_share=writing)


async def _check_excludes(uow: UnitOfWork, spec: TenantSpec, *, key_share: bool = True) -> None:
    """The tenants `spec` excludes exist (NOT_FOUND naming those that do not), and cannot be
    deleted before this transaction ends, as its zones (`_check_zones`; the deletion locks the
    tenant `FOR UPDATE` before it reads the exclusions): an exclusion of a tenant deleted
    meanwhile was stored, and the solver refused every full pass's problem for it."""
    missing = sorted(set(spec.excludes) - await repo.existing_ids(uow.session, m.Tenant, spec.excludes,
                                                                  key_share=key_share))
    if missing:
        raise NotFound(f"tenant {spec.id} excludes unknown tenant(s): {', '.join(missing)}")


async def _check_zones(uow: UnitOfWork, spec: TenantSpec, *, key_share: bool = True) -> None:
    """The zones `spec` names exist (NOT_FOUND naming those that do not), and cannot be deleted
    before this transaction ends: a zone's deletion refuses while a tenant names it
    (`topology.delete_item`), and a contract naming a zone that is gone failed every full pass. On
    PostgreSQL their rows are locked `FOR KEY SHARE` (the deletion locks the zone `FOR UPDATE`
    before it reads the tenants); on SQLite a write checks them again once it holds the writer
    (`_zones_still_there`): a deletion committed between this read and the write is seen then."""
    missing = sorted(set(spec.zones) - await repo.existing_ids(uow.session, m.Zone, spec.zones, key_share=key_share))
    if missing:
        raise NotFound(f"tenant {spec.id} names unknown zone(s): {', '.join(missing)}; apply the topology first")


async def _still_there(uow: UnitOfWork, spec: TenantSpec) -> None:
    """`_check_excludes` and `_check_zones` again, after the tenant's first write (the
    generation's: on SQLite it holds the writer)."""
    if spec.excludes:
        await _check_excludes(uow, spec)
    if spec.zones:
        await _check_zones(uow, spec)


BROKEN_SHOWN = 5  # places a refusal's message names (its reasons name more)


@dataclass(frozen=True)
class Tightening:
    """The rules a contract change makes stricter (`tightening`), which running work must not break."""

    isolation: str | None = None                # a stricter isolation
    excluded: frozenset[str] = frozenset()      # tenants newly excluded
    zones: frozenset[str] | None = None         # the zones left, when they are no longer all before

    def __bool__(self) -> bool:
        return self.isolation is not None or bool(self.excluded) or self.zones is not None


def tightening(before: TenantSpec, after: TenantSpec) -> Tightening:
    """What `after` makes stricter than `before`: nothing when it makes nothing stricter (the
    placements around the tenant are then not read)."""
    stricter = ISOLATIONS.index(after.isolation) > ISOLATIONS.index(before.isolation)
    return Tightening(isolation=after.isolation if stricter else None,
                      excluded=frozenset(after.excludes) - frozenset(before.excludes),
                      zones=frozenset(after.zones) if after.zones and set(after.zones) != set(before.zones) else None)


def broken_by(tenant: str, tight: Tightening, beside: Sequence[repo.PlacedBeside]) -> list[ReasonDetail]:
    """What the placements `beside` (on the racks where `tenant` holds shards) break of the rules
    `tight` made stricter: the tenant sharing a node (dedicated_node) or a rack (dedicated_rack)
    with another, a rack with a tenant newly excluded, a shard in a zone no longer allowed. Rules
    not made stricter are not judged (a violation they had is the watchdog's)."""
    broken = []
    own = [p for p in beside if p.tenant == tenant]
    others = [p for p in beside if p.tenant != tenant]
    if tight.isolation == "dedicated_node":
        mine = {p.node for p in own}
        for node in sorted({p.node for p in others if p.node in mine}):
            held = sorted({p.tenant for p in others if p.node == node})
            broken.append(ReasonDetail("ISOLATION", f"node {node} holds {', '.join(held)} too", node))
    if tight.isolation == "dedicated_rack":
        for rack in sorted({p.rack for p in others}):  # every rack read holds the tenant's shards
            held = sorted({p.tenant for p in others if p.rack == rack})
            broken.append(ReasonDetail("ISOLATION", f"rack {rack} holds {', '.join(held)} too", rack))
    for rack in sorted({p.rack for p in others if p.tenant in tight.excluded}):
        held = sorted({p.tenant for p in others if p.rack == rack and p.tenant in tight.excluded})
        broken.append(ReasonDetail("EXCLUSION", f"rack {rack} holds excluded {', '.join(held)}", rack))
    if tight.zones is not None:
        for zone in sorted({p.zone for p in own} - tight.zones):
            broken.append(ReasonDetail("ZONE", f"its shards run in zone {zone}", zone))
    return broken


def _write(row: m.Tenant, spec: TenantSpec) -> None:
    row.isolation = m.Isolation(spec.isolation)
    row.excludes = list(spec.excludes)
    row.zones = list(spec.zones)
    row.reserved_accelerators = spec.reserved_accelerators
    row.max_accelerators = spec.max_accelerators
    row.max_power_w = spec.max_power_w


def _unsaved(spec: TenantSpec) -> m.Tenant:
    """`spec` written to a row never added to the session: the tenant as it would be stored (what
    a dry run answers)."""
    row = m.Tenant(id=spec.id)
    _write(row, spec)
    return row


async def create_tenant(uow: UnitOfWork, who: Principal, spec: TenantSpec, signals: Signals, *,
                        dry_run: bool = False) -> TenantView:
    """`dry_run`: every check, then the tenant as it would be created; nothing written."""
    policy.require_admin(who, "creating tenants")
    if not dry_run:
        await repo.will_move_generation(uow.session)  # before any row lock (the lock order: store/changes.py)
    await _validate(uow, spec, writing=not dry_run)
    if await repo.get_tenant(uow.session, spec.id) is not None:
        raise AlreadyExists(f"tenant {spec.id} already exists")
    count = await repo.count_rows(uow.session, m.Tenant)
    if count >= limits.TENANTS_MAX:
        raise ResourceExhausted(f"the cluster has {count} tenants; at most {limits.TENANTS_MAX}")
    if dry_run:
        return TenantView(spec=repo.tenant_spec(_unsaved(spec)))
    row = m.Tenant(id=spec.id)
    _write(row, spec)
    # The id's usage to date now: its customers' before this one (a deleted tenant's id created
    # again), which this customer's usage to date leaves out (`metering.customer_usage_to_date`).
    (before,) = await metering.usage_to_date(uow.session, ("tenant",), now=m.utcnow(), tenant=spec.id) or (None,)
    row.usage_before_accelerator_s = before.accelerator_seconds if before is not None else 0.0
    row.usage_before_energy_j = before.energy_j if before is not None else 0.0
    uow.session.add(row)
    await repo.bump_cluster_generation(uow.session, ClusterChange.tenant(spec.id))
    await _still_there(uow, spec)
    repo.record_event(uow.session, actor=who.name, kind="tenant.created", object_kind="tenant", object_id=spec.id)
    await uow.commit()
    signals.wake_reconciler()
    return TenantView(spec=repo.tenant_spec(row))


async def update_tenant(uow: UnitOfWork, who: Principal, spec: TenantSpec, signals: Signals, *,
                        dry_run: bool = False) -> TenantView:
    """`dry_run`: every check, then the tenant as it would be (with its usage now); nothing written."""
    check_id("tenant", spec.id)
    policy.require_admin(who, "changing tenant contracts")
    row = await repo.get_tenant(uow.session, spec.id)
    if row is None:
        raise NotFound(f"tenant {spec.id} not found")
    if not dry_run:
        await repo.will_move_generation(uow.session)  # before any row lock (the lock order: store/changes.py)
    await _validate(uow, spec, writing=not dry_run)
    was = repo.tenant_spec(row)
    tight = tightening(was, spec)
    await _check_not_broken(uow, spec, tight)
    if dry_run:
        (view,) = await tenant_views(uow, [_unsaved(spec)])  # with what it uses now, as the update answers
        return view
    changed = changed_fields(was, spec)
    _write(row, spec)
    await repo.bump_cluster_generation(uow.session, ClusterChange.tenant(spec.id))
    # Again, holding the generation: the check above holds no lock, and a plan commit that landed
    # since it was checked against the old contract (as `topology.apply_topology` does).
    await _check_not_broken(uow, spec, tight)
    await _still_there(uow, spec)
    said = ", ".join(f"{name} {before} -> {after}" for name, (before, after) in changed.items())
    repo.record_event(uow.session, actor=who.name, kind="tenant.updated", object_kind="tenant", object_id=spec.id,
                      message=said or "no change", data={"changed": changed})
    audit.note(changed=changed)
    await uow.commit()
    signals.wake_reconciler()
    (view,) = await tenant_views(uow, [row])
    return view


async def _check_not_broken(uow: UnitOfWork, spec: TenantSpec, tight: Tightening) -> None:
    """Refuse (FAILED_PRECONDITION, naming it) a stricter contract that what runs now breaks
    (`tightening`, `broken_by`): the reconciler never moves placed work for a contract."""
    broken = broken_by(spec.id, tight, await repo.placed_beside(uow.session, spec.id)) if tight else []
    if broken:
        shown = "; ".join(r.message for r in broken[:BROKEN_SHOWN])
        more = f" (and {len(broken) - BROKEN_SHOWN} more)" if len(broken) > BROKEN_SHOWN else ""
        raise FailedPrecondition(f"tenant {spec.id}: the new contract is broken by what runs now: {shown}{more}; "
                                 f"move or delete that work first (maiactl drain NODE moves a node's)",
                                 reasons=tuple(broken))


def changed_fields(was: TenantSpec, now: TenantSpec) -> dict[str, list[Any]]:
    """Each contract field an update changes: [was, now] (lists for the JSON of events and audit)."""
    return {f.name: [_plain(getattr(was, f.name)), _plain(getattr(now, f.name))] for f in fields(TenantSpec)
            if getattr(was, f.name) != getattr(now, f.name)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


async def get_tenant(uow: UnitOfWork, who: Principal, tenant_id: str) -> TenantView:
    check_id("tenant", tenant_id)
    policy.visible_tenant(who, tenant_id, "reading tenant contracts")  # another tenant's: NOT_FOUND
    row = await repo.get_tenant(uow.session, tenant_id)
    if row is None:
        raise NotFound(f"tenant {tenant_id} not found")
    (view,) = await tenant_views(uow, [row])
    return view


async def list_tenants(uow: UnitOfWork, who: Principal, page: PageRequest = PageRequest()) -> Page[TenantView]:
    """Every tenant for an admin, a page at a time; a tenant token sees its own contract only, in
    one page whatever it asks. (Its own row filtered out of a page of all tenants went missing
    from short pages, and the page token, an id to start after, let it tell how many tenants
    sorted between any id and its own: their names, one call at a time.)"""
    own = policy.visible_tenant(who, "", "listing tenants")
    bounds = paging.bounds(page, paging.scope_of("tenants"))
    if own:
        row = await repo.get_tenant(uow.session, own)
        return Page(tuple(await tenant_views(uow, [row] if row is not None else [])), "")
    rows = await repo.list_tenant_rows(uow.session, bounds)
    page = paging.page_of(rows, bounds, key=lambda r: (r.id,))
    return Page(tuple(await tenant_views(uow, page.items)), page.next_token)


async def tenant_views(uow: UnitOfWork, rows: Sequence[m.Tenant]) -> list[TenantView]:
    """These tenants' contracts with what their placed shards use now (summed by the database, a
    row a tenant: `repo.tenant_usage`), in their order."""
    usage = await repo.tenant_usage(uow.session, [r.id for r in rows])
    return [TenantView(spec=repo.tenant_spec(r), usage=usage.get(r.id, Usage())) for r in rows]


async def delete_tenant(uow: UnitOfWork, who: Principal, tenant_id: str, signals: Signals) -> None:
    check_id("tenant", tenant_id)
    policy.require_admin(who, "deleting tenants")
    await repo.will_move_generation(uow.session)  # before any row lock (the lock order: store/changes.py)
    # Its own row locked first (PostgreSQL): a token made or an exclusion written for it meanwhile
    # (their key share) is seen below, or waits and then finds it gone; a deployment submitted
    # meanwhile is counted, or waits and then fails on its foreign key. Then the rows whose
    # exclusions it rewrites, before its DELETE (an exclusion added since waits on its own row).
    # On SQLite the DELETE holds the writer, and what refers to it is read after it.
    if await repo.lock_tenant(uow.session, tenant_id) is None:
        raise NotFound(f"tenant {tenant_id} not found")
    count = await repo.count_tenant_deployments(uow.session, tenant_id)
    if count:
        raise FailedPrecondition(f"tenant {tenant_id} has {count} deployment(s); delete them first")
    excluding = [t.id for t in await repo.list_tenant_rows(uow.session) if tenant_id in (t.excludes or ())]
    if excluding:
        await repo.list_tenant_rows(uow.session, ids=excluding, lock=True)
    if not await repo.delete_tenant_row(uow.session, tenant_id):  # SQLite: one submitted since the count
        raise FailedPrecondition(f"tenant {tenant_id} has deployments; delete them first")
    # Other tenants' exclusions of this one no longer mean anything: drop them with it, each said
    # in an event of that tenant and in the deletion's (a tenant created later with this id is a
    # new customer, not excluded: whoever wants it excluded says so again).
    excluded_by = []
    for other in await repo.list_tenant_rows(uow.session, fresh=True):  # as they are now (SQLite: the writer held)
        if tenant_id in (other.excludes or ()):
            other.excludes = [t for t in other.excludes if t != tenant_id]
            excluded_by.append(other.id)
            repo.record_event(uow.session, actor=who.name, kind="tenant.updated", object_kind="tenant",
                              object_id=other.id, message=f"excludes no longer lists {tenant_id}: it was deleted",
                              data={"excludes_dropped": [tenant_id]})
    revoked = await tokens.revoke_tenant_tokens(uow, who, tenant_id)
    await repo.bump_cluster_generation(uow.session, ClusterChange.tenant(tenant_id))
    data = {**({"revoked_tokens": revoked} if revoked else {}), **({"excluded_by": excluded_by} if excluded_by else {})}
    repo.record_event(uow.session, actor=who.name, kind="tenant.deleted", object_kind="tenant", object_id=tenant_id,
                      data=data or None)
    await uow.commit()
    if revoked:
        signals.tokens_revoked(revoked)  # every controller forgets them; streams opened with them end
    signals.wake_reconciler()

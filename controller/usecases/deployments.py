"""Deployments: submit (or dry-run), read, delete.

Submission validates everything a request can get wrong on its own and against the cluster it
will run on (a rack-local gang bigger than any rack can never run: better to say so now with
the numbers than to leave it pending forever), stores it PENDING and wakes the reconciler.
Deletion marks it DELETING; the reconciler releases its shards and removes the row.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from controller import limits
from controller.errors import (
    AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound, ReasonDetail, ResourceExhausted,
)
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import audit
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.nominations import nomination_view
from controller.store.db import Database, UnitOfWork
from controller.store.rollout import stored_key
from controller.usecases import planning, policy, requests
from controller.usecases.capacity import CapacityCache, load_index
from controller.usecases.reservations import check_owed_capacity, new_ask
from controller.usecases.redaction import as_seen_by, redactor_of
from controller.domain.changes import ClusterChange
from controller.domain.values import (
    DOMAINS, DeploymentEvent, DeploymentSpec, DeploymentView, ReasonView, ShardPlacementView, deployment_key,
    split_deployment_key,
)
from controller.usecases import paging
from controller.usecases.paging import Page, PageRequest
from controller.usecases.ports import Signals
from controller.usecases.validation import (
    check_count, check_name, check_optional_id, check_quantity, check_range, check_tenant_id, check_text, check_unique,
    quoted,
)
from scheduler.filters import POWER_SLACK_W


def validate_spec(spec: DeploymentSpec) -> None:
    """What a request can get wrong on its own, every field bounded (`controller.limits`). The
    refusal names the field (`InvalidArgument.violations`: `spec.replicas`, ...)."""
    at = "name"  # the field being checked (a local: nothing spent on a spec that passes)
    try:
        check_name("deployment", spec.name)
        where = f"deployment {spec.name}"
        at = "tenant"
        if not spec.tenant:
            raise InvalidArgument(f"{where}: tenant is required")
        check_tenant_id(spec.tenant)
        at = "replicas"
        check_range(f"{where}: replicas", spec.replicas, 1, limits.REPLICAS_MAX)
        at = "min_replicas"
        if not 1 <= spec.min_replicas <= spec.replicas:
            raise InvalidArgument(
                f"{where}: min_replicas must be between 1 and replicas ({spec.replicas}), got {spec.min_replicas}"
            )
        at = "shards_per_replica"
        check_range(f"{where}: shards_per_replica", spec.shards_per_replica, 1, limits.SHARDS_PER_REPLICA_MAX)
        at = "replicas"
        total = spec.replicas * spec.shards_per_replica
        if total > limits.SHARDS_PER_DEPLOYMENT_MAX:
            raise InvalidArgument(
                f"{where}: replicas x shards_per_replica is {total} shards; at most {limits.SHARDS_PER_DEPLOYMENT_MAX}"
            )
        shard = spec.shard
        at = "shard.accelerators"
        check_range(f"{where}: shard.accelerators", shard.accelerators, 0, limits.SHARD_ACCELERATORS_MAX)
        if shard.accelerators == 0 and total > limits.HOST_ONLY_SHARDS_MAX:
            raise InvalidArgument(
                f"{where}: {total} host-only shards (shard.accelerators 0); at most {limits.HOST_ONLY_SHARDS_MAX}"
            )
        at = "shard.accelerator_milli"
        if not 1 <= shard.accelerator_milli <= 1000:
            raise InvalidArgument(
                f"{where}: shard.accelerator_milli must be between 1 and 1000, got {shard.accelerator_milli}"
            )
        if shard.accelerator_milli < 1000 and shard.accelerators != 1:
            raise InvalidArgument(
                f"{where}: shard.accelerator_milli {shard.accelerator_milli} (a fraction) needs "
                f"shard.accelerators = 1, got {shard.accelerators}"
            )
        at = "shard.hbm_gib"
        check_quantity(f"{where}: shard.hbm_gib", shard.hbm_gib, limits.HBM_GIB_MAX)
        at = "shard.cpu_milli"
        check_quantity(f"{where}: shard.cpu_milli", shard.cpu_milli, limits.CPU_MILLI_MAX)
        at = "shard.memory_mib"
        check_quantity(f"{where}: shard.memory_mib", shard.memory_mib, limits.MEMORY_MIB_MAX)
        at = "shard.power_w"
        check_quantity(f"{where}: shard.power_w", shard.power_w, limits.POWER_W_MAX)
        at = "shard.accelerator_models"
        models = shard.accelerator_models or ()
        check_count(f"{where}: shard.accelerator_models", models, limits.MODELS_MAX)
        for model in models:
            if not model:
                raise InvalidArgument(f"{where}: shard.accelerator_models has an empty model name")
            check_text(f"{where}: shard.accelerator_models entry", model, limits.MODEL_MAX)
        check_unique(f"{where}: accelerator model", tuple(models))
        at = "priority"
        check_range(f"{where}: priority", spec.priority, -limits.PRIORITY_MAX, limits.PRIORITY_MAX)
        at = "locality"
        if spec.locality not in DOMAINS:
            raise InvalidArgument(f"{where}: locality {quoted(spec.locality)} is not one of {', '.join(DOMAINS)}")
        if spec.spread is not None:
            at = "spread.domain"
            if spec.spread.domain not in DOMAINS or spec.spread.domain == "none":
                raise InvalidArgument(
                    f"{where}: spread.domain must be one of node, rack, row, zone, got {quoted(spec.spread.domain)}"
                )
            at = "spread.max_per_domain"
            check_range(f"{where}: spread.max_per_domain", spec.spread.max_per_domain, 1, limits.REPLICAS_MAX)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message, violations=(FieldViolation(f"spec.{at}", exc.message),)) from None


def replica_accelerators(spec: DeploymentSpec) -> int:
    """Whole accelerators one replica occupies at least (fractions of one tenant share one)."""
    if spec.shard.fractional:
        return math.ceil(spec.shards_per_replica * spec.shard.accelerator_milli / 1000)
    return spec.shards_per_replica * spec.shard.accelerators


def _never_fits(code: str, message: str, scope: str = "") -> InvalidArgument:
    return InvalidArgument(message, reasons=(ReasonDetail(code, message, scope),))


async def check_could_ever_fit(uow: UnitOfWork, spec: DeploymentSpec, tenant_zones: Sequence[str],
                               capacity: CapacityCache | None = None, *,
                               capacity_generation: int | None = None) -> None:
    """Refuse what no state of the registered cluster could ever run, naming the numbers.

    Counts every registered node whatever its state (a down node may come back); with no nodes
    registered yet nothing can be judged and nothing is refused. Judged from the aggregates of
    `capacity` (the controller's, kept per capacity generation: `capacity_generation` when the
    caller read it already), or of a fresh read without it. `tenant_zones`: the zones the
    tenant may run in (none: anywhere).
    """
    index = await (capacity.index(uow, capacity_generation) if capacity is not None else load_index(uow))
    if index.empty() or spec.shard.accelerators == 0:
        return
    where = f"deployment {spec.name}"
    models = set(spec.shard.accelerator_models or ()) or None
    view = index.select(models, None)
    if models and view.empty():
        raise _never_fits(
            "ACCELERATOR_MODEL",
            f"{where}: no node has accelerator model {', '.join(sorted(models))} "
            f"(registered models: {', '.join(index.models()) or 'none'})"
        )
    if tenant_zones:
        view = index.select(models, set(tenant_zones))
        if view.empty():
            raise _never_fits(
                "ZONE",
                f"{where}: tenant {spec.tenant} may run only in zone(s) {', '.join(tenant_zones)}, "
                "which have no nodes with the requested accelerators"
            )
    largest, largest_id = view.largest_node()
    if spec.shard.accelerators > largest:
        raise _never_fits(
            "CAPACITY",
            f"{where}: one shard needs {spec.shard.accelerators} accelerators on one node; "
            f"the largest node has {largest} ({largest_id})", largest_id,
        )
    most = view.most_hbm()
    if most is not None and spec.shard.hbm_gib > most[0]:
        raise _never_fits(
            "HBM",
            f"{where}: one shard needs {spec.shard.hbm_gib:g} GiB of HBM per accelerator; "
            f"the most any node has is {most[0]:g} GiB ({most[1]})", most[1],
        )
    power, room = spec.shard.shard_power_w, view.most_power()
    # As the solver judges a budget (`power_slots`): a shard of no power is never held back by one
    # (a node idle above its rack's budget leaves "room" below 0), and the slack is its float noise.
    if power > 0 and power > room.watts + POWER_SLACK_W:  # it waited Pending with POWER_RACK for ever
        level = "rack" if room.code == "POWER_RACK" else "row"
        raise _never_fits(
            room.code,
            f"{where}: one shard draws {power:g} W; the most any node could give it is {room.watts:g} W "
            f"({room.node_id}: {level} {room.domain}'s budget {room.budget_w:g} W less the node's own idle "
            f"{room.idle_power_w:g} W)", room.domain,
        )
    if spec.spread is not None:
        domain, most = spec.spread.domain, spec.spread.max_per_domain
        domains = view.domain_count(domain)
        if domains * most < spec.min_replicas:  # it waited for ever, `wait` timing out
            raise _never_fits(
                "SPREAD",
                f"{where}: min_replicas {spec.min_replicas} at most {most} a {domain} takes "
                f"{-(-spec.min_replicas // most)} {domain}s; the cluster has {domains} with the accelerators asked"
                + (f" in tenant {spec.tenant}'s zones" if tenant_zones else ""))
    if spec.locality == "none":
        return
    held, domain_id = view.largest_domain(spec.locality)
    needed = replica_accelerators(spec)
    if needed > held:
        shard_text = (f"{spec.shards_per_replica} shards x {spec.shard.accelerator_milli} milli"
                      if spec.shard.fractional else
                      f"{spec.shards_per_replica} shards x {spec.shard.accelerators}")
        raise _never_fits(
            "LOCALITY",
            f"{where}: one {spec.locality}-local replica needs {needed} accelerators ({shard_text}); "
            f"the largest {spec.locality} holds {held} ({domain_id})", domain_id,
        )


@dataclass(frozen=True)
class StoreChecked:
    """What `_validate_against_store` found."""

    replaced: m.Deployment | None  # the quarantined deployment of that name the spec releases
    tenant_deployments: int


async def _validate_against_store(uow: UnitOfWork, who: Principal, spec: DeploymentSpec, *, replacing: bool = False,
                                  capacity: CapacityCache | None = None) -> StoreChecked:
    """Checks against the stored cluster (one query, and the capacity aggregates; where another
    tenant has a reservation, a non-preemptible ask against what it is owed, `reservations`).

    `replacing` (dry runs only): the spec stands in for the stored deployment of its name, which
    must exist. Names are per tenant: only the tenant's own deployments can collide (ALREADY_EXISTS
    never tells one tenant what another has named its deployments)."""
    validate_spec(spec)
    facts = await repo.submit_facts(uow.session, spec.tenant, spec.name)
    if facts is None:
        raise NotFound(f"tenant {spec.tenant} not found")
    replaced = None
    if replacing and not facts.exists:
        raise NotFound(f"deployment {spec.name} not found in tenant {spec.tenant} (nothing to replace)")
    if facts.exists and not replacing:
        replaced = await repo.get_deployment(uow.session, spec.tenant, spec.name)
        if replaced is None or replaced.phase is not m.DeploymentPhase.QUARANTINED:
            raise AlreadyExists(f"deployment {spec.name} already exists in tenant {spec.tenant}")
    await check_could_ever_fit(uow, spec, facts.tenant_zones, capacity, capacity_generation=facts.capacity_generation)
    if facts.others_reserve and not spec.preemptible and not replacing:
        asked, asks = new_ask(spec)
        await check_owed_capacity(uow, who, spec.tenant, asked=asked, power_w=spec.shard.power_w, asks=asks)
    return StoreChecked(replaced, facts.deployments)


def as_caller(who: Principal, spec: DeploymentSpec, action: str) -> DeploymentSpec:
    """The spec in the caller's tenant: a tenant token submits for its own tenant only (an empty
    tenant field means its own); admins name the tenant."""
    tenant = policy.visible_tenant(who, spec.tenant, action)
    return replace(spec, tenant=tenant) if tenant != spec.tenant else spec


async def resolve_tenant(uow: UnitOfWork, who: Principal, tenant: str, name: str, action: str) -> str:
    """The tenant whose deployment `name` a by-name call means.

    A tenant token's calls imply its own tenant (naming another is NOT_FOUND). An admin names the
    tenant; without one, the only tenant that has a deployment of that name is meant, and when
    several have one the call is FAILED_PRECONDITION naming them (an admin may see them all).
    """
    check_name("deployment", name)
    check_optional_id("tenant", tenant)
    tenant = policy.visible_tenant(who, tenant, action)
    if tenant:
        return tenant
    return only_owner(name, await repo.tenants_with_deployment(uow.session, name, limit=3))


def only_owner(name: str, owners: Sequence[str]) -> str:
    """The one tenant of `owners` (sorted) that has a deployment `name`, for a caller naming none."""
    if not owners:
        raise NotFound(f"deployment {name} not found")
    if len(owners) > 1:
        more = ", ..." if len(owners) > 2 else ""
        raise FailedPrecondition(f"deployment {name} exists in several tenants ({', '.join(owners[:2])}{more}); "
                                 "name the tenant (maiactl ... -n TENANT NAME, or TENANT/NAME)")
    return owners[0]


async def visible_row(uow: UnitOfWork, who: Principal, tenant: str, name: str, action: str) -> m.Deployment:
    """The deployment `name` of `tenant` (see `resolve_tenant`) if `who` may see it; another
    tenant's is NOT_FOUND, like a missing one."""
    tenant = await resolve_tenant(uow, who, tenant, name, action)
    return seen_or_not_found(who, tenant, name, await repo.get_deployment(uow.session, tenant, name))


def seen_or_not_found(who: Principal, tenant: str, name: str, row: m.Deployment | None) -> m.Deployment:
    """The row of deployment `name` of `tenant` read for `who`; NOT_FOUND when there is none or
    `who` may not see it (another tenant's reads as a missing one)."""
    if row is None or not policy.may_see_tenant(who, row.tenant_id):
        raise NotFound(f"deployment {name} not found" + (f" in tenant {tenant}" if who.is_admin else ""))
    return row


@dataclass(frozen=True)
class Admitted:
    """A submit that passed every check against the store (`admit`), not yet written."""

    spec: DeploymentSpec                  # in the caller's tenant
    replaced: m.Deployment | None = None  # the quarantined deployment it releases
    replay: DeploymentView | None = None  # a retried request id: the answer, nothing to write


async def admit(uow: UnitOfWork, who: Principal, spec: DeploymentSpec, throttle: SubmitLimits | None = None,
                capacity: CapacityCache | None = None, request_id: str = "") -> Admitted:
    """The checks of a submit, reads only: the request id (a retry is answered from the store),
    the tenant's submit rate, the spec against the cluster, the tenant's deployment count."""
    spec = as_caller(who, spec, "submitting deployments")
    validate_spec(spec)
    requests.check_request_id(request_id)
    first = await requests.replayed(uow, spec.tenant, request_id, spec, "submit")
    if first is not None:
        return Admitted(spec, replay=await as_seen_by(uow, who, repo.deployment_view(
            await repo.get_deployment(uow.session, first.tenant_id, first.name) or first)))
    if throttle is not None:
        throttle.check_submit(spec.tenant)
    checked = await _validate_against_store(uow, who, spec, capacity=capacity)
    count = checked.tenant_deployments
    if checked.replaced is None and count >= limits.DEPLOYMENTS_PER_TENANT_MAX:
        raise ResourceExhausted(
            f"tenant {spec.tenant} has {count} deployments; at most {limits.DEPLOYMENTS_PER_TENANT_MAX}"
        )
    return Admitted(spec, replaced=checked.replaced)


def submitted_event(actor: str, spec: DeploymentSpec, *, released: bool = False) -> repo.NewEvent:
    return repo.NewEvent(actor=actor, kind="deployment.released" if released else "deployment.submitted",
                         object_kind="deployment", object_id=spec.key, data=planning.deployment_doc(spec))


async def submit_deployment(uow: UnitOfWork, who: Principal, spec: DeploymentSpec,
                            signals: Signals, throttle: SubmitLimits | None = None,
                            capacity: CapacityCache | None = None, request_id: str = "") -> DeploymentView:
    """Store a new deployment (PENDING). With `request_id`, a retry of the same submit returns
    the deployment as it stands and writes nothing (usecases/requests.py). Concurrent submits
    are better committed together: `usecases.submits.SubmitBatcher`."""
    admitted = await admit(uow, who, spec, throttle, capacity, request_id)
    if admitted.replay is not None:
        return admitted.replay
    spec, replaced = admitted.spec, admitted.replaced
    if replaced is not None:  # submitting a quarantined deployment again releases it (a fresh start)
        await repo.release_quarantined(uow.session, replaced, datetime.now(timezone.utc))
    row = repo.new_deployment_row(spec)
    uow.session.add(row)
    # No cluster generation bump: a plan solved without this deployment is still valid (it only
    # leaves it pending), and bumping made every plan solved under a stream of submissions
    # conflict. The reconciler sees new arrivals by `repo.count_schedulable_deployments`.
    try:
        await uow.session.flush()
    except Exception as exc:
        if repo.tenant_gone(exc):  # deleted since it was read (its deletion locked it: store/tenants)
            raise NotFound(f"tenant {spec.tenant} not found") from None
        raise
    await requests.remember(uow, spec.tenant, request_id, row.id, spec, "submit")
    await repo.record_events(uow.session, [submitted_event(who.name, spec, released=replaced is not None)])
    await uow.commit()
    view = repo.deployment_view(row)
    signals.publish(DeploymentEvent("added", view))
    signals.wake_reconciler()
    return view


async def dry_run_deployment(db: Database, who: Principal, spec: DeploymentSpec, *,
                             time_limit_ms: int, throttle: SubmitLimits | None = None,
                             replace_existing: bool = False, allow_preemption: bool = False) -> DeploymentView:
    """Solve the cluster with this deployment added (or, `replace_existing`, in place of the
    stored one of that name) and say what it would get; writes nothing. `allow_preemption`: as
    the controller's passes solve (`--preemption`), so the answer is what the apply gets; what it
    would preempt is said in `PREEMPTS` reasons.

    With `throttle`, the tenant's dry-run rate applies, the solve takes one of the few dry-run
    slots and runs for at most the dry-run time limit."""
    spec = as_caller(who, spec, "submitting deployments")
    validate_spec(spec)
    if throttle is None:
        return await _dry_run(db, who, spec, time_limit_ms, replace_existing, allow_preemption)
    throttle.start_dry_run(spec.tenant)
    # The slot is held until the solve ends, not the call: a call cancelled (its client gone, its
    # deadline past) left its solve running in a worker thread with the slot free, and a tenant
    # with short deadlines ran as many solves at once as it liked, in the loop's default executor
    # the reconciler's warm cache waits on (found in review).
    solving = asyncio.ensure_future(_dry_run(db, who, spec, min(time_limit_ms, throttle.dry_run_time_limit_ms),
                                             replace_existing, allow_preemption))
    solving.add_done_callback(lambda done: _dry_run_ended(throttle, done))
    return await asyncio.shield(solving)


def _dry_run_ended(throttle: SubmitLimits, done: asyncio.Future[DeploymentView]) -> None:
    throttle.end_dry_run()
    if not done.cancelled():
        done.exception()  # read: a caller gone no longer does


async def _dry_run(db: Database, who: Principal, spec: DeploymentSpec, time_limit_ms: int,
                   replace_existing: bool, allow_preemption: bool) -> DeploymentView:
    """The would-be view; a tenant reads the solver's reasons without other tenants in them."""
    async with db.unit_of_work() as uow:
        await _validate_against_store(uow, who, spec, replacing=replace_existing)
        redactor = await redactor_of(uow, who)
    async with db.read_unit() as uow:  # every table as of one moment (`Database.read_unit`)
        snapshot = await planning.load_snapshot(uow.session)
    # Each node's rack from the snapshot's own nodes (the plan places on no other), not every node's row.
    racks = {n["id"]: n["rack"] for n in snapshot.problem["nodes"]}
    problem = planning.with_options(planning.with_deployment(snapshot.problem, spec, replace=replace_existing),
                                    time_limit_ms=time_limit_ms, allow_preemption=allow_preemption)
    plan = await planning.solve_in_thread(problem, time_limit_ms=time_limit_ms)
    return redactor.deployment(_would_be_view(spec, plan, racks))


# A dry run's reason for what the pass placing it would preempt (not a reason it waits).
PREEMPTS = "PREEMPTS"


def _would_be_view(spec: DeploymentSpec, plan: Any, racks: dict[str, str]) -> DeploymentView:
    mine = sorted((p for p in plan.placements if p.deployment == spec.key), key=lambda p: (p.replica, p.shard))
    placements = tuple(
        ShardPlacementView(
            replica=p.replica, shard=p.shard, node=p.node, rack=racks.get(p.node, ""),
            accelerator_indices=tuple(p.accelerator_indices),
            accelerator_milli=p.accelerator_milli if p.accelerator_milli and p.accelerator_milli < 1000 else 0,
            phase="assigned",
        )
        for p in mine
    )
    reasons = tuple(
        ReasonView(r.code, r.message, r.scope or "")
        for u in plan.unplaced if u.deployment == spec.key for r in u.reasons
    )
    replicas = {p.replica for p in mine}
    if replicas and plan.preempted:  # the pass that places it stops these (preemption on)
        victims: dict[str, int] = {}
        for v in plan.preempted:
            victims[stored_key(v.deployment)] = victims.get(stored_key(v.deployment), 0) + 1
        reasons += tuple(ReasonView(PREEMPTS, f"placing it preempts {n} replica{'s' * (n != 1)} of {key}", key)
                         for key, n in sorted(victims.items()))
    phase = "scheduled" if replicas else "pending"
    return DeploymentView(spec=spec, phase=phase, placed_replicas=len(replicas), placements=placements,
                          reasons=reasons)


async def get_deployment(uow: UnitOfWork, who: Principal, name: str, tenant: str = "") -> DeploymentView:
    """The deployment as stored, with the nodes kept for it at the head of the line, if any."""
    row = await visible_row(uow, who, tenant, name, "reading deployments")
    view = await as_seen_by(uow, who, repo.deployment_view(row))
    nomination = await nomination_view(uow.session, row.id, rolling=view.outgoing_replicas > 0)
    return view if nomination is None else replace(view, nomination=nomination)


async def list_deployments(uow: UnitOfWork, who: Principal, tenant: str = "",
                           page: PageRequest = PageRequest(), *, name: str = "") -> Page[DeploymentView]:
    """The deployments `who` may see (of `tenant`; named `name`, if given), a page of them."""
    check_optional_id("tenant", tenant)
    if name:
        check_name("deployment", name)
    tenant = policy.visible_tenant(who, tenant, "listing deployments")
    bounds = paging.bounds(page, paging.scope_of("deployments", tenant=tenant, name=name), (str, int))
    keys = paging.page_of(await repo.deployment_page_keys(uow.session, tenant=tenant, name=name, page=bounds),
                          bounds, key=lambda k: k)
    read = await repo.deployments_with_ids(uow.session, [row_id for _, row_id in keys.items])
    redactor = await redactor_of(uow, who)
    # (A deployment removed between the two reads is left out; the page's token stands. Ids are never reused.)
    return paging.Page(tuple(redactor.deployment(read[row_id].view()) for _, row_id in keys.items if row_id in read),
                       keys.next_token)


async def delete_deployment(uow: UnitOfWork, who: Principal, name: str, signals: Signals,
                            tenant: str = "") -> DeploymentView:
    """Mark the deployment DELETING (a second delete changes nothing and answers the same); the
    reconciler releases its shards and removes the row. Concurrent deletions are better committed
    together: `usecases.deletes.DeleteBatcher`."""
    row = await visible_row(uow, who, tenant, name, DELETING)
    if row.phase is not m.DeploymentPhase.DELETING:
        await mark_deleting(uow, [(row, who.name)])
        await uow.commit()
        signals.wake_reconciler()
    view = repo.deployment_view(row)
    signals.publish(DeploymentEvent("modified", view))  # whole: each watcher reads it redacted for itself
    return await as_seen_by(uow, who, view)


async def delete_deployment_alone(db: Database, who: Principal, name: str, signals: Signals,
                                  tenant: str = "", throttle: SubmitLimits | None = None) -> DeploymentView:
    """`delete_deployment` in a transaction of its own. When the deployment changed between this
    delete's read and its mark, the mark is refused (`repo.changed_since_read`, nothing written)
    and the delete reads once more: marked by another delete (a member of a failed batch racing a
    later batch with its name, or two lone deletes), it is DELETING and the answer is that of a
    second delete; removed since (marked and removed by the reconciler, or a quarantined one
    released by a submit), it is NOT_FOUND, as for any delete of a deployment that is not there.
    Either way no second event, bump or audit entry with a change. `throttle`: a tenant token's
    deletion takes a token of its tenant's change rate first."""
    if throttle is not None:
        throttle.check_change(who)
    try:
        async with db.unit_of_work() as uow:
            return await delete_deployment(uow, who, name, signals, tenant=tenant)
    except Exception as exc:
        if not repo.changed_since_read(exc):
            raise
    async with db.unit_of_work() as uow:
        return await delete_deployment(uow, who, name, signals, tenant=tenant)


DELETING = "deleting deployments"  # the action, in refusals


async def mark_deleting(uow: UnitOfWork, rows: Sequence[tuple[m.Deployment | repo.DeploymentColumns, str]],
                        calls: Sequence[audit.CallEntry] = ()) -> datetime:
    """Mark deployments (loaded rows, or plain ones: `repo.set_deleting`) DELETING, each with its
    event (by its actor), in the caller's transaction: ONE cluster generation bump for all, which
    logs every key (plan commits wait for that row from the bump to the commit, so it comes
    last, after the generation writers' lock: store/changes.py), then the `calls`' audit entries
    (a batch's, `unread`: a head missed on SQLite fails the transaction) with the events (on
    PostgreSQL in their statement: `audit.append(along=)`). Nothing is read back: inside
    `marks.deferred_writes` (a batch) every statement goes to SQLite with the caller's next
    statement or commit; on PostgreSQL the phases' UPDATE goes in BEGIN's message. A deployment
    marked or removed since its caller read it fails the transaction whole
    (`repo.changed_since_read`). Returns the time written."""
    await repo.will_move_generation(uow.session)
    at = await repo.set_deleting(uow.session, [row for row, _ in rows])
    events = repo.deleting_events(rows)  # refused for a row removed since its read
    await repo.bump_cluster_generation_unread(uow.session, ClusterChange.deployment_deleted(
        *(deployment_key(row.tenant_id, row.name) for row, _ in rows)))
    await audit.append_calls(uow.session, calls, unread=True, along=(events,))
    return at


async def views_of(uow: UnitOfWork, keys: set[str]) -> list[DeploymentView]:
    """Current views of some deployments, by key `TENANT/NAME` (those that no longer exist are
    skipped), by name then id. Read as plain columns (`repo.deployments_named`: one statement), not
    as ORM entities: what every plan commit's publish reads (a view per deployment it changed)."""
    read = await repo.deployments_named(uow.session, {split_deployment_key(key)[1] for key in keys})
    named = [found for found in read if deployment_key(found.row.tenant_id, found.row.name) in keys]
    return [found.view() for found in sorted(named, key=lambda found: (found.row.name, found.row.id))]

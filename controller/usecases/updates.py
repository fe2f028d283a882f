"""Changing a stored deployment in place, with optimistic concurrency.

An update names the `resource_version` it was based on; if the deployment changed since, the
update is refused (ABORTED) and nothing is written, so two operators never silently overwrite
each other. What changes decides how it takes effect:
- replicas, min_replicas, priority, preemptible: at once (the next solve scales; nothing restarts);
- what a replica is (shards per replica, the shard, locality, spread): a new template revision;
  the replicas of the old one keep running until replacements run, one at a time
  (`store/rollout.py`: make-before-break, never below the replicas asked); back to what an
  older revision's replicas still run (a rollback), those become the new revision's as they
  run, and the abandoned revision's replicas are the ones replaced (`_adoptable`).
An update that would break the tenant's contract is refused with the numbers: one that asks
more than before and so more than its `max_accelerators` or `max_power_w` in total, or
(non-preemptible) free capacity that is owed to another tenant below its reservation (it could
not take it back: only preemptible work yields). One that asks no more (a scale-down, a new
priority) is taken even while the tenant is above a cap (a submit beyond it waits with a QUOTA
reason, as the update's deployment then does), or while what it asked already waits for capacity
others are owed: refused, the only way down was a delete. A tenant token reads such a refusal
without the other tenants' ids (`redaction`).
"""

from __future__ import annotations

from typing import Any, Literal

from controller.errors import (
    Conflict, FailedPrecondition, InvalidArgument, NotFound, ReasonDetail, ResourceExhausted,
)
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.usecases import planning, requests
from controller.usecases.redaction import as_seen_by
from controller.usecases.reservations import check_owed_capacity, demand
from controller.usecases.deployments import (as_caller, check_could_ever_fit, seen_or_not_found, validate_spec,
                                             visible_row)
from controller.domain.changes import ClusterChange
from controller.domain.values import TEMPLATE_FIELDS, DeploymentEvent, DeploymentSpec, DeploymentUpdate, Usage
from controller.usecases.ports import Signals
from controller.usecases.validation import check_name

# What a restart (`action="restart"`) says among an update's changes: a new revision of the same spec.
RESTARTED = "restart: every replica replaced by a new one, one at a time"

# What an update's request id is remembered as (`requests.remember`): what the call was.
Action = Literal["update", "rollback", "restart"]

# Fields whose change needs new replicas (a rolling update); every other field applies at once.
_FIELDS = ("replicas", "min_replicas", "priority", "preemptible", *TEMPLATE_FIELDS)


def spec_changes(old: DeploymentSpec, new: DeploymentSpec) -> list[str]:
    """One line per changed field: 'replicas: 2 -> 3', 'shard.hbm_gib: 16 -> 24'."""
    lines = []
    for name in _FIELDS:
        before, after = getattr(old, name), getattr(new, name)
        if name == "shard":
            for sub in before.__dataclass_fields__:
                b, a = getattr(before, sub), getattr(after, sub)
                if b != a:
                    lines.append(f"shard.{sub}: {_text(b)} -> {_text(a)}")
        elif before != after:
            lines.append(f"{name}: {_text(before)} -> {_text(after)}")
    return lines


def _text(value: object) -> str:
    if value is None:
        return "none"
    if hasattr(value, "domain"):  # a Spread
        return f"{value.domain} max {value.max_per_domain}"  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "any"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _held(row: m.Deployment) -> float:
    return sum(repo.placement_milli(row, p) for p in row.placements) / 1000.0


def _check_cap(code: str, cap_name: str, cap: float | None, *, spec: DeploymentSpec, asked: float,
               elsewhere: float, unit: str = "") -> None:
    """Refuse (RESOURCE_EXHAUSTED, with the numbers) when the tenant's total would exceed a cap."""
    total = elsewhere + asked
    if cap is None or total <= cap + 1e-6:
        return
    message = (f"deployment {spec.name}: {spec.replicas} replicas need {asked:g}{unit}; tenant {spec.tenant} "
               f"holds {elsewhere:g}{unit} elsewhere, {total:g}{unit} > {cap_name} {cap:g}{unit}")
    raise ResourceExhausted(message, reasons=(ReasonDetail(code, message, spec.tenant),))


async def check_contract(uow: UnitOfWork, who: Principal, row: m.Deployment, spec: DeploymentSpec) -> None:
    """Refuse an update that would break the tenant's caps or another tenant's reservation, in
    words `who` may read (a tenant token never learns who else is owed capacity)."""
    tenant = await repo.get_tenant(uow.session, spec.tenant)
    if tenant is None:
        raise NotFound(f"tenant {spec.tenant} not found")
    # Sums by the database of what the check compares, not `cluster_usage`'s row per (node, tenant)
    # of the whole cluster and every node's row (docs/benchmarks.md, `nodeusage`).
    held = _held(row)
    own = (await repo.tenant_usage(uow.session, [tenant.id])).get(tenant.id, Usage())
    accelerators, power = demand(spec)
    before_accelerators, before_power = demand(repo.deployment_spec(row))
    where = f"deployment {spec.name}"
    # Never below 0: the row's placements and the tenant's sums are two reads, each of the latest
    # commit, and a pass that released some of them between made it negative, and an update asking
    # more than the cap was taken (found in CI).
    if accelerators > before_accelerators + 1e-9:  # asking no more never breaks what it asked before
        _check_cap("QUOTA_ACCELERATORS", "max_accelerators", tenant.max_accelerators, spec=spec,
                   asked=accelerators, elsewhere=max(0.0, own.accelerators - held), unit=" accelerators")
    if power > before_power + 1e-9:
        placed_w = sum(repo.placement_power_w(row, p) for p in row.placements)
        _check_cap("QUOTA_POWER", "max_power_w", tenant.max_power_w, spec=spec,
                   asked=power, elsewhere=max(0.0, own.power_w - placed_w), unit=" W")
    # Growth is of the ask: what waited unplaced before the update was asked before it, and
    # the update takes nothing more by leaving it so (a new priority) or asking less. A
    # preemptible deployment made non-preemptible ("firming") asks all it holds afresh: a tenant
    # owed capacity could preempt its replicas to get it, and no longer can.
    growth = accelerators - before_accelerators
    firming = bool(row.preemptible) and not spec.preemptible
    if spec.preemptible or (growth <= 1e-9 and not firming):
        return
    held_text = f"{held:g} placed accelerators (of {accelerators:g})"
    unplaced = accelerators - held
    waiting = f" ({unplaced:g} not placed yet)" if unplaced > growth + 1e-9 else ""
    await check_owed_capacity(
        uow, who, tenant.id, asked=accelerators if firming else unplaced, power_w=spec.shard.power_w,
        returned=held if firming else 0.0,
        # What waited unplaced before is among the tenant's waiting asks (at the watts it drew): asked afresh here.
        own_waiting=0.0 if row.preemptible else max(0.0, before_accelerators - held), own_power_w=row.shard_power_w,
        asks=(f"{where}: becoming non-preemptible would keep {held_text} from capacity reserved for other "
              f"tenants, who may preempt them now" if firming else
              f"{where}: growing by {growth:g} accelerators{waiting} would take capacity reserved for other tenants"))


def _adoptable(row: m.Deployment, spec: DeploymentSpec, rolling: bool, running_old: set[int],
               restarted: int = 0) -> int | None:
    """The older revision still placed whose replicas are what `spec` asks (the newest such), if
    the update rolls: a rollback to the spec they run, whose replicas become the new revision's
    as they are (a Kubernetes Deployment's rollback makes the old ReplicaSet the new one) rather
    than each replaced by one alike; None: none. Never one older than `restarted` (the newest
    revision a restart made, `_restarted`): a restart asked for those replicas to be replaced,
    and they run the same spec as the restart's revision, so a later update back to it would
    otherwise keep them."""
    if not rolling:
        return None
    for revision, doc in sorted((row.revision_specs or {}).items(), key=lambda item: -int(item[0])):
        if int(revision) < restarted:
            break
        if int(revision) in running_old and not spec.rolls_from(planning.spec_of_doc(doc)):
            return int(revision)
    return None


def _adopted_change(adopted: int, revision: int) -> str:
    """What an update says of the replicas it adopts (`_adoptable`), among its changes."""
    return f"revision {adopted}'s replicas run this spec: they are revision {revision}'s, not replaced"


def _change(row: m.Deployment, old: DeploymentSpec, spec: DeploymentSpec, rolling: bool,
            running_old: set[int], adopted: int | None = None) -> None:
    """The row changed from `old` to `spec` (in memory): a new template revision when `rolling`,
    keeping the specs of the revisions still running (`running_old`: its placements' revisions)
    but `adopted`'s (`_adoptable`: its placements become the new revision's, the caller's
    `repo.adopt_revision`); the new resource version."""
    if rolling:
        specs = {k: v for k, v in (row.revision_specs or {}).items() if int(k) in running_old and int(k) != adopted}
        if row.template_revision in running_old:
            specs[str(row.template_revision)] = planning.deployment_doc(old)
        row.revision_specs = specs
        row.template_revision = row.template_revision + 1
    repo.write_deployment_spec(row, spec)
    repo.clear_failures(row)  # a changed spec is a fresh start: a FAILED deployment is placed again
    row.resource_version = row.resource_version + 1


async def _restarted(uow: UnitOfWork, row: m.Deployment) -> int:
    """The newest kept revision a restart made (0: none): the replicas of older ones are being
    replaced, never adopted back (`_adoptable`)."""
    return max((r.revision for r in await repo.stored_revisions(uow.session, row.id) if r.changes[:1] == (RESTARTED,)),
               default=0)


def check_changeable(row: m.Deployment) -> None:
    """FAILED_PRECONDITION for a deployment no update may change: being deleted, or quarantined."""
    if row.phase is m.DeploymentPhase.DELETING:
        raise FailedPrecondition(f"deployment {row.name} is being deleted")
    if row.phase is m.DeploymentPhase.QUARANTINED:
        raise FailedPrecondition(f"deployment {row.name} is quarantined: submit it again to replace it")


async def _keep_revisions(uow: UnitOfWork, row: m.Deployment, left: DeploymentSpec, made: DeploymentSpec,
                          changes: list[str], running_specs: dict[str, Any]) -> None:
    """The update rolled `row` from `left` to `made` (its `template_revision` now): both kept for
    rollout history and rollbacks (`usecases/revisions.py`), the one it left only if it never was
    (the first, at the deployment's creation; one made before revisions were kept, at no time),
    and so are older ones whose specs `revision_specs` held (`running_specs`) that never were."""
    was = row.template_revision - 1
    await repo.keep_revisions(uow.session, row.id, [
        *(repo.StoredRevision(int(revision), doc, None, ()) for revision, doc in running_specs.items()),
        repo.StoredRevision(was, planning.deployment_doc(left), repo.made_at(row, was), ()),
        repo.StoredRevision(row.template_revision, planning.deployment_doc(made), m.utcnow(), tuple(changes)),
    ])


async def update_deployment(uow: UnitOfWork, who: Principal, spec: DeploymentSpec, resource_version: int,
                            signals: Signals, request_id: str = "", *, dry_run: bool = False,
                            throttle: SubmitLimits | None = None, action: Action = "update") -> DeploymentUpdate:
    """`dry_run`: every check, then the deployment as the update would leave it (its changes,
    whether it rolls); nothing written (a request id used before answers as the write would; a
    new one is not remembered). `throttle`: a tenant token's update takes a token of its tenant's
    change rate first (a dry run does not), whatever becomes of it. `action`: what the request id
    is remembered as (a rollback's, `usecases/revisions.py`, is an update to an older template);
    "restart": a new revision of the spec even when nothing in it changes (`RESTARTED` first among
    the changes), rolled out as any template change, never adopting an older revision's replicas
    (`maiactl rollout restart`)."""
    check_name("deployment", spec.name)
    spec = as_caller(who, spec, "updating deployments")
    validate_spec(spec)
    requests.check_request_id(request_id)
    # A retry of an update that landed (its request id seen) is answered, not counted again; any
    # other takes its token before the deployment is looked up, so refused ones are counted too.
    restart = action == "restart"
    replayed = await requests.replayed(uow, spec.tenant, request_id, spec, action) is not None
    if throttle is not None and not dry_run and not replayed:
        throttle.check_change(who)
    row = await visible_row(uow, who, spec.tenant, spec.name, "updating deployments")  # names are per tenant
    if replayed:
        return DeploymentUpdate(await as_seen_by(uow, who, repo.deployment_view(row)))
    check_changeable(row)
    if resource_version <= 0:
        raise InvalidArgument(f"deployment {spec.name}: resource_version is required (the version the change is "
                              f"based on; it is at {row.resource_version})")
    if resource_version > row.resource_version:  # not a version it had: no change happened since
        raise Conflict(f"deployment {spec.name} has no resource version {resource_version} (it is at "
                       f"{row.resource_version}): read it again and re-apply the change")
    if resource_version != row.resource_version:
        raise Conflict(f"deployment {spec.name} changed since resource version {resource_version} "
                       f"(it is at {row.resource_version}): read it again and re-apply the change")
    old = repo.deployment_spec(row)
    changes = spec_changes(old, spec)
    if restart:
        changes.insert(0, RESTARTED)
    if not changes:
        return DeploymentUpdate(await as_seen_by(uow, who, repo.deployment_view(row)))
    tenant = await repo.get_tenant(uow.session, spec.tenant)
    if tenant is None:
        raise NotFound(f"tenant {spec.tenant} not found")
    await check_could_ever_fit(uow, spec, tenant.zones)
    await check_contract(uow, who, row, spec)
    rolling = restart or spec.rolls_from(old)
    loaded_revisions = {p.revision for p in row.placements}  # as read, without a lock
    restarted = await _restarted(uow, row) if rolling and not restart and row.revision_specs else 0
    adoptable = None if restart else _adoptable(row, spec, rolling, loaded_revisions, restarted)
    if dry_run:
        with uow.session.no_autoflush:  # the changes stay in memory, never sent
            _change(row, old, spec, rolling, loaded_revisions, adoptable)
            for p in row.placements:
                if p.revision == adoptable:
                    p.revision = row.template_revision
            view = repo.deployment_view(row)
        if adoptable is not None:
            changes.append(_adopted_change(adoptable, row.template_revision))
        await uow.rollback()
        return DeploymentUpdate(await as_seen_by(uow, who, view), tuple(changes), rolling)
    # Before the row's writes: the request id's DELETE below flushes them (PostgreSQL's lock order: store/changes.py).
    await repo.will_move_generation(uow.session)
    if adoptable is not None:  # placements first, as a plan commit takes them (store/changes.py)
        await repo.lock_revision_placements(uow.session, row.id, adoptable)
    if spec.shard != old.shard:  # the isolation trigger's columns: its lock before the row's (store/changes.py)
        await repo.will_change_deployment_shape(uow.session)
    # The version compared above was read without a lock: an update landing since (two applies at
    # once) was written over, both answered OK. Taken as the row's first write, judged as it lands.
    if not await repo.take_resource_version(uow.session, row.id, resource_version):
        if await requests.replayed(uow, spec.tenant, request_id, spec, action) is not None:
            # Its own first call, landed meanwhile (a retry sent while the first still ran).
            await uow.session.refresh(row, repo.DEPLOYMENT_COLUMN_ATTRIBUTES)  # as that call left it
            return DeploymentUpdate(await as_seen_by(uow, who, repo.deployment_view(row)))
        if not await repo.deployment_exists(uow.session, row.id):  # deleted and removed meanwhile
            seen_or_not_found(who, spec.tenant, spec.name, None)
        raise Conflict(f"deployment {spec.name} changed since resource version {resource_version} (another "
                       f"update landed meanwhile): read it again and re-apply the change")
    # What plan commits, report flushes, failures and deletions wrote since the row was read
    # leaves its resource version as it was: read again now that this transaction holds the row
    # (PostgreSQL's lock, SQLite's writer), or the update wrote the older copy back (a revision
    # placed meanwhile lost its spec, and its running replicas were stopped before any
    # replacement; a FAILED deployment stayed FAILED under its new spec), changed a deployment
    # being deleted, and answered (and told watchers) the placements as they were before.
    await uow.session.refresh(row, list(repo.UNVERSIONED_COLUMNS))
    check_changeable(row)  # marked DELETING (or quarantined) meanwhile: nothing written
    await repo.reload_placements(uow.session, row)
    running_old = {p.revision for p in row.placements}
    # Adopted only as locked: one retired meanwhile is gone, and another's placements are not held.
    adopted = adoptable if adoptable is not None and adoptable == _adoptable(
        row, spec, rolling, running_old, restarted) else None
    running_specs = dict(row.revision_specs or {})  # before `_change` drops those it leaves behind
    _change(row, old, spec, rolling, running_old, adopted)
    data: dict[str, object] = {"rolling": rolling, "resource_version": row.resource_version,
                               "revision": row.template_revision}
    if adopted is not None:
        await repo.adopt_revision(uow.session, row, adopted, row.template_revision)
        data["adopted_revision"] = adopted
        changes.append(_adopted_change(adopted, row.template_revision))
    if rolling:
        await _keep_revisions(uow, row, old, spec, changes, running_specs)
    await requests.remember(uow, spec.tenant, request_id, row.id, spec, action)
    await repo.bump_cluster_generation(uow.session, ClusterChange.deployment(spec.key))
    repo.record_event(uow.session, actor=who.name, kind="deployment.updated", object_kind="deployment",
                      object_id=spec.key, message="; ".join(changes), data={"changes": changes, **data})
    await uow.commit()
    view = repo.deployment_view(row)
    signals.publish(DeploymentEvent("modified", view))
    signals.wake_reconciler()
    return DeploymentUpdate(await as_seen_by(uow, who, view), tuple(changes), rolling)


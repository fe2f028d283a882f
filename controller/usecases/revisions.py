"""A deployment's revision history, rollbacks and restarts (`maiactl rollout history`, `rollout
undo`, `rollout restart`).

An update that rolls (a new template revision, `updates.py`) keeps the revision it makes, and the
one it leaves when that was never kept (a deployment's first revision is its row until it rolls;
one made by a controller older than this history has no time); the newest
`limits.REVISION_HISTORY` of a deployment are kept (`store/repositories/revisions.py`), as a
Kubernetes Deployment keeps its old ReplicaSets (`revisionHistoryLimit`, 10). A rollback is an
update to the current spec with a kept revision's template (shard, shards per replica,
locality, spread): the same checks, the same rollout (a new revision, or the replicas of that
revision still placed adopted as they run), audited as RollbackDeployment. A restart is an
update to the spec as it stands that rolls all the same: a new revision, every replica replaced
make-before-break (new processes, e.g. to load new weights at the same path), audited as
RestartDeployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from controller import limits
from controller.errors import FailedPrecondition, InvalidArgument, NotFound
from controller.identity import Principal, Role
from controller.ratelimit import SubmitLimits
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.usecases import planning, requests
from controller.usecases.deployments import visible_row
from controller.usecases.ports import Signals
from controller.usecases.redaction import as_seen_by
from controller.usecases.updates import check_changeable, update_deployment
from controller.usecases.validation import check_name
from controller.domain.values import DeploymentSpec, DeploymentUpdate, RevisionView, Rollback


async def list_revisions(uow: UnitOfWork, who: Principal, name: str, tenant: str = "") -> list[RevisionView]:
    """The deployment's kept revisions, newest first: the current one (its spec as it stands),
    then the older ones kept."""
    row = await visible_row(uow, who, tenant, name, "reading deployments")
    return _history(row, await repo.stored_revisions(uow.session, row.id))


def _history(row: m.Deployment, stored: Sequence[repo.StoredRevision]) -> list[RevisionView]:
    """The current revision, then the older ones newest first: those kept, and those whose replicas
    still run (`revision_specs`) that are not (made before revisions were kept: no time)."""
    current = row.template_revision
    own = next((r for r in stored if r.revision == current), None)
    made = own.created_at if own is not None else repo.made_at(row, current)
    older = {r.revision: r for r in stored if r.revision < current}
    for revision, doc in (row.revision_specs or {}).items():
        older.setdefault(int(revision), repo.StoredRevision(int(revision), doc, None, ()))
    return [RevisionView(current, repo.deployment_spec(row), made, own.changes if own is not None else (), True),
            *(RevisionView(r.revision, _spec(row, r), r.created_at, r.changes, False)
              for _, r in sorted(older.items(), reverse=True))]


def _spec(row: m.Deployment, stored: repo.StoredRevision) -> DeploymentSpec:
    """A kept revision's spec, named as its deployment is."""
    return replace(planning.spec_of_doc(stored.spec), tenant=row.tenant_id, name=row.name)


async def _take_change_token(uow: UnitOfWork, who: Principal, request_id: str, throttle: SubmitLimits | None,
                             dry_run: bool) -> None:
    """As an update does: a tenant token's call takes a token of its tenant's change rate before
    anything is looked up, so refused ones are counted too; a dry run, or a retry of a request id
    its tenant used already (answered, or refused as used for something else), takes none."""
    if throttle is None or dry_run or who.role is not Role.TENANT:
        return
    if not await requests.used(uow, who.tenant, request_id):
        throttle.check_change(who)


async def rollback_deployment(uow: UnitOfWork, who: Principal, name: str, signals: Signals, *, tenant: str = "",
                              to_revision: int = 0, resource_version: int = 0, request_id: str = "",
                              dry_run: bool = False, throttle: SubmitLimits | None = None) -> Rollback:
    """Rolls deployment `name` back to kept revision `to_revision`'s template (0: the newest kept
    before the current one with another template than the current one's): `update_deployment`
    to the current spec with that template."""
    check_name("deployment", name)
    if to_revision < 0:
        raise InvalidArgument(f"to_revision must be 0 (the revision before the current one) or a revision, "
                              f"got {to_revision}")
    if resource_version < 0:
        raise InvalidArgument(f"resource_version must be 0 (whatever is current) or a version, got {resource_version}")
    requests.check_request_id(request_id)
    await _take_change_token(uow, who, request_id, throttle, dry_run)
    row = await visible_row(uow, who, tenant, name, "updating deployments")
    current = repo.deployment_spec(row)
    if await requests.replayed(uow, row.tenant_id, request_id, current, "rollback") is not None:
        # The first call with this id landed and nothing changed the spec since: answered as it
        # stands, not rolled back once more (to the revision before, which is another one now).
        return Rollback(DeploymentUpdate(await as_seen_by(uow, who, repo.deployment_view(row))), row.template_revision)
    check_changeable(row)
    history = _history(row, await repo.stored_revisions(uow.session, row.id))
    if to_revision == 0:
        # The newest with another template: a revision made by a restart runs the one before it.
        target = next((v for v in history if not v.current and current.rolls_from(v.spec)), None)
        if target is None:
            raise FailedPrecondition(f"deployment {name} has no revision before {row.template_revision} with another "
                                     f"template to roll back to{_kept_text(history)}")
    else:
        target = next((v for v in history if v.revision == to_revision), None)
        if target is None:
            raise NotFound(f"deployment {name} has no revision {to_revision} kept{_kept_text(history)}")
    update = await update_deployment(uow, who, current.with_template_of(target.spec),
                                     resource_version or row.resource_version, signals, request_id=request_id,
                                     dry_run=dry_run, action="rollback")
    return Rollback(update, target.revision)


def _kept_text(history: Sequence[RevisionView]) -> str:
    kept = ", ".join(str(v.revision) for v in sorted(history, key=lambda v: v.revision))
    return f" (kept: {kept}; the newest {limits.REVISION_HISTORY} of a deployment are kept)"


async def restart_deployment(uow: UnitOfWork, who: Principal, name: str, signals: Signals, *, tenant: str = "",
                             resource_version: int = 0, request_id: str = "", dry_run: bool = False,
                             throttle: SubmitLimits | None = None) -> DeploymentUpdate:
    """Replaces every replica of deployment `name`, one at a time, make-before-break: a new
    revision of the spec as it stands (`update_deployment(action="restart")`)."""
    check_name("deployment", name)
    if resource_version < 0:
        raise InvalidArgument(f"resource_version must be 0 (whatever is current) or a version, got {resource_version}")
    requests.check_request_id(request_id)
    await _take_change_token(uow, who, request_id, throttle, dry_run)
    row = await visible_row(uow, who, tenant, name, "updating deployments")
    return await update_deployment(uow, who, repo.deployment_spec(row), resource_version or row.resource_version,
                                   signals, request_id=request_id, dry_run=dry_run, action="restart")

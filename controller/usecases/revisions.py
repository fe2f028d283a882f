"""A deployment's revision history and rollbacks (`maiactl rollout history`, `rollout undo`).

An update that rolls (a new template revision, `updates.py`) keeps the revision it makes, and the
one it leaves when that was never kept (a deployment's first revision is its row until it rolls;
one made by a controller older than this history has no time); the newest
`limits.REVISION_HISTORY` of a deployment are kept (`store/repositories/revisions.py`), as a
Kubernetes Deployment keeps its old ReplicaSets (`revisionHistoryLimit`, 10). A rollback is an
update to the current spec with a kept revision's template (shard, shards per replica,
locality, spread): the same checks, the same rollout (a new revision, or the replicas of that
revision still placed adopted as they run), audited as RollbackDeployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from controller import limits
from controller.errors import FailedPrecondition, InvalidArgument, NotFound
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.usecases import planning, requests
from controller.usecases.deployments import visible_row
from controller.usecases.ports import Signals
from controller.usecases.redaction import as_seen_by
from controller.usecases.updates import update_deployment
from controller.usecases.validation import check_name
from controller.domain.values import DeploymentSpec, DeploymentUpdate, RevisionView, Rollback


async def list_revisions(uow: UnitOfWork, who: Principal, name: str, tenant: str = "") -> list[RevisionView]:
    """The deployment's kept revisions, newest first: the current one (its spec as it stands),
    then the older ones kept."""
    row = await visible_row(uow, who, tenant, name, "reading deployments")
    return _history(row, await repo.stored_revisions(uow.session, row.id))


def _history(row: m.Deployment, stored: Sequence[repo.StoredRevision]) -> list[RevisionView]:
    current = row.template_revision
    own = next((r for r in stored if r.revision == current), None)
    made = own.created_at if own is not None else (m.as_utc(row.created_at) if current == 1 else None)
    views = [RevisionView(current, repo.deployment_spec(row), made, own.changes if own is not None else (), True)]
    views += [RevisionView(r.revision, _spec(row, r), r.created_at, r.changes, False)
              for r in stored if r.revision < current]
    return views


def _spec(row: m.Deployment, stored: repo.StoredRevision) -> DeploymentSpec:
    """A kept revision's spec, named as its deployment is."""
    return replace(planning.spec_of_doc(stored.spec), tenant=row.tenant_id, name=row.name)


async def rollback_deployment(uow: UnitOfWork, who: Principal, name: str, signals: Signals, *, tenant: str = "",
                              to_revision: int = 0, resource_version: int = 0, request_id: str = "",
                              dry_run: bool = False, throttle: SubmitLimits | None = None) -> Rollback:
    """Rolls deployment `name` back to kept revision `to_revision`'s template (0: the newest kept
    before the current one): `update_deployment` to the current spec with that template."""
    check_name("deployment", name)
    if to_revision < 0:
        raise InvalidArgument(f"to_revision must be 0 (the revision before the current one) or a revision, "
                              f"got {to_revision}")
    if resource_version < 0:
        raise InvalidArgument(f"resource_version must be 0 (whatever is current) or a version, got {resource_version}")
    row = await visible_row(uow, who, tenant, name, "updating deployments")
    requests.check_request_id(request_id)
    if await requests.replayed(uow, row.tenant_id, request_id, repo.deployment_spec(row), "update") is not None:
        # The first call with this id landed and nothing changed the spec since: answered as it
        # stands, not rolled back once more (to the revision before, which is another one now).
        view = await as_seen_by(uow, who, repo.deployment_view(row))
        return Rollback(DeploymentUpdate(view), row.template_revision)
    history = _history(row, await repo.stored_revisions(uow.session, row.id))
    older = [v for v in history if not v.current]
    if to_revision == 0:
        if not older:
            raise FailedPrecondition(f"deployment {name} has no revision before {row.template_revision} to roll "
                                     f"back to" + _kept_text(history))
        target = older[0]
    else:
        target = next((v for v in history if v.revision == to_revision), None)
        if target is None:
            raise NotFound(f"deployment {name} has no revision {to_revision} kept{_kept_text(history)}")
    spec = repo.deployment_spec(row).with_template_of(target.spec)
    update = await update_deployment(uow, who, spec, resource_version or row.resource_version, signals,
                                     request_id=request_id, dry_run=dry_run, throttle=throttle)
    return Rollback(update, target.revision)


def _kept_text(history: Sequence[RevisionView]) -> str:
    kept = ", ".join(str(v.revision) for v in sorted(history, key=lambda v: v.revision))
    return f" (kept: {kept}; the newest {limits.REVISION_HISTORY} of a deployment are kept)"

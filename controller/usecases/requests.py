"""Client request ids: a submit or update retried with the same id changes nothing twice.

A client (maiactl sets one per apply) sends an id with a write; the first call records it with
a digest of the spec it carried, in the same transaction as the write. A retry with the same id
is answered with the deployment as it stands now and writes nothing; the same id with another
spec (or for another deployment or action) is refused, naming what the id was first used for.
An id outlives its deployment: a retry after the deployment was deleted is refused (it was
applied once), for `limits.REQUEST_ID_RETENTION_S` after the request; then the id is forgotten.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from controller import limits
from controller.errors import FailedPrecondition, FieldViolation, InvalidArgument
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.store.riders import Rider
from controller.store.unnest import InsertRows
from controller.usecases import planning
from controller.domain.values import DeploymentSpec
from controller.usecases.validation import check_text

REQUEST_ID_MAX = limits.ID_MAX


def check_request_id(request_id: str) -> None:
    if request_id:
        try:
            if len(request_id) > REQUEST_ID_MAX:
                raise InvalidArgument(f"client_request_id is {len(request_id)} characters long; "
                                      f"at most {REQUEST_ID_MAX}")
            check_text("client_request_id", request_id, REQUEST_ID_MAX)
        except InvalidArgument as exc:
            raise InvalidArgument(exc.message, violations=(FieldViolation("client_request_id", exc.message),)) from None


def spec_digest(spec: DeploymentSpec) -> str:
    doc = planning.deployment_doc(spec)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def used(uow: UnitOfWork, tenant: str, request_id: str) -> bool:
    """Whether `tenant` used `request_id` already (for anything)."""
    return bool(request_id) and await uow.session.get(m.ClientRequest, (tenant, request_id)) is not None


# How a refusal names what an id was used for, where the action's word is not the verb.
_VERB = {"rollback": "roll back"}


async def replayed(uow: UnitOfWork, tenant: str, request_id: str, spec: DeploymentSpec,
                   action: str) -> m.Deployment | None:
    """The deployment a first call with this id wrote (None: the id is new, or empty)."""
    if not request_id:
        return None
    seen = await uow.session.get(m.ClientRequest, (tenant, request_id))
    if seen is None:
        return None
    row = await uow.session.get(m.Deployment, seen.deployment_id) if seen.deployment_id is not None else None
    verb = _VERB.get(seen.action, seen.action)
    used_to = f"client_request_id {request_id!r} was already used by tenant {tenant} to {verb}"
    if row is None:
        if m.utcnow() - m.as_utc(seen.created_at) >= timedelta(seconds=limits.REQUEST_ID_RETENTION_S):
            return None  # forgotten: this write's `remember` deletes the old record before it records the id
        raise FailedPrecondition(f"{used_to} deployment {seen.deployment_name}, which has been deleted since; use a "
                                 f"new id for a new request")
    # A restart carries no spec of its own (the deployment's as it stood): its retry is the same
    # request whatever changed the spec since.
    same_spec = action == "restart" or seen.spec_sha256 == spec_digest(spec)
    if seen.action != action or row.name != spec.name or not same_spec:
        raise FailedPrecondition(f"{used_to} deployment {row.name} with a different spec; use a new id for a "
                                 f"different request")
    return row


async def remember(uow: UnitOfWork, tenant: str, request_id: str, deployment_id: int, spec: DeploymentSpec,
                   action: str) -> None:
    """Record the id in the caller's transaction (with the write it belongs to), and forget the
    tenant's ids of deleted deployments older than the retention."""
    for rider in remembering([(tenant, request_id, deployment_id, spec)], action):
        await rider.write(uow.session)


def remembering(writes: list[tuple[str, str, int, DeploymentSpec]], action: str) -> tuple[Rider, Rider]:
    """`remember` for several writes (tenant, request id, deployment id, spec) of one transaction,
    those without a request id skipped: its writes, in their order, for the caller to send
    (`riders`: in a statement that carries them, `audit.append(along=)`): the tenants' expired ids
    forgotten, the new ids."""
    writes = [w for w in writes if w[1]]
    at = m.utcnow()
    return (repo.ForgetRequestIds(tuple(dict.fromkeys(w[0] for w in writes)),
                                  at - timedelta(seconds=limits.REQUEST_ID_RETENTION_S)),
            InsertRows(m.ClientRequest.__table__, [
                {"tenant_id": tenant, "request_id": request_id, "deployment_id": deployment_id,
                 "deployment_name": spec.name, "action": action, "spec_sha256": spec_digest(spec), "created_at": at}
                for tenant, request_id, deployment_id, spec in writes]))

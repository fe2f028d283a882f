"""The events history (what happened to deployments, nodes, tenants), read for operators."""

from __future__ import annotations

from dataclasses import dataclass

from controller import limits
from controller.errors import InvalidArgument, NotFound, OutOfRange, PermissionDenied
from controller.identity import Principal, Role
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.store.retention import events_deleted_through
from controller.usecases import customers, policy
from controller.usecases.deployments import resolve_tenant
from controller.domain.values import EventView, deployment_key
from controller.usecases.redaction import redactor_of
from controller.usecases.validation import check_id, check_name

OBJECT_KINDS = ("deployment", "node", "tenant", "topology")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class EventsRead:
    """The events one ListEvents returns, and the highest id in the history when it read them
    (`read_through`, of any object): a follower of a quiet object's events asks after it once
    it has settled, as after the ids it has seen (`controller.cli.follow`), and so never falls
    behind the retention mark."""

    events: list[EventView]
    read_through: int


async def list_events(uow: UnitOfWork, who: Principal, *, object_kind: str = "", object_id: str = "",
                      tenant: str = "", after_id: int = 0, limit: int = 0,
                      oldest_first: bool = False) -> EventsRead:
    """Events of the history `who` may read. After an id retention has deleted past (`after_id`
    below the mark), OUT_OF_RANGE: some of those after it may be gone, and answering the rest as
    if they were all would hide that."""
    if object_kind and object_kind not in OBJECT_KINDS:
        raise InvalidArgument(f"object_kind {object_kind!r}: expected one of {', '.join(OBJECT_KINDS)}")
    if object_id and not object_kind:
        raise InvalidArgument("object_id needs object_kind")
    if tenant and not (object_kind == "deployment" and object_id and "/" not in object_id):
        raise InvalidArgument("tenant goes with object_kind deployment and a deployment name as object_id")
    if limit < 0 or after_id < 0:
        raise InvalidArgument("limit and after_id must not be negative")
    object_id = await _check_visible(uow, who, object_kind, object_id, tenant)
    # A tenant token reads its own customer's events, not those of the tenant id's customer before.
    owner = object_id.partition("/")[0] if object_kind == "deployment" else object_id
    since = await customers.reads_since(uow, who, owner, None)
    newest = await repo.newest_event_id(uow.session)  # before the events: each up to it committed is read
    limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
    events = await repo.list_events(uow.session, object_kind=object_kind, object_id=object_id, after_id=after_id,
                                    limit=limit, since=since, oldest_first=oldest_first)
    # The mark read after the events: a batch that deleted any before this read raised it first.
    deleted = await events_deleted_through(uow.session)
    if 0 < after_id < deleted:
        raise OutOfRange(f"events after id {after_id} were deleted by the controller's event retention "
                         f"(--event-ttl) up to id {deleted}; ask after id {deleted}, or without after_id",
                         metadata=((limits.EVENTS_DELETED_THROUGH_METADATA_KEY, str(deleted)),))
    last = events[-1].id if events else 0
    # A full page of the oldest after an id read only as far as its last (the newest `limit` read all).
    cut = len(events) == limit and (after_id > 0 or oldest_first)
    read_through = last if cut else max(newest, last)
    if not who.is_admin:  # not the newest id of the whole history (every tenant's rate of events): as
        # far as its own last or the mark (which an OUT_OF_RANGE tells anyone), so that a follower of
        # a quiet deployment still never falls behind the mark
        read_through = min(read_through, max(last, deleted))
    redactor = await redactor_of(uow, who)  # an unplaceable deployment's event quotes the solver's reasons
    return EventsRead([redactor.event(e) for e in events], read_through)


async def _check_visible(uow: UnitOfWork, who: Principal, object_kind: str, object_id: str, tenant: str) -> str:
    """Admins read every event; a tenant token only those of one of its own deployments or of its
    own tenant (the history names other tenants' deployments and nodes); other roles none.

    Returns the object id to look up: a deployment is named `TENANT/NAME` in the history; the
    caller may say `NAME` alone, with `tenant` or without (its own tenant's, or for an admin the
    only tenant's of that name).
    """
    if object_kind == "deployment" and object_id:
        return await _deployment_key(uow, who, deployment_key(tenant, object_id) if tenant else object_id)
    if object_id:  # as each kind's own calls check it (a NUL reached PostgreSQL: INTERNAL)
        check_id(object_kind, object_id)
    if who.is_admin:
        return object_id
    policy.require_role(who, "listing events", Role.TENANT)
    if object_kind == "tenant" and object_id:
        policy.visible_tenant(who, object_id, "listing events")  # another tenant's: NOT_FOUND
        return object_id
    raise PermissionDenied("a tenant token lists the events of one of its own deployments "
                           "(object_kind deployment, object_id NAME) or of its tenant; the rest needs an admin token")


async def _deployment_key(uow: UnitOfWork, who: Principal, object_id: str) -> str:
    """The history's key of the deployment `object_id` (`TENANT/NAME` or `NAME`) names, if `who`
    may see it: another tenant's is NOT_FOUND. An admin may name one that no longer exists."""
    tenant, _, name = object_id.rpartition("/")
    if who.is_admin and tenant:
        check_id("tenant", tenant)
        check_name("deployment", name)
        return object_id
    policy.require_role(who, "listing events", Role.TENANT)
    tenant = await resolve_tenant(uow, who, tenant, name, "listing events")
    if not who.is_admin and await repo.get_deployment(uow.session, tenant, name) is None:
        raise NotFound(f"deployment {name} not found")
    return deployment_key(tenant, name)

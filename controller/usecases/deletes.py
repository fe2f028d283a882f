"""Group commit of deletions: concurrent DeleteDeployment calls marked DELETING in one transaction.

A deletion moves the cluster generation (the reconciler's warm cache reads what changed), and
plan commits wait for that row from the bump to the commit; one transaction per deletion so
queued every plan commit behind a stream of them, and its unit of work (pool checkout, BEGIN,
the reads, the writes, COMMIT: each a turn of a busy event loop) was most of the unary handlers'
event-loop time under `bench e2e` (docs/benchmarks.md, 2026-12-01 day (deletes)). Here a delete
checks what needs no read (the name, the tenant a token may name), then joins a
`groupcommit.GroupCommit` as submits do (`usecases.submits`); one writer at a time takes what
is queued and, in ONE transaction, reads every member's deployment at once (plain columns with
its placements, no ORM entities: `repo.deployments_named`), marks those that exist and are not
DELETING yet (one event and one audit entry each, ONE generation bump logging every key),
commits, tells the watchers in one notification and wakes the reconciler once. Its writes read
nothing back (`mark_deleting`, `audit.append(unread=True)`): on SQLite they all go with the
COMMIT, one trip to SQLite's thread while the batch holds the writer instead of four, each a
turn of a busy event loop. That matters because a batch is often of one: the group commit has no
timer, so deletes are batched only when they arrive while a batch commits (a client deleting one
deployment after another, as `bench e2e`'s deleter does, makes batches of one, 12.8 ms each of
SQLite's writer at saturation: docs/benchmarks.md, `sqlcpu`, `delbatch`).

Each caller gets what a lone delete (`deployments.delete_deployment`) would have given it:
- a deployment that does not exist, or that the caller may not see: the lone NOT_FOUND;
- one already DELETING: its view, nothing written (idempotent, as alone);
- an admin who names no tenant: the one tenant with a deployment of that name (the batch reads
  the owners of all its names in its one query), NOT_FOUND or the lone FAILED_PRECONDITION
  naming the tenants when none or several have one;
- the same name twice never shares a batch (the group commit's key is the name: whichever tenant
  a call means, or finds): the second is answered after the first committed, as if they came one
  after the other;
- every member of a batch that fails to commit goes alone (nothing of it was written: one
  transaction); so does every member of a batch whose audit compare and set missed on SQLite
  (the head this process wrote last was not the database's: a rolled-back transaction left it);
- a deployment is marked once: a mark that finds it DELETING already (marked by another
  transaction since it was read: a member gone alone and a later batch with its name) fails its
  transaction whole (`repo.set_deleting`); a batch's members then go alone, and a lone delete
  reads it again and answers as for one already DELETING (`delete_deployment_alone`);
- a deployment removed since it was read (marked and removed by the reconciler meanwhile) is
  not marked either: its event's INSERT fails the transaction whole (`repo.deleting_events`),
  and the lone delete reads again and answers NOT_FOUND, as for one that was never there.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.domain.values import DeploymentEvent, DeploymentView, deployment_key
from controller.errors import MaiaError
from controller.groupcommit import GroupCommit, GroupStats, by_member, outcome_or_alone
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import audit
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork
from controller.store.marks import deferred_writes
from controller.store.turns import answering
from controller.usecases import policy
from controller.usecases.deployments import (DELETING, delete_deployment_alone, mark_deleting, only_owner,
                                             seen_or_not_found)
from controller.usecases.ports import Signals
from controller.usecases.redaction import NOTHING, Redactor, redactor_for
from controller.usecases.validation import check_name, check_optional_id

BATCH_MAX = 256


@dataclass
class QueuedDelete:
    who: Principal
    tenant: str                   # the tenant the caller means (its own for a tenant token; "": an admin naming none)
    name: str
    call: audit.CallEntry | None  # the RPC's audit entry, written with the change

    @property
    def key(self) -> str:
        return deployment_key(self.tenant, self.name)

    def tenant_in(self, owners: dict[str, list[str]]) -> str:
        """The tenant meant: named, or (an admin naming none) the one of `owners` (by name)."""
        return self.tenant or only_owner(self.name, owners.get(self.name, []))


class DeleteBatcher:
    """Deletions marked and committed together (see the module docstring); the queue and the
    writer are `groupcommit.GroupCommit`'s."""

    def __init__(self, db: Database, signals: Signals, *, batch_max: int = BATCH_MAX) -> None:
        self._db = db
        self._signals = signals
        self._group: GroupCommit[QueuedDelete, DeploymentView] = GroupCommit(
            "delete-batches",
            # callers wait for the commit: before reports and passes (a lambda: tests replace commit_batch)
            by_member(lambda batch: self.commit_batch(batch), within=answering), batch_max=batch_max,
            key=lambda q: q.name, left=lambda q, batch: audit.carried_by(q.call, batch))

    @property
    def stats(self) -> GroupStats:
        return self._group.stats

    async def delete(self, who: Principal, name: str, tenant: str = "",
                     throttle: SubmitLimits | None = None) -> DeploymentView:
        """What `deployments.delete_deployment` does, committed in a batch (`throttle`: a tenant
        token's deletion takes a token of its tenant's change rate first)."""
        check_name("deployment", name)
        check_optional_id("tenant", tenant)
        if throttle is not None:
            throttle.check_change(who)
        meant = policy.visible_tenant(who, tenant, DELETING)
        view = await outcome_or_alone(self._group, QueuedDelete(who, meant, name, audit.current_call()))
        if view is not None:
            return view
        return await delete_deployment_alone(self._db, who, name, self._signals, tenant=tenant)

    async def commit_batch(self, batch: list[QueuedDelete]) -> dict[int, DeploymentView | MaiaError]:
        """Mark the members' deployments DELETING in one transaction; returns by id(member) the
        view each caller reads, or the error that refused it."""
        async with self._db.unit_of_work() as uow:
            s = uow.session
            found = {deployment_key(named.row.tenant_id, named.row.name): named
                     for named in await repo.deployments_named(s, {q.name for q in batch})}
            owners: dict[str, list[str]] = {}
            for named in sorted(found.values(), key=lambda named: named.row.tenant_id):
                owners.setdefault(named.row.name, []).append(named.row.tenant_id)
            outcomes: dict[int, DeploymentView | MaiaError] = {}
            seen: dict[int, repo.NamedDeployment] = {}
            for queued in batch:
                try:
                    tenant = queued.tenant_in(owners)
                    named = found.get(deployment_key(tenant, queued.name))
                    seen_or_not_found(queued.who, tenant, queued.name, named.row if named else None)
                    seen[id(queued)] = named  # found and visible: seen_or_not_found raised otherwise
                except MaiaError as exc:
                    outcomes[id(queued)] = exc
            marking = [q for q in batch if id(q) in seen and seen[id(q)].row.phase is not m.DeploymentPhase.DELETING]
            redactors = await self._redactors(uow, [q for q in batch if id(q) in seen and seen[id(q)].row.reasons])
            calls = [q.call for q in marking if q.call is not None]
            marked_at = None
            if marking:
                with deferred_writes(postgresql=True):  # the batch fails or commits whole
                    # an audit head missed (SQLite): the members go alone
                    marked_at = await mark_deleting(uow, [(seen[id(q)].row, q.who.name) for q in marking], calls)
                await uow.commit()
            marked = {id(q) for q in marking}
            views = {i: repo.deleting_view(named, marked_at) if i in marked else named.view()  # type: ignore[arg-type]
                     for i, named in seen.items()}
        for call in calls:
            call.written = True
        self._signals.publish(*(DeploymentEvent("modified", view) for view in views.values()))
        if marking:
            self._signals.wake_reconciler()
        return outcomes | {i: redactors.get(i, NOTHING).deployment(view) for i, view in views.items()}

    @staticmethod
    async def _redactors(uow: UnitOfWork, readers: list[QueuedDelete]) -> dict[int, Redactor]:
        """What each member whose view has reasons may read of them (one read of the tenant ids,
        the deleted ones included, only when a tenant token is among them: `redaction.redactor_of`)."""
        tenants = [q for q in readers if not q.who.is_admin and q.who.tenant]
        if not tenants:
            return {}
        tenant_ids = await repo.known_tenant_ids(uow.session)
        return {id(q): redactor_for(q.who, tenant_ids) for q in tenants}

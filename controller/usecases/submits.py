"""Group commit of submits: concurrent submits written in one transaction.

A submit is a handful of reads (the checks) and a handful of writes (the deployment, its
request id, its event, the call's audit entry), and every write transaction takes the
database's single writer (SQLite's lock, PostgreSQL's audit chain head row) from its first
write to its commit. One transaction per submit so caps the submit rate at the writer's turn
time, whatever the cluster. Here each submit runs its checks on its own, concurrently
(`deployments.admit`, reads only), then joins a queue; one writer at a time takes everything
queued (what arrived while the previous batch was committing: no fixed wait) and commits it as
ONE transaction: every deployment, every request id, one event and one audit entry each (each
call's own, appended to the chain in order), then answers each caller.

Every guarantee of a lone submit holds, because anything a batch cannot decide on its own is
decided by the lone submit itself (`deployments.submit_deployment`, in the caller's task, after
the batch committed, so exactly as if the submits had come one after the other):
- in the transaction, the batch reads again what the checks read that another write could have
  changed since: which names exist (a name taken meanwhile, or twice in the batch), the
  tenants' deployment counts (the batch's own included), which request ids were used;
  a member that conflicts is handed back and goes alone (its ALREADY_EXISTS, its replayed
  answer or its RESOURCE_EXHAUSTED are the lone path's);
- a quarantined deployment submitted again (a delete and an insert) goes alone;
- a batch that fails to commit writes nothing (one transaction) and every member goes alone:
  one bad member never fails the others;
- a caller is answered only after the commit that holds its deployment and its audit entry.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from controller import limits
from controller.domain.values import DeploymentEvent, DeploymentSpec, DeploymentView
from controller.groupcommit import ALONE, GroupCommit, GroupStats
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import audit
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import requests
from controller.usecases.capacity import CapacityCache
from controller.usecases.deployments import admit, submit_deployment, submitted_event
from controller.usecases.ports import Signals

BATCH_MAX = 256


@dataclass
class Queued:
    spec: DeploymentSpec
    request_id: str
    actor: str
    call: audit.CallEntry | None  # the RPC's audit entry, written with the deployment


class SubmitBatcher:
    """Submits checked concurrently, committed together (see the module docstring); the
    queue and the writer are `groupcommit.GroupCommit`'s."""

    def __init__(self, db: Database, signals: Signals, *, batch_max: int = BATCH_MAX) -> None:
        self._db = db
        self._signals = signals
        self._group: GroupCommit[Queued, DeploymentView] = GroupCommit(
            "submit-batches", self._commit_group, batch_max=batch_max)

    @property
    def stats(self) -> GroupStats:
        return self._group.stats

    async def submit(self, who: Principal, spec: DeploymentSpec, *, throttle: SubmitLimits | None = None,
                     capacity: CapacityCache | None = None, request_id: str = "") -> DeploymentView:
        """What `deployments.submit_deployment` does, committed in a batch."""
        async with self._db.unit_of_work() as uow:
            admitted = await admit(uow, who, spec, throttle, capacity, request_id)
        if admitted.replay is not None:
            return admitted.replay
        if admitted.replaced is None:
            queued = Queued(admitted.spec, request_id, who.name, audit.current_call())
            try:
                # Shielded: a member its caller left is still written with its batch.
                view = await asyncio.shield(self._group.submit(queued))
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the caller itself was cancelled
                view = None  # the writer was stopped (the controller stops): go alone
            if view is not None:
                return view
        async with self._db.unit_of_work() as uow:  # the tenant's submit rate was charged above
            return await submit_deployment(uow, who, admitted.spec, self._signals, capacity=capacity,
                                           request_id=request_id)

    async def _commit_group(self, batch: list[Queued]) -> list[DeploymentView | None]:
        views = await self.commit_batch(batch)
        return [views.get(id(q), ALONE) for q in batch]

    async def commit_batch(self, batch: list[Queued]) -> dict[int, DeploymentView]:
        """Write the members nothing changed for since their checks, in one transaction; returns
        their views by id(member). The others are left out (they go alone)."""
        async with self._db.unit_of_work() as uow:
            s = uow.session
            keys = [(q.spec.tenant, q.spec.name) for q in batch]
            taken = await repo.existing_deployment_keys(s, keys)
            used = await repo.existing_request_ids(s, [(q.spec.tenant, q.request_id) for q in batch])
            counts = Counter(await repo.count_deployments_of_tenants(s, {q.spec.tenant for q in batch}))
            accepted: list[Queued] = []
            for queued, key in zip(batch, keys):
                request_key = (queued.spec.tenant, queued.request_id)
                if (key in taken or (queued.request_id and request_key in used)
                        or counts[queued.spec.tenant] >= limits.DEPLOYMENTS_PER_TENANT_MAX):
                    continue
                taken.add(key)
                used.add(request_key)
                counts[queued.spec.tenant] += 1
                accepted.append(queued)
            if not accepted:
                return {}
            rows = [repo.new_deployment_row(q.spec) for q in accepted]
            s.add_all(rows)
            await s.flush()
            await requests.remember_all(uow, [(q.spec.tenant, q.request_id, row.id, q.spec)
                                              for q, row in zip(accepted, rows)], "submit")
            for queued in accepted:
                submitted_event(uow, queued.actor, queued.spec)
            calls = [q.call for q in accepted if q.call is not None]
            await audit.append(s, [c.record for c in calls])
            await uow.commit()
        for call in calls:
            call.written = True
        views = {id(q): repo.deployment_view(row) for q, row in zip(accepted, rows)}
        for view in views.values():
            self._signals.publish(DeploymentEvent("added", view))
        self._signals.wake_reconciler()
        return views

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
import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field

from controller import limits
from controller.domain.values import DeploymentEvent, DeploymentSpec, DeploymentView
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import audit
from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import requests
from controller.usecases.capacity import CapacityCache
from controller.usecases.deployments import admit, submit_deployment, submitted_event
from controller.usecases.ports import Signals

log = logging.getLogger("maia.submits")

BATCH_MAX = 256


@dataclass
class Queued:
    spec: DeploymentSpec
    request_id: str
    actor: str
    call: audit.CallEntry | None  # the RPC's audit entry, written with the deployment
    answer: asyncio.Future[DeploymentView | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class BatchStats:
    batches: int = 0
    committed: int = 0
    alone: int = 0     # handed back to the lone path (a conflict, or a failed batch)
    largest: int = 0


class SubmitBatcher:
    """Submits checked concurrently, committed together (see the module docstring)."""

    def __init__(self, db: Database, signals: Signals, *, batch_max: int = BATCH_MAX) -> None:
        self._db = db
        self._signals = signals
        self._batch_max = batch_max
        self._queue: list[Queued] = []
        self._writer: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    async def submit(self, who: Principal, spec: DeploymentSpec, *, throttle: SubmitLimits | None = None,
                     capacity: CapacityCache | None = None, request_id: str = "") -> DeploymentView:
        """What `deployments.submit_deployment` does, committed in a batch."""
        async with self._db.unit_of_work() as uow:
            admitted = await admit(uow, who, spec, throttle, capacity, request_id)
        if admitted.replay is not None:
            return admitted.replay
        if admitted.replaced is None:
            queued = Queued(admitted.spec, request_id, who.name, audit.current_call())
            self._queue.append(queued)
            if self._writer is None:
                # A context of its own: the writer is nobody's call (it writes their entries itself).
                self._writer = asyncio.create_task(self._write(), name="submit-batches",
                                                   context=contextvars.Context())
            view = await asyncio.shield(queued.answer)
            if view is not None:
                return view
        self.stats.alone += 1
        async with self._db.unit_of_work() as uow:  # the tenant's submit rate was charged above
            return await submit_deployment(uow, who, admitted.spec, self._signals, capacity=capacity,
                                           request_id=request_id)

    async def _write(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self._batch_max], self._queue[self._batch_max:]
                try:
                    views = await self.commit_batch(batch)
                except Exception as exc:  # nothing written: each member is decided alone
                    log.warning("a batch of %d submits did not commit (%s: %s); each goes alone",
                                len(batch), type(exc).__name__, exc)
                    views = {}
                for queued in batch:
                    if not queued.answer.done():
                        queued.answer.set_result(views.get(id(queued)))
        finally:
            self._writer = None
            for queued in self._queue:  # cancelled (the controller stops): the callers go alone
                if not queued.answer.done():
                    queued.answer.set_result(None)
            self._queue = []

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
        self.stats.batches += 1
        self.stats.committed += len(accepted)
        self.stats.largest = max(self.stats.largest, len(accepted))
        return views

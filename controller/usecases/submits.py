"""Group commit of submits: concurrent submits checked and written in one transaction.

A submit is a handful of reads (the checks) and a handful of writes (the deployment, its
request id, its event, the call's audit entry), and every write transaction takes the
database's single writer (SQLite's lock, PostgreSQL's audit chain head row) from its first
write to its commit. One transaction per submit so caps the submit rate at the writer's turn
time, whatever the cluster. Here a submit checks what it can on its own (the spec, the request
id's form: no reads), then joins a queue; one writer at a time takes everything queued (what
arrived while the previous batch was committing: no fixed wait; under a load that fills batches,
one no sooner than `SPACING`'s period after the one before began) and, in ONE transaction, reads
what the checks need for the whole batch at once (the tenants, which names exist, which
request ids were used, the tenants' deployment counts, the capacity generation), judges each
member in order as a lone submit would (the tenant's submit rate, "could it ever fit" from the
capacity aggregates, the tenant's limit with the batch's own counted), writes the members that
pass (every deployment, every request id, one event and one audit entry each: each call's own,
appended to the chain in order) and then answers each caller. A submit so costs the event loop
no unit of work of its own: under load each round trip to the database is a turn of a busy
loop, and the reads of a lone check were most of a submit's time (docs/benchmarks.md,
2026-12-01 day). For the same reason the batch's writes read nothing back: its read also gives the
ids its deployments take (`tenants.SubmitBatchReads.deployment_ids`: on SQLite from above every id
AUTOINCREMENT ever gave, `sqlite_sequence`; on PostgreSQL taken from the table's sequence), and
its INSERT waits for the next message (`marks.deferred_writes`). On SQLite every write goes to
SQLite's thread with the COMMIT, the audit append `unread` too: the batch holds the writer for that
one trip (two before: the INSERT, then the COMMIT; docs/benchmarks.md, `p99tail`). On PostgreSQL the
INSERT goes in BEGIN's message, then the audit append reads back (a head moved by a plan commit
costs it one statement in place, where a batch failed whole cost a message and a retry 5 % of
the time: `pgscript`), carrying the events, the request ids and the DELETE of
the tenants' expired ones (`audit.append(along=)`), then the COMMIT: its read and three round trips
(four before, the INSERT reading its ids back; seven before `pgtrips`; docs/benchmarks.md). Two
things the read cannot promise fail a SQLite batch whole, nothing of it written: another
transaction may take one of its ids between the read and the COMMIT (a submit gone alone inserting
its deployment: the primary key refuses the INSERT), and another appender may move the audit
chain's head first (`audit.head_missed`). Either way the batch is read, judged and written once
more reading back as it goes, its ids given by the database and the head read (`commit_batch`),
rather than sending its members alone.

Every guarantee of a lone submit holds, because anything a batch cannot decide on its own is
decided by the lone submit itself (`deployments.submit_deployment`, in the caller's task, after
the batch committed, so exactly as if the submits had come one after the other):
- a request id used before (a retry: its replayed answer, or the refusal of an id reused), a
  tenant that does not exist, a name taken (before, or earlier in the batch: ALREADY_EXISTS, or
  a quarantined deployment released), a tenant at its deployment limit: the member is handed
  back and goes alone, which answers it as it always did;
- what a batch refuses itself (the tenant's submit rate, a spec no node could ever run) is the
  lone submit's own error, raised in that caller alone;
- the tenant's submit rate is charged once: by the batch, or by the lone submit when the batch
  handed the member back before charging it;
- a batch that fails to commit writes nothing (one transaction) and every member goes alone:
  one bad member never fails the others;
- a batch whose commit answer was lost (`CommitOutcomeUnknown`: it may have landed) sends every
  member alone too, each knowing the row its batch inserted for it (`Queued.wrote`: its id and
  `created_at`). The lone submit first reads its name: the row found is that one if it landed
  (PostgreSQL never gives an id again, SQLite may once the row is gone: `created_at` tells them
  apart), and the caller is answered its deployment as a committed submit is (and the batch's
  `added` is published), not ALREADY_EXISTS for its own deployment. A submit with a request id
  is told apart by the id as well; the read costs nothing until a commit's answer is lost;
- a caller is answered only after the commit that holds its deployment and its audit entry.

A SubmitDeployments call hands each of its requests to `SubmitBatcher.submit` at once, in
order, each in a task of its own (`api/deployments.py`): they join the same queue as lone
submits, so the batches written are the same kind whoever sent the members, and each member is
answered (or goes alone) exactly as above. `check_submits_call` is what refuses such a call
as a whole.

Where a batched submit's time went (`SubmitStages`: its checks, its wait for a batch, the
batch's read, checks, wait for SQLite's writer turn, writes and commit, then the wait of its
caller's task to run again) goes to a `SubmitObserver` (the controller's metrics).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, fields
from typing import Protocol

from controller import limits
from controller.domain.values import DeploymentEvent, DeploymentSpec, DeploymentView
from controller.errors import FieldViolation, InvalidArgument, MaiaError
from controller.groupcommit import BatchSpacing, GroupCommit, GroupStats, by_member, outcome_or_alone
from controller.identity import Principal
from controller.ratelimit import SubmitLimits
from controller.store import audit
from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork
from controller.store.lease import CommitOutcomeUnknown
from controller.store.marks import deferred_writes
from controller.store.snapshot import InsertedRow, inserted_row
from controller.store.turns import answering, metered_turns
from controller.usecases import requests
from controller.usecases.capacity import CapacityCache
from controller.usecases.deployments import as_caller, check_could_ever_fit, submit_deployment, submitted_event, \
    validate_spec
from controller.usecases.ports import Signals
from controller.usecases.redaction import as_seen_by
from controller.usecases.reservations import OwedCapacity, check_owed_capacity, new_ask, owed_capacity

BATCH_MAX = 256
# After a batch of 4 or more with submits queued, the next begins 25 ms after it began at the
# soonest (`groupcommit.BatchSpacing`). Back to back at saturation on PostgreSQL with up-to-date
# statistics, batches of ~6 cost the controller 2.5-2.7 ms of CPU a submit and gave 343-417/s;
# spaced, batches of ~17-20 cost 2.1-2.3 ms and gave 457-525/s (docs/benchmarks.md, `spacing`).
# At 50/s a batch of 4 is rare and a lone submit never waits.
SPACING = BatchSpacing(period_s=0.025, from_items=4)
# The most deployments `SubmittedRows` remembers (the oldest forgotten first: judged again).
SUBMITTED_ROWS_MAX = 4096  # ~1 MiB; a pass takes what arrived since the last (tens to hundreds)


@dataclass
class SubmitStages:
    """Where one batched submit's time in the controller went (seconds), in the order it was spent."""

    validate: float = 0.0     # its own checks (the spec, the request id), before it queued
    queued: float = 0.0       # waiting for its batch to start (the batch before it committing)
    reads: float = 0.0        # the batch's one read (tenants, names, request ids, counts)
    checks: float = 0.0       # the batch's members judged (rate, "could it ever fit", limits)
    writer_turn: float = 0.0  # the batch waiting for SQLite's writer turn (0 on PostgreSQL)
    writes: float = 0.0       # the batch's inserts, events and audit entries, the wait excluded
    commit: float = 0.0       # the batch's commit
    answer: float = 0.0       # from the commit to its caller running again (a busy event loop)

    def items(self) -> list[tuple[str, float]]:
        return [(name, getattr(self, name)) for name in _STAGE_NAMES]


_STAGE_NAMES = tuple(f.name for f in fields(SubmitStages))  # `dataclasses.fields` is slow for each submit


class SubmitObserver(Protocol):
    """Told where each batched submit's time went (`controller.observability.metrics` implements it)."""

    def submit_staged(self, stages: SubmitStages) -> None: ...


@dataclass
class _BatchTimes:
    started: float = 0.0   # (perf_counter) when the batch began
    committed: float = 0.0  # (perf_counter) when its commit returned
    stages: SubmitStages = field(default_factory=SubmitStages)  # the batch's own stages (reads .. commit)


@dataclass
class Queued:
    spec: DeploymentSpec  # in the caller's tenant
    request_id: str
    actor: str
    call: audit.CallEntry | None  # the RPC's audit entry, written with the deployment
    throttle: SubmitLimits | None = None  # the tenant's submit rate, charged by the batch
    capacity: CapacityCache | None = None  # "could it ever fit" (None: read the nodes afresh)
    who: Principal | None = None  # the caller, for a refusal's words (`reservations`)
    charged: bool = False  # the batch charged the submit rate: the lone submit after it does not again
    batch: _BatchTimes | None = None  # the timing of the batch that wrote it
    wrote: InsertedRow | None = None  # the row its batch inserted, when that commit's answer was lost


@dataclass
class _BatchFacts:
    """What the batch's checks read, for all its members at once."""

    zones: dict[str, tuple[str, ...]]  # of the batch's tenants that exist
    taken: set[tuple[str, str]]        # (tenant, name) of deployments that exist, and of members accepted
    used: set[tuple[str, str]]         # (tenant, request id) used, by earlier calls or members accepted
    counts: Counter[str]               # deployments by tenant, members accepted included
    capacity_generation: int
    deployment_ids: Sequence[int] = ()  # the ids the batch's rows take, in order (as read)
    others_reserve: frozenset[str] = frozenset()  # tenants another tenant's reservation concerns
    owed: OwedCapacity | None = None  # read at the first member that needs it (`reservations`)
    # Non-preemptible asks of members accepted unchecked (their tenant alone reserves), by tenant
    # and the watts an accelerator of theirs draws: among the waiting asks of the members checked
    # after them (`owed`, once read).
    unchecked: Counter[tuple[str, float]] = field(default_factory=Counter)


class _ReadBackNeeded(Exception):
    """A batch whose writes read nothing back failed to commit (nothing of it was written): one of
    the ids it chose was taken by another transaction since its read (`repo.deployment_id_taken`),
    or (SQLite) another appender moved the audit head (`audit.head_missed`)."""


class SubmittedRows:
    """The deployments this process's submit batches validated (`validate_spec`, with this
    process's limits) and inserted, by key: the row each inserted (`InsertedRow`).

    The reconciler judges every deployment it has not seen against today's limits
    (`scheduling/quarantine.py`): one stored before them, or by another controller, may be beyond
    them. One of these, read as its row was inserted (its first resource version: no update since;
    that primary key, created then: not a row stored again under the key) is the spec this
    process's validation passed, as the row holds it: judging it again re-checks the same fields
    against the same limits. `take` hands each key out once (a pass judges an arrival once); the
    oldest are forgotten beyond `SUBMITTED_ROWS_MAX` (a deployment deleted before any pass read
    it, a follower's submits): judged as before. Shared by the controller's loop and, when the
    reconciler runs on a thread of its own (`own_thread`), that thread."""

    def __init__(self, most: int = SUBMITTED_ROWS_MAX) -> None:
        self._most = most
        self._rows: dict[str, InsertedRow] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: Iterable[tuple[str, InsertedRow]]) -> None:
        """Remember (key, row) of deployments just inserted, their specs validated here."""
        with self._lock:
            self._rows.update(rows)
            while len(self._rows) > self._most:
                del self._rows[next(iter(self._rows))]

    def take(self, keys: Iterable[str]) -> dict[str, InsertedRow]:
        """The rows the submits of `keys` inserted (those remembered), forgotten."""
        with self._lock:
            return {key: row for key in keys if (row := self._rows.pop(key, None)) is not None}


class SubmitBatcher:
    """Submits checked and committed together (see the module docstring); the queue and the
    writer are `groupcommit.GroupCommit`'s. `submitted`: told of each deployment it inserted."""

    def __init__(self, db: Database, signals: Signals, *, batch_max: int = BATCH_MAX,
                 spacing: BatchSpacing | None = SPACING, observer: SubmitObserver | None = None,
                 submitted: SubmittedRows | None = None) -> None:
        self._db = db
        self._signals = signals
        self._observer = observer
        self._submitted = submitted
        self.written_again = 0  # batches written again reading back (`commit_batch`)
        # A tenant's turn to check then write (its deployment cap, the name free): its submits
        # decided alone (`submit`) take it one after another, and a batch takes its members'
        # tenants' (`commit_batch`). A batch that did not commit hands every member back at once,
        # and with nothing between them each checked then wrote: four at a cap of two all wrote,
        # twins got an IntegrityError; and the next batch, written meanwhile, counted the tenant's
        # deployments before a lone submit's was written (both wrote, past the cap).
        self._turns: dict[str, asyncio.Lock] = {}
        self._group: GroupCommit[Queued, DeploymentView] = GroupCommit(
            "submit-batches",
            # callers wait for the commit: before reports and passes (a lambda: tests replace commit_batch)
            by_member(lambda batch: self.commit_batch(batch), within=answering), batch_max=batch_max,
            spacing=spacing, left=lambda queued, batch: audit.carried_by(queued.call, batch))

    @property
    def stats(self) -> GroupStats:
        return self._group.stats

    async def submit(self, who: Principal, spec: DeploymentSpec, *, throttle: SubmitLimits | None = None,
                     capacity: CapacityCache | None = None, request_id: str = "",
                     time_left_s: float | None = None) -> DeploymentView:
        """What `deployments.submit_deployment` does, checked and committed in a batch. With
        `time_left_s` (until the caller's deadline) it is answered before then: `Unavailable` with
        a retry time when its batch could not be written in time (nothing was), or without one
        (`may_have_landed`) when the batch taking it had not committed by then
        (`groupcommit.GroupCommit.submit`)."""
        began = time.perf_counter()
        spec = as_caller(who, spec, "submitting deployments")
        validate_spec(spec)
        requests.check_request_id(request_id)
        queued = Queued(spec, request_id, who.name, audit.current_call(), throttle, capacity, who=who)
        enqueued = time.perf_counter()
        view = await outcome_or_alone(self._group, queued, time_left_s)
        if view is not None:
            if self._observer is not None and queued.batch is not None:
                self._observer.submit_staged(self._stages(queued.batch, began, enqueued))
            return view
        async with self._turn(spec.tenant), self._db.unit_of_work() as uow:
            if queued.wrote is not None and (landed := await self._landed(uow, who, spec, queued.wrote)) is not None:
                return landed
            return await submit_deployment(uow, who, spec, self._signals, None if queued.charged else throttle,
                                           capacity, request_id=request_id)

    async def _landed(self, uow: UnitOfWork, who: Principal, spec: DeploymentSpec,
                      wrote: InsertedRow) -> DeploymentView | None:
        """The caller's deployment as stored if the row its batch inserted (`wrote`) is the one
        under its name, that batch's commit answer lost: published and answered as the batch
        would have (None: the commit did not land, or the name is another row now)."""
        row = await repo.get_deployment(uow.session, spec.tenant, spec.name)
        if row is None or inserted_row(row.id, row.created_at) != wrote:
            return None
        view = repo.deployment_view(row)
        self._signals.publish(DeploymentEvent("added", view))
        self._signals.wake_reconciler()
        return await as_seen_by(uow, who, view)

    @staticmethod
    def _stages(batch: _BatchTimes, began: float, enqueued: float) -> SubmitStages:
        b = batch.stages
        return SubmitStages(validate=enqueued - began, queued=batch.started - enqueued, reads=b.reads,
                            checks=b.checks, writer_turn=b.writer_turn, writes=b.writes, commit=b.commit,
                            answer=time.perf_counter() - batch.committed)

    async def commit_batch(self, batch: list[Queued]) -> dict[int, DeploymentView | MaiaError]:
        """Check the members and write those that pass, in one transaction; returns by id(member)
        their views, or the error that refused them. The others are left out (they go alone).
        The batch's writes read nothing back (module docstring); when one of its ids was taken or
        (SQLite) the audit head moved before it committed (nothing of it was written), it is read,
        checked and written once more reading back, its ids given by the database, the head read.
        It holds its tenants' turns (`_turn`, in a fixed order) while it checks and writes: a
        submit decided alone meanwhile counts what it wrote, or is counted by it."""
        async with AsyncExitStack() as turns:
            for tenant in sorted({queued.spec.tenant for queued in batch}):
                await turns.enter_async_context(self._turn(tenant))
            try:
                return await self._write_batch(batch, unread=True)
            except _ReadBackNeeded:
                self.written_again += 1
                return await self._write_batch(batch, unread=False)

    def _turn(self, tenant: str) -> asyncio.Lock:
        """The tenant's turn to check then write (a lock a tenant that ever submitted: tenants are
        few; kept, never a second lock for one tenant while the first has waiters)."""
        return self._turns.setdefault(tenant, asyncio.Lock())

    async def _write_batch(self, batch: list[Queued], *, unread: bool) -> dict[int, DeploymentView | MaiaError]:
        """`commit_batch`'s one transaction; with `unread`, the deployments' ids as read
        (`_BatchFacts.deployment_ids`) and (SQLite) the audit append `unread`, a write that failed
        for it `_ReadBackNeeded`."""
        times = _BatchTimes(started=time.perf_counter())
        stages = times.stages
        async with self._db.unit_of_work() as uow, self._db.writing_soon():
            facts = await self._read_facts(uow, batch)
            read = time.perf_counter()
            stages.reads = read - times.started
            outcomes: dict[int, DeploymentView | MaiaError] = {}
            accepted: list[Queued] = []
            for queued in batch:
                try:
                    if await self._admitted(uow, queued, facts):
                        accepted.append(queued)
                except MaiaError as exc:
                    outcomes[id(queued)] = exc
            if not accepted:
                return outcomes
            checked = time.perf_counter()
            stages.checks = checked - read
            s = uow.session
            try:
                with metered_turns() as turn, deferred_writes(postgresql=True):  # the batch fails or commits whole
                    inserted = await repo.insert_deployments(s, [q.spec for q in accepted],
                                                             ids=facts.deployment_ids if unread else None)
                    remembered = requests.remembering([(q.spec.tenant, q.request_id, deployment_id, q.spec)
                                                       for q, (deployment_id, _) in zip(accepted, inserted)], "submit")
                    events = repo.event_rows(submitted_event(q.actor, q.spec) for q in accepted)
                    calls = [q.call for q in accepted if q.call is not None]
                    # SQLite: a missed head fails the batch (written again); PostgreSQL: the ids and events ride in it
                    await audit.append_calls(s, calls, unread=unread, along=(*remembered, events))
                wrote = time.perf_counter()
                stages.writer_turn, stages.writes = turn.waited_s, wrote - checked - turn.waited_s
                try:
                    await uow.commit()
                except CommitOutcomeUnknown:  # it may have landed: each member alone tells by its row
                    for q, (deployment_id, view) in zip(accepted, inserted):
                        q.wrote = inserted_row(deployment_id, view.created_at)
                    raise
            except Exception as exc:  # by a statement or the COMMIT the deferred writes went with
                if unread and (repo.deployment_id_taken(exc) or audit.head_missed(exc)):
                    raise _ReadBackNeeded() from exc  # nothing written
                raise
        times.committed = time.perf_counter()
        stages.commit = times.committed - wrote
        for call in calls:
            call.written = True
        if self._submitted is not None:
            self._submitted.add((q.spec.key, inserted_row(deployment_id, view.created_at))
                                for q, (deployment_id, view) in zip(accepted, inserted))
        for q in accepted:
            q.batch = times
        views = {id(q): view for q, (_, view) in zip(accepted, inserted)}
        self._signals.publish(*(DeploymentEvent("added", view) for view in views.values()))
        self._signals.wake_reconciler()
        return outcomes | views

    @staticmethod
    async def _read_facts(uow: UnitOfWork, batch: list[Queued]) -> _BatchFacts:
        """Round trips are what a batch waits for under load: the tenants' facts, the names taken,
        the request ids used, the capacity generation and the ids its rows take in one query."""
        reads = await repo.submit_batch_reads(uow.session, [(q.spec.tenant, q.spec.name, q.request_id) for q in batch])
        return _BatchFacts(
            zones={tenant: facts.zones for tenant, facts in reads.tenants.items()},
            taken=reads.taken, used=reads.used,
            counts=Counter({tenant: facts.deployments for tenant, facts in reads.tenants.items()}),
            capacity_generation=reads.capacity_generation, deployment_ids=reads.deployment_ids,
            others_reserve=frozenset(tenant for tenant, facts in reads.tenants.items() if facts.others_reserve))

    @staticmethod
    async def _admitted(uow: UnitOfWork, queued: Queued, facts: _BatchFacts) -> bool:
        """Whether the member is written with the batch (False: it goes alone); raises what refuses
        it. In the order of a lone submit's checks (`deployments.admit`)."""
        spec = queued.spec
        tenant, key, request_key = spec.tenant, (spec.tenant, spec.name), (spec.tenant, queued.request_id)
        if queued.request_id and request_key in facts.used or tenant not in facts.zones:
            return False  # a retry (its replayed answer) or no such tenant: as alone
        if queued.throttle is not None and not queued.charged:
            queued.throttle.check_submit(tenant)
            queued.charged = True
        if key in facts.taken or facts.counts[tenant] >= limits.DEPLOYMENTS_PER_TENANT_MAX:
            return False  # ALREADY_EXISTS (or a quarantined one released), or the tenant's limit: as alone
        owed_check = not spec.preemptible and tenant in facts.others_reserve  # `reservations`
        if owed_check and queued.who is None:
            return False  # checked as alone, by its caller's principal
        await check_could_ever_fit(uow, spec, facts.zones[tenant], queued.capacity,
                                   capacity_generation=facts.capacity_generation)
        if owed_check and queued.who is not None:
            asked, asks = new_ask(spec)
            if asked > 0 and facts.owed is None:  # read once a batch, for every member
                facts.owed = await owed_capacity(uow)
                for (earlier, power_w), waits in facts.unchecked.items():
                    facts.owed.took(earlier, waits, power_w)
            await check_owed_capacity(uow, queued.who, tenant, asked=asked, power_w=spec.shard.power_w, asks=asks,
                                      owed=facts.owed)
        elif not spec.preemptible and facts.others_reserve:  # unchecked, but others' checks count it
            asked, _ = new_ask(spec)
            if facts.owed is not None:
                facts.owed.took(tenant, asked, spec.shard.power_w)
            else:
                facts.unchecked[tenant, spec.shard.power_w] += asked
        facts.taken.add(key)
        facts.used.add(request_key)
        facts.counts[tenant] += 1
        return True


def check_submits_call(count: int, dry_runs: Sequence[tuple[int, str]]) -> None:
    """What refuses a SubmitDeployments call as a whole, before any of its `count` requests is
    decided (so nothing is written): none, more than `limits.SUBMITS_PER_CALL_MAX`, or requests
    asking for a dry run (`dry_runs`: their indexes, each with the field set, `dry_run` or
    `replace_existing`, that the BadRequest names). Dry runs are not batched: whether a batch's
    dry runs would be solved together or each alone is a question the caller should not have to
    guess, and each is a solve of its own anyway (send each as its own SubmitDeployment)."""
    most = limits.SUBMITS_PER_CALL_MAX
    if count == 0:
        message = f"requests is empty: a SubmitDeployments call carries 1 to {most} requests"
        raise InvalidArgument(message, violations=(FieldViolation("requests", message),))
    if count > most:
        message = (f"requests has {count} entries; at most {most} a call (send the rest in another call); "
                   f"nothing was written")
        raise InvalidArgument(message, violations=(FieldViolation("requests", message),))
    if dry_runs:
        first = f"requests[{dry_runs[0][0]}]"
        more = f" (and {len(dry_runs) - 1} more)" if len(dry_runs) > 1 else ""
        message = (f"{first} asks for a dry run{more}: SubmitDeployments does not batch dry runs (dry_run, "
                   f"replace_existing); send each as its own SubmitDeployment; nothing was written")
        raise InvalidArgument(message, violations=tuple(
            FieldViolation(f"requests[{i}].{name}", "dry runs are not batched: send it as its own SubmitDeployment")
            for i, name in dry_runs))

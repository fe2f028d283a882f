"""The isolation watchdog: committed placements re-checked, continuously, against isolation.

The watchdog keeps a view of the stored placements (`store.isolation_view`: the rows the rules
read, and the violations found in each rack) and keeps it current with what changed:
- every `interval_s` it reads the isolation version (a counter database triggers bump on every
  change to what the rules read, including rows written by hand) and the cluster generation;
  when the version has not moved, nothing is read (the round is skipped);
- when it moved, a **change check**: the cluster change log (`store.changes`, written by every
  controller writer in the transaction of its change) names what changed since the generation
  the view is at: the deployments and nodes it names are read again with their placements
  (`isolation.read_around`), the small tables (rows, racks, tenants) whole, and only the racks
  those rows touch are judged again. A violation it finds for the first time is confirmed first:
  the racks it lies in are read again whole, in the same snapshot, and judged again (a row
  changed behind the log's back, left stale in the view, raises no false alarm);
- a **full check** reads every row again, in pages folded into the view one at a time (a row
  unchanged builds nothing, and no page outlives its fold: neither the event loop nor the young
  generation holds the whole cluster's rows) and judges every rack, in chunks, in a worker
  thread. It runs every `full_every_s` (writes made outside this controller's writers, which log
  nothing: a hand edit, a restore, dropped triggers, are found by it at the latest), when the log
  cannot say what changed (pruned, a kind it does not name, too many objects), and when the
  version moved with no change logged (a hand edit in a quiet cluster is found at the next round).
  Its cost is bounded: the next full check starts no sooner than the last one's cost divided by
  `max_share` after it (a change check waits for none).
A violation the watchdog has not seen before raises an alarm: a log line at ERROR, an
`isolation.violation` event and an audit entry (one transaction: one that fails to commit is
written again at the next round), and the in-process counters below. A violation raises one
alarm while it persists; if it clears and comes back, it alarms again: its clearing is stored
too (an `isolation.cleared` event). So the alarms are one per violation across leaders: a
watchdog that starts checking (a new leader, or one leading again) takes a violation it finds
whose last stored record is its alarm as raised already (`_stored_alarms`), instead of raising
it again, and stores the clearing of those alarmed that it no longer finds.

Placements are written only by the plan commit, which the solver keeps within the rules, so
an alarm means something else wrote them: a hand edit, a restore, a bug. The watchdog reports;
it does not move anything (the reconciler's next plan will, once it sees a reason to).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.changes import ChangeKind
from controller.store import audit
from controller.store.changes import ChangesSince, read_changes_since
from controller.store.db import Database
from controller.store.isolation import (
    DEPLOYMENT_COLUMNS, NODE_COLUMNS, PLACEMENT_COLUMNS, pages, read_around, read_contracts, read_versions)
from controller.store.isolation_view import HeldRows, IsolationView
from controller.store.models import ISOLATION_KINDS, utcnow
from controller.store.repositories import NewEvent, events_of_kinds, record_events
from scheduler.violations import Violation

log = logging.getLogger("maia.watchdog")

ACTOR = "isolation-watchdog"
# An alarm, and its clearing: a violation alarmed before is no longer found.
EVENT_KIND, CLEARED_KIND = ISOLATION_KINDS

# A change check names at most this many deployments and nodes; more, and a full check costs little more.
CHANGED_MAX = 2_000
_DEPLOYMENT_KINDS = frozenset({ChangeKind.PLACEMENTS, ChangeKind.DEPLOYMENT, ChangeKind.DEPLOYMENT_DELETED})
_CONTRACT_KINDS = frozenset({ChangeKind.TENANT, ChangeKind.TOPOLOGY})  # the small tables: read whole every check


@dataclass(frozen=True, slots=True)
class Alarm:
    violation: Violation
    at: datetime


@dataclass(frozen=True)
class Changed:
    """What the change log says changed: deployments (TENANT/NAME) and nodes (ids)."""

    deployments: frozenset[str]
    nodes: frozenset[str]


def changed_since(changes: ChangesSince) -> Changed | None:
    """What `changes` name, for a change check; None when the log cannot say (a generation
    unlogged or pruned, a kind that names nothing the watchdog reads, a change naming none of
    its objects, or more than `CHANGED_MAX` of them): a full check."""
    if not changes.complete:
        return None
    deployments: set[str] = set()
    nodes: set[str] = set()
    for logged in changes.changes.values():
        for kind, object_id in logged:
            if kind in _CONTRACT_KINDS:
                continue
            if object_id is None or kind not in _DEPLOYMENT_KINDS | {ChangeKind.NODE}:
                return None
            (nodes if kind is ChangeKind.NODE else deployments).add(object_id)
    if len(deployments) + len(nodes) > CHANGED_MAX:
        return None
    return Changed(frozenset(deployments), frozenset(nodes))


_Key = tuple[str, str, tuple[str, ...]]  # `Violation.key`


def _event(kind: str, v: Violation, message: str, at: datetime) -> NewEvent:
    """The event of a violation's alarm or clearing, on its node or rack."""
    scope_kind, _, where = v.scope.partition(" ")
    return NewEvent(actor=ACTOR, kind=kind, object_kind=scope_kind[:32], object_id=where[:128], message=message,
                    data={"rule": v.rule, "scope": v.scope, "tenants": list(v.tenants)}, at=at)


async def _stored_alarms(session: AsyncSession) -> dict[_Key, Violation]:
    """The violations whose last stored record is their alarm, not their clearing: raised, by this
    controller or an earlier leader, and not seen clear since. Read once per leadership through
    the partial index of the two kinds (the event retention never deletes them:
    `controller.store.retention.STATE_KINDS`)."""
    last: dict[_Key, tuple[str, Violation]] = {}
    for kind, message, data in await events_of_kinds(session, (EVENT_KIND, CLEARED_KIND)):
        v = Violation(data.get("rule", ""), data.get("scope", ""), tuple(data.get("tenants", ())), message)
        last[v.key] = (kind, v)
    return {key: v for key, (kind, v) in last.items() if kind == EVENT_KIND}


class IsolationWatchdog:
    """Re-checks the stored placements every `interval_s` seconds (see the module docstring)."""

    def __init__(self, db: Database, *, interval_s: float = 2.0, full_every_s: float = 60.0,
                 max_share: float = 0.05, on_alarm: Callable[[Alarm], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 should_run: Callable[[], bool] = lambda: True) -> None:
        self._db = db
        self._should_run = should_run  # only the leader checks (and writes alarms)
        self.interval_s = interval_s
        self.full_every_s = full_every_s
        self.max_share = max_share
        self._clock = clock
        self._view = IsolationView()
        # The isolation version and cluster generation the view is at (None: never read).
        self._at: tuple[int, int] | None = None
        self._full_at = 0.0  # clock of the last full check
        # The version moved with no change logged, and the full check that needs was deferred: a
        # change check at a later round (of a logged change) does not find what was not logged.
        self._full_owed = False
        self._on_alarm = on_alarm
        # The violations alarmed and not cleared (None: not known yet, read from the stored records).
        self._active: set[_Key] | None = None
        self._leading = False
        self._violations: list[Violation] = []  # as the last check left them (the view may be judging)
        # Alarms raised (EVENT_KIND) and violations cleared (CLEARED_KIND), in order, their records
        # not committed yet.
        self._unstored: list[tuple[str, Alarm]] = []
        # For metrics, health and benchmarks: how many alarms were raised, what is violated now, the last one.
        self.alarms_total = 0
        self.checks_total = 0  # full and change checks
        self.full_checks_total = 0
        self.rows_read_total = 0  # rows read by the checks
        self.placements_judged_total = 0
        self.skipped_total = 0  # rounds where nothing had changed since the last check
        self.deferred_total = 0  # rounds that needed a full check too soon after the last for its cost
        self.active_violations = 0
        self.last_alarm: Alarm | None = None
        self.last_check_ms = 0.0
        self.last_full_ms = 0.0

    def held_rows(self) -> HeldRows:
        """The rows its view holds (as the last check left them)."""
        return self._view.held_rows()

    @property
    def violations(self) -> list[Violation]:
        """The violations found by the last check, in a stable order (rule, scope, tenants)."""
        return self._violations

    async def check_if_changed(self) -> list[Alarm] | None:
        """A change check when the isolation version moved, a full check when one is due (see
        the module docstring); None when nothing changed, or when a full check is needed but the
        last one is too recent for what it cost (`max_share`: it runs at a later round)."""
        await self._store()  # alarms a failed write left unstored first (else retried at the next round)
        async with self._db.unit_of_work() as uow:
            version, generation = await read_versions(uow.session)
        due = self._at is None or self._clock() - self._full_at >= self.full_every_s
        if self._at is not None and not due:
            if version == self._at[0] and not self._full_owed:  # nothing the rules read changed: the view holds
                self._at = (version, generation)
                self.skipped_total += 1
                return None
            if generation == self._at[1] or self._full_owed:  # changed, and no writer logged it: a full check
                self._full_owed = True
                if not self._full_deferred():
                    due = True
                elif generation == self._at[1]:
                    return None
                # else a change check of what was logged meanwhile; the full check stays owed
        return await self._check(full=due)

    async def check_once(self) -> list[Alarm]:
        """One full check; returns the alarms it raised (violations not active before)."""
        alarms = await self._check(full=True)
        assert alarms is not None  # a full check asked for is never deferred
        return alarms

    def _full_deferred(self) -> bool:
        """The last full check is too recent for what it cost (counted as a deferred round)."""
        if self._clock() - self._full_at >= self.last_full_ms / 1000 / self.max_share:
            return False
        self.deferred_total += 1
        return True

    async def _check(self, *, full: bool) -> list[Alarm] | None:
        """A full check (`full`, or when the view was never read or the change log cannot say
        what changed and the last full check is old enough: else None), or a change check."""
        started = time.perf_counter()
        # One snapshot: rows read at different moments can disagree (a placement read, then its
        # deployment deleted) and raise a false REFERENCE alarm. The versions first: a change
        # committed after the snapshot is checked next round.
        async with self._db.read_snapshot() as session:
            version, generation = await read_versions(session)
            changed = None if full or self._at is None else changed_since(
                await read_changes_since(session, self._at[1], generation=generation))
            if changed is None:
                if not full and self._at is not None and self._full_deferred():
                    return None
                full = True
                self._full_at = self._clock()
                self._full_owed = False
                try:
                    await self._read_all(session)
                except BaseException:
                    self._at = None  # the view is part read: the next round reads it all again
                    raise
            else:
                self._view.set_contracts(await read_contracts(session))
                around = await read_around(session, changed.deployments, changed.nodes)
                self.rows_read_total += around.rows
                self._view.apply(around)
            if full:
                self._view.mark_all()
            self.placements_judged_total += await asyncio.to_thread(self._view.check, self._view.take_dirty())
            if not full and any(v.key not in (self._active or ()) for v in self._view.violations):
                await self._confirm(session)
            violations = self._view.violations
            # Alarmed before: as this watchdog left them, or (leading anew) as the stored records say.
            before = list((await _stored_alarms(session)).values()) if self._active is None else self._violations
        self._at = (version, generation)
        alarmed = {v.key for v in before}
        fresh = [v for v in violations if v.key not in alarmed]
        now = utcnow()
        found = {v.key for v in violations}
        self._unstored += [(CLEARED_KIND, Alarm(v, now)) for v in before if v.key not in found]
        self._active = found
        self._violations = violations
        self.active_violations = len(violations)
        self.checks_total += 1
        self.full_checks_total += full
        alarms = [Alarm(v, now) for v in fresh]
        self._raise(alarms)
        await self._store()
        self.last_check_ms = (time.perf_counter() - started) * 1000
        if full:
            self.last_full_ms = self.last_check_ms
        return alarms

    async def _read_all(self, session: AsyncSession) -> None:
        """Every row, in pages, each folded into the view as it comes; what was not read is forgotten."""
        view = self._view
        view.set_contracts(await read_contracts(session))
        nodes: set[str] = set()
        deployments: set[int] = set()
        placements: set[int] = set()
        for columns, put, seen in ((NODE_COLUMNS, view.put_nodes, nodes),
                                   (DEPLOYMENT_COLUMNS, view.put_deployments, deployments),
                                   (PLACEMENT_COLUMNS, view.put_placements, placements)):
            async for page in pages(session, columns):
                put(page)
                seen.update(row[0] for row in page)
                self.rows_read_total += len(page)
        view.retain(nodes=nodes, deployments=deployments, placements=placements)

    async def _confirm(self, session: AsyncSession) -> None:
        """The nodes of violations a change check found for the first time (every node of the
        rack, for a rack's), read again whole in the same snapshot and judged again: a row the
        log did not name is not judged stale."""
        fresh = [v for v in self._view.violations if v.key not in (self._active or ())]
        around = await read_around(session, node_ids=self._view.nodes_around(fresh))
        self.rows_read_total += around.rows
        self._view.apply(around)
        self.placements_judged_total += await asyncio.to_thread(self._view.check, self._view.take_dirty())

    def _raise(self, alarms: list[Alarm]) -> None:
        """Log and count `alarms`, once each; their records are stored by `_store`."""
        for alarm in alarms:
            v = alarm.violation
            # Not only isolation: scheduler/violations.py's rules (HBM, CPU, zones, ...; not power).
            log.error("placement rule %s violated at %s (tenants %s): %s", v.rule, v.scope,
                      ", ".join(v.tenants) or "-", v.message)
            self.alarms_total += 1
            self.last_alarm = alarm
            if self._on_alarm is not None:
                self._on_alarm(alarm)
        self._unstored += [(EVENT_KIND, alarm) for alarm in alarms]

    async def _store(self) -> None:
        """The events and audit entries of the alarms raised and not stored yet, and the events of
        the violations cleared (one transaction): a write that fails leaves them for the next
        round, which has no new alarm to raise."""
        if not self._unstored:
            return
        rows: list[NewEvent] = []
        records = []
        for kind, alarm in self._unstored:
            v = alarm.violation
            if kind == CLEARED_KIND:
                rows.append(_event(kind, v, f"no longer violated: {v.message}", alarm.at))
                continue
            event = _event(kind, v, v.message, alarm.at)
            rows.append(event)
            records.extend(audit.AuditRecord(actor=ACTOR, role="controller", tenant=tenant, action=EVENT_KIND,
                                             object_kind=event.object_kind, object_id=event.object_id,
                                             outcome="VIOLATION", detail={"message": v.message, **event.data})
                           for tenant in (v.tenants or ("",)))
        async with self._db.unit_of_work() as uow:
            await record_events(uow.session, rows)
            if records:
                await audit.append(uow.session, records)
            await uow.commit()
        self._unstored = []

    def lead(self) -> None:
        """A new term of this controller's (`on_elected`): the next round forgets what it saw, as
        `leads` does when it sees the lead come back, though the lead was lost and regained
        between two of its rounds (another leader may have alarmed and cleared meanwhile)."""
        self._leading = False

    def leads(self) -> bool:
        """Whether this controller checks now; one that starts leading again forgets what it saw
        (another leader may have alarmed and cleared since): its next check reads it all and takes
        what is alarmed from the stored records. The records a failed write left unstored are
        dropped (logged): stored now, after what the leaders since stored, they would be the
        violation's last record, an alarm taken as raised or a clearing that is not; what is still
        violated is alarmed again."""
        leading = self._should_run()
        if leading and not self._leading:
            if self._unstored:
                log.warning("dropping %d isolation records left unstored when this controller last led",
                            len(self._unstored))
            self._at, self._active, self._unstored = None, None, []
        if not leading:  # the leader's word now (a follower checks nothing)
            self.active_violations = 0
        self._leading = leading
        return leading

    async def run(self) -> None:
        """Check forever; an error in one check is logged and the next check runs on time."""
        while True:
            try:
                if self.leads():
                    await self.check_if_changed()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("isolation check failed; retrying in %.1fs", self.interval_s)
            await asyncio.sleep(self.interval_s)

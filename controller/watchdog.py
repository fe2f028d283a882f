"""The isolation watchdog: committed placements re-checked, continuously, against isolation.

Every `interval_s` it reads the isolation version (a counter database triggers bump on every
change to what the rules read, including rows written by hand); when it moved, or `full_every_s`
passed since the last full check (in case someone dropped the triggers), it reads the stored
placements (`controller.store.isolation`, in pages) and runs
`scheduler.violations.find_violations` over them in a worker thread (the model of each row
built once and kept while the row is unchanged: `isolation.ModelMemo`). A full check reads every
placement, so under steady churn (the version moves every round) its cost is bounded instead:
the next check starts no sooner than its last one's cost divided by `max_share` after it (with
the default 0.05, checks take at most ~5 % of the controller's time; a check of 150 ms on 4,096
busy nodes comes every 3 s rather than every 2). A violation the watchdog has
not seen before raises an alarm: a log line at ERROR, an `isolation.violation` event and an
audit entry (one transaction), and the in-process counters below. A violation raises one
alarm while it persists; if it clears and comes back, it alarms again.

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

from sqlalchemy import insert

from controller.store import audit
from controller.store.db import Database
from controller.store.models import Event, utcnow
from controller.store.isolation import ModelMemo, StoredPlacements, isolation_version, read_placements, to_problem
from scheduler.violations import Violation, find_violations

log = logging.getLogger("maia.watchdog")

ACTOR = "isolation-watchdog"
EVENT_KIND = "isolation.violation"


@dataclass(frozen=True, slots=True)
class Alarm:
    violation: Violation
    at: datetime


def violations_in(stored: StoredPlacements, memo: ModelMemo | None = None) -> list[Violation]:
    """The violations of the stored placements (CPU work: runs in a worker thread); `memo`: the
    model objects of the last check, for the rows unchanged since (`isolation.ModelMemo`)."""
    return find_violations(to_problem(stored, memo))


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
        self._checked: tuple[int, float] | None = None  # (isolation version, clock) of the last full check
        self._on_alarm = on_alarm
        self._active: set[tuple[str, str, tuple[str, ...]]] = set()
        self._memo = ModelMemo()  # one check at a time uses it (in its worker thread)
        # For metrics and health: how many alarms were raised, what is violated now, the last one.
        self.alarms_total = 0
        self.checks_total = 0
        self.skipped_total = 0  # rounds where nothing had changed since the last check
        self.deferred_total = 0  # rounds where something had, but the last check was too recent for its cost
        self.active_violations = 0
        self.last_alarm: Alarm | None = None
        self.last_check_ms = 0.0

    async def check_if_changed(self) -> list[Alarm] | None:
        """A full check when the isolation version moved or the last one is `full_every_s` old;
        None when nothing changed, or when the last check is too recent for what it cost
        (`max_share`: the change is checked at a later round)."""
        async with self._db.unit_of_work() as uow:
            version = await isolation_version(uow.session)
        if self._checked is not None:
            last_version, last_at = self._checked
            since = self._clock() - last_at
            if version == last_version and since < self.full_every_s:
                self.skipped_total += 1
                return None
            if since < self.last_check_ms / 1000 / self.max_share:
                self.deferred_total += 1
                return None
        return await self.check_once()

    async def check_once(self) -> list[Alarm]:
        """One full check; returns the alarms it raised (violations not active before)."""
        started = time.perf_counter()
        async with self._db.read_snapshot() as session:
            # One snapshot: rows read at different moments can disagree (a placement read, then
            # its deployment deleted) and raise a false REFERENCE alarm. The version first: a
            # change committed after the snapshot is checked next round.
            version = await isolation_version(session)
            stored = await read_placements(session)
        self._checked = (version, self._clock())
        violations = await asyncio.to_thread(violations_in, stored, self._memo)
        fresh = [v for v in violations if v.key not in self._active]
        self._active = {v.key for v in violations}
        self.active_violations = len(violations)
        self.checks_total += 1
        alarms = [Alarm(v, utcnow()) for v in fresh]
        if alarms:
            await self._record(alarms)
        self.last_check_ms = (time.perf_counter() - started) * 1000
        return alarms

    async def _record(self, alarms: list[Alarm]) -> None:
        for alarm in alarms:
            v = alarm.violation
            log.error("isolation violation %s at %s (tenants %s): %s", v.rule, v.scope, ", ".join(v.tenants) or "-",
                      v.message)
            self.alarms_total += 1
            self.last_alarm = alarm
            if self._on_alarm is not None:
                self._on_alarm(alarm)
        rows = []
        records = []
        for alarm in alarms:
            v = alarm.violation
            kind, _, where = v.scope.partition(" ")
            data = {"rule": v.rule, "scope": v.scope, "tenants": list(v.tenants)}
            rows.append({"kind": EVENT_KIND, "object_kind": kind[:32], "object_id": where[:128], "actor": ACTOR,
                         "message": v.message, "data": data, "at": alarm.at})
            records.extend(audit.AuditRecord(actor=ACTOR, role="controller", tenant=tenant, action=EVENT_KIND,
                                             object_kind=kind, object_id=where, outcome="VIOLATION",
                                             detail={"message": v.message, **data})
                           for tenant in (v.tenants or ("",)))
        async with self._db.unit_of_work() as uow:
            await uow.session.execute(insert(Event), rows)
            await audit.append(uow.session, records)
            await uow.commit()

    async def run(self) -> None:
        """Check forever; an error in one check is logged and the next check runs on time."""
        while True:
            try:
                if self._should_run():
                    await self.check_if_changed()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("isolation check failed; retrying in %.1fs", self.interval_s)
            await asyncio.sleep(self.interval_s)

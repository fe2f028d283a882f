"""Health that means "this controller can do its job", for grpc.health.v1.

Every `interval_s` the monitor asks: can the database answer `SELECT 1` within a few seconds
(a probe that failed `DB_PROBES_UNHEALTHY` times in a row: one slow answer from a busy machine is
not an outage, and a controller pulled from service whenever it is busiest would flap)? Have the
controller's own database calls not kept failing for `FAILING_UNHEALTHY_S` (a database that
answers reads but takes no write: `store.db.FailureRun`)? Has the
reconciler failed fewer than `failures_unhealthy` passes in a row, and is no pass
running longer than `stuck_s`? Is resident memory below `max_rss_mib`? Any "no" sets every
service NOT_SERVING (with the reasons logged once); when all answers are "yes" again it goes
back to SERVING. A load balancer or orchestrator watching health then stops sending work to,
or restarts, a controller that is up but useless.

One service is not the monitor's: `LIVENESS_SERVICE` ("liveness") is SERVING from the start to
the stop, whatever the database says, answered by the event loop like every call: a liveness
probe on it restarts a controller whose loop is wedged, never one whose database is away (a
restart cures no outage, and every replica restarting at once is the outage's echo). Readiness
watches "" (or a service): the monitor's answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Protocol

from grpc_health.v1 import health_pb2
from sqlalchemy import text

from controller.store.db import FAILING_UNHEALTHY_S, Database

log = logging.getLogger("maia.health")

DB_PROBE_TIMEOUT_S = 5.0
LIVENESS_SERVICE = "liveness"  # SERVING while the process serves (see the module docstring)
DB_PROBES_UNHEALTHY = 3  # failed database probes in a row that make the controller NOT_SERVING


class ReconcilerState(Protocol):
    consecutive_failures: int

    def running_for_s(self) -> float: ...


class HealthSetter(Protocol):
    async def set(self, service: str, status: int) -> None: ...


def resident_mib(*children: int | None) -> float:
    """This process's resident set size (Linux /proc), in MiB, with those of the `children` named
    by pid (None, or one gone: nothing): the decide process is as much the controller's memory."""
    total = 0.0
    for pid in ("self", *(str(c) for c in children if c is not None)):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        except (OSError, ValueError, IndexError):  # a child gone meanwhile
            continue
    return total


def _kinds(problems: list[str]) -> list[str]:
    """The problems without their numbers: "resident memory 169 MiB ..." and "... 171 MiB ..." are one."""
    return [re.sub(r"\d+(\.\d+)?", "#", p) for p in problems]


class HealthMonitor:
    def __init__(self, health: HealthSetter, services: Iterable[str], *, db: Database, reconciler: ReconcilerState,
                 max_rss_mib: int, stuck_s: float, failures_unhealthy: int, interval_s: float = 1.0,
                 rss_mib: Callable[[], float] = resident_mib) -> None:
        self._health = health
        self._services = tuple(services)
        self._db = db
        self._reconciler = reconciler
        self._max_rss = max_rss_mib
        self._stuck_s = stuck_s
        self._failures_unhealthy = failures_unhealthy
        self._interval = interval_s
        self._rss = rss_mib
        self.problems: list[str] = []
        self.serving = True
        self.db_probes_failed = 0  # in a row

    async def problems_now(self) -> list[str]:
        problems = []
        self.db_probes_failed = 0 if await self._database_answers() else self.db_probes_failed + 1
        if self.db_probes_failed >= DB_PROBES_UNHEALTHY:
            problems.append("the database does not answer")
        elif (failing := self._db.failures.failing_for_s()) >= FAILING_UNHEALTHY_S:
            problems.append(f"database calls have kept failing for {failing:.0f}s though it answers a read "
                            f"(last: {self._db.failures.error})")
        failures = self._reconciler.consecutive_failures
        if failures >= self._failures_unhealthy:
            problems.append(f"the reconciler failed {failures} passes in a row")
        running = self._reconciler.running_for_s()
        if running > self._stuck_s:
            problems.append(f"a reconcile pass has been running for {running:.0f}s (limit {self._stuck_s:g}s)")
        if self._max_rss > 0:
            rss = self._rss()
            if rss > self._max_rss:
                problems.append(f"resident memory {rss:.0f} MiB is above the ceiling of {self._max_rss} MiB")
        return problems

    async def _database_answers(self) -> bool:
        try:
            async with asyncio.timeout(DB_PROBE_TIMEOUT_S):
                async with self._db.unit_of_work() as uow:
                    await uow.session.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # unreachable, timed out, dropped: all mean "cannot do its job"
            log.debug("database probe failed: %s", exc)
            return False

    async def check_once(self) -> bool:
        """Look once and set the services' status; True if serving."""
        problems = await self.problems_now()
        serving = not problems
        if serving != self.serving or _kinds(problems) != _kinds(self.problems):  # not each new number
            if serving:
                log.warning("health: SERVING again")
            else:
                log.error("health: NOT_SERVING: %s", "; ".join(problems))
        self.problems, self.serving = problems, serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self._services:
            await self._health.set(service, status)
        return serving

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health check failed")

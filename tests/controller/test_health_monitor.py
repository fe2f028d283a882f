"""The health monitor's database probe: one slow or failed probe on a busy machine is not an
outage; `DB_PROBES_UNHEALTHY` in a row are, and one answer ends it. A database that answers the
probe while the controller's own calls keep failing is not serving either."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2
from sqlalchemy.exc import OperationalError

from controller.health import DB_PROBES_UNHEALTHY, HealthMonitor
from controller.store import db as db_module
from controller.store.db import FAILURES_GAP_S, Database, FailureRun

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class _Health:
    def __init__(self) -> None:
        self.status: dict[str, int] = {}

    async def set(self, service: str, status: int) -> None:
        self.status[service] = status


class _Reconciler:
    consecutive_failures = 0

    def running_for_s(self) -> float:
        return 0.0


def _monitor(answers: Iterator[bool], health: _Health, monkeypatch: pytest.MonkeyPatch) -> HealthMonitor:
    monitor = HealthMonitor(health, [""], db=Database("sqlite+aiosqlite://"), reconciler=_Reconciler(),
                            max_rss_mib=0, stuck_s=60, failures_unhealthy=3)

    async def answers_now() -> bool:
        return next(answers)

    monkeypatch.setattr(monitor, "_database_answers", answers_now)
    return monitor


async def test_the_database_is_down_only_after_probes_fail_in_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DB_PROBES_UNHEALTHY >= 2
    health = _Health()
    answers = [False] * (DB_PROBES_UNHEALTHY - 1) + [True] + [False] * DB_PROBES_UNHEALTHY + [True]
    monitor = _monitor(iter(answers), health, monkeypatch)
    seen = []
    for _ in answers:
        await monitor.check_once()
        seen.append(health.status[""])
    # The first failures are forgiven (an answer breaks the run), a full run is not, one answer ends it.
    assert seen == [SERVING] * DB_PROBES_UNHEALTHY + [SERVING] * (DB_PROBES_UNHEALTHY - 1) + [NOT_SERVING, SERVING]
    assert monitor.problems == [] and monitor.db_probes_failed == 0


async def test_a_database_that_never_answers_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    health = _Health()
    monitor = _monitor(iter([False] * DB_PROBES_UNHEALTHY), health, monkeypatch)
    for _ in range(DB_PROBES_UNHEALTHY):
        await monitor.check_once()
    assert health.status[""] == NOT_SERVING
    assert monitor.problems == ["the database does not answer"]


async def test_database_calls_that_keep_failing_though_it_answers_a_read_are_not_serving(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's write lock held by another process: `SELECT 1` passes (WAL), every writer fails
    ("database is locked"), and readiness said SERVING throughout."""
    health = _Health()
    monitor = _monitor(iter([True] * 10), health, monkeypatch)
    failures = monitor._db.failures
    clock = [1000.0]
    monkeypatch.setattr(db_module.time, "monotonic", lambda: clock[0])
    locked = OperationalError("INSERT INTO events ...", None, Exception("database is locked"))

    async def a_write_that_fails() -> None:
        async with monitor._db.unit_of_work():
            raise locked

    for _ in range(4):  # a failure every 10 s: 30 s of them
        with pytest.raises(OperationalError):
            await a_write_that_fails()
        clock[0] += 10.0
    clock[0] -= 10.0
    assert failures.failing_for_s() == 30.0
    with caplog.at_level(logging.ERROR, logger="maia.health"):
        await monitor.check_once()
        assert health.status[""] == NOT_SERVING
        assert monitor.problems == ["database calls have kept failing for 30s though it answers a read "
                                    "(last: OperationalError)"]
        clock[0] += 5.0
        with pytest.raises(OperationalError):
            await a_write_that_fails()
        await monitor.check_once()  # 35s now: the same problem, not logged again
    assert health.status[""] == NOT_SERVING and caplog.text.count("NOT_SERVING") == 1

    clock[0] += FAILURES_GAP_S + 1  # none since: the run is over
    await monitor.check_once()
    assert health.status[""] == SERVING and monitor.problems == []


async def test_a_failure_now_and_then_is_no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database failure once a minute on a busy machine: each starts a run of its own."""
    failures = FailureRun()
    for minute in range(5):
        failures.failed(TimeoutError(), now=60.0 * minute)
        assert failures.failing_for_s(now=60.0 * minute) == 0.0
    assert failures.failing_for_s(now=60.0 * 4 + FAILURES_GAP_S + 1) == 0.0


def test_resident_memory_counts_the_decide_process_too() -> None:
    """--max-rss-mib read /proc/self alone: the decide process (~100 MB at 128 nodes, more as
    the cluster grows) was not counted, and the pod's memory limit could kill it first."""
    import subprocess
    import sys
    import time

    from controller.health import resident_mib

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        own = resident_mib()
        deadline = time.monotonic() + 10
        while resident_mib(child.pid) - own < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident_mib(child.pid) - own >= 60
    finally:
        child.kill()
        child.wait()
    assert abs(resident_mib(child.pid, None) - resident_mib()) < 8  # gone: nothing of it


async def test_a_commit_between_failures_ends_their_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load, a "database is locked" or a pool timeout every ~30 s with thousands of commits
    between them read as failing for minutes: NOT_SERVING, and every failed caller told 10 s."""
    db = Database("sqlite+aiosqlite://")
    clock = [0.0]
    monkeypatch.setattr(db_module.time, "monotonic", lambda: clock[0])
    for t in (0.0, 30.0, 60.0, 90.0):
        clock[0] = t
        db.failures.failed(TimeoutError())
        async with db.unit_of_work() as uow:  # work that went through meanwhile
            await uow.commit()
    db.failures.failed(TimeoutError())
    assert db.failures.failing_for_s() == 0.0 and db.failures.retry_after_ms() == 1000
    for t in (100.0, 110.0):  # nothing committed since the one at 90: a run of 20 s
        clock[0] = t
        db.failures.failed(TimeoutError())
    assert db.failures.failing_for_s() == 20.0 and db.failures.retry_after_ms() == 5000


async def test_a_leader_deposed_after_failed_passes_serves_again_as_a_follower(cluster: Database) -> None:
    """Passes fail (the database restarting), the lease lapses meanwhile and another controller
    leads: the failures were reset only by a pass that went through, which a follower never runs,
    and it said NOT_SERVING until it led again (Kubernetes took the standby out of its Service;
    found in review)."""
    import asyncio

    from controller.reconcile import Reconciler
    from uc_builders import no_publish

    class Lease:
        leading = True

        def should_run(self) -> bool:
            return self.leading

    lease = Lease()
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, lease=lease, interval_s=0.02)
    checked = loop._checks.before_pass
    outage = [True]

    async def before_pass(uow):  # type: ignore[no-untyped-def]
        if outage[0]:
            raise OperationalError("SELECT ...", None, Exception("connection refused"))
        return await checked(uow)

    loop._checks.before_pass = before_pass  # type: ignore[method-assign]
    health = _Health()
    monitor = HealthMonitor(health, [""], db=cluster, reconciler=loop, max_rss_mib=0, stuck_s=60,
                            failures_unhealthy=3)
    task = asyncio.create_task(loop.run())
    try:
        while loop.consecutive_failures < 3:
            await asyncio.sleep(0.02)
        await monitor.check_once()
        assert health.status[""] == NOT_SERVING  # the leader's passes fail
        lease.leading, outage[0] = False, False  # deposed; the database is back
        for _ in range(500):
            await asyncio.sleep(0.02)
            await monitor.check_once()
            if health.status[""] == SERVING:
                break
        assert health.status[""] == SERVING, monitor.problems
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

"""The health monitor's database probe: one slow or failed probe on a busy machine is not an
outage; `DB_PROBES_UNHEALTHY` in a row are, and one answer ends it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

from controller.health import DB_PROBES_UNHEALTHY, HealthMonitor
from controller.store.db import Database

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

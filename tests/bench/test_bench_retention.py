"""bench/retention.py on a small table: it deletes what passed the time to live, a batch at a time,
and says so (never its timings, which are for docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from bench import retention
from controller.retention import BATCH_ROWS


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_the_bench_deletes_the_events_past_seven_of_ten_days(kind: str) -> None:
    rows = 4 * BATCH_ROWS + 500  # spread over ten days: 30 % past seven, a whole batch and a part
    result = await retention.run(kind, rows)
    assert int(rows * 0.3) <= result["deleted"] <= int(rows * 0.3) + 2  # those at the boundary may go
    assert result["batches"] == 1 + result["deleted"] // BATCH_ROWS
    assert 0 < result["batch_p50_ms"] <= result["batch_max_ms"] and result["nothing_due_ms"] > 0
    assert f"{result['deleted']} past 7 days deleted" in retention._report(result)


@pytest.mark.postgres
async def test_the_bench_holds_an_old_snapshot_open_on_postgresql_when_asked() -> None:
    result = await retention.run("postgres", BATCH_ROWS + 500, hold_snapshot=True)
    assert result["snapshot_held"] and result["deleted"] >= int((BATCH_ROWS + 500) * 0.3)
    assert "a snapshot held open meanwhile" in retention._report(result)
    assert not (await retention.run("sqlite", 100, hold_snapshot=True))["snapshot_held"]  # SQLite has none to hold



@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_the_bench_deletes_the_audit_entries_past_seven_of_ten_days_and_the_chain_verifies(kind: str) -> None:
    rows = 5 * retention.AUDIT_CHUNK  # five appends, a time each: the first two (days 10 and 8 ago) go
    result = await retention.run(kind, rows, table="audit")
    assert result["deleted"] == 2 * retention.AUDIT_CHUNK and result["intact_after"] is True
    assert result["batches"] == 1 + result["deleted"] // BATCH_ROWS
    assert f"{rows} audit entries over 10 days" in retention._report(result)
    assert "the chain verifies after" in retention._report(result)

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

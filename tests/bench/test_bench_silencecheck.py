"""bench/silencecheck.py on a few streams: it checks them all, gives the loop a turn between two
slices of `EXPIRE_SLICE` streams, ends none (each was heard from just now), and says so (never its
timings, which are for docs/benchmarks.md)."""

from __future__ import annotations

from bench import silencecheck
from controller.agents.hub import EXPIRE_SLICE


async def test_the_bench_checks_the_streams_in_slices_with_the_loop_let_in_between() -> None:
    streams = 2 * EXPIRE_SLICE + 1  # three slices
    result = await silencecheck.run(silencecheck.parse_args(["--streams", str(streams), "--rounds", "2",
                                                            "--warmup", "0", "--unacknowledged", "1",
                                                            "--per-round"]))
    assert result["streams"] == streams and result["rounds"] == 2
    # The ticker's turns: one after each slice (before the next, and as the check ends).
    assert [r["ticker_turns"] for r in result["per_round"]] == [3, 3]
    assert 0 < result["longest_step_ms_p50"] <= result["longest_step_ms_max"]
    assert result["check_ms_p50"] >= result["longest_step_ms_p50"] * 0.5

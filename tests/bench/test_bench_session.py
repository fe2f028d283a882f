"""`python -m bench session` on a small cluster: it runs both sides from one state and the
session's final state passes the independent checker (speed is for docs/benchmarks.md)."""

from __future__ import annotations

import argparse

from bench.session import format_rows, measure


def test_session_benchmark_runs_and_its_state_is_valid() -> None:
    args = argparse.Namespace(seed=7, fill=0.6, arrivals=12, solve_arrivals=4, departures=5,
                              time_limit_ms=2000, check=True)
    r = measure(64, args)
    assert r.violations == 0
    assert len(r.session_ms) == 12 and len(r.solve_ms) == 4 and len(r.release_ms) == 5
    assert r.background > 0
    assert format_rows([r]).splitlines()[1].split()[0] == "64"

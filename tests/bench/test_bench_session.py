"""`python -m bench session` on a small cluster: it runs both sides from one state and the
session's final state passes the independent checker (speed is for docs/benchmarks.md)."""

from __future__ import annotations

import argparse
from typing import Any

from bench.session import SHAPES, format_rows, format_shapes, measure


def options(**kw: Any) -> argparse.Namespace:
    base = dict(seed=7, fill=0.6, arrivals=12, solve_arrivals=4, departures=5,
                time_limit_ms=2000, check=True, placements=None, no_budgets=False,
                shapes=False, shape_arrivals=1, profile=None)
    return argparse.Namespace(**{**base, **kw})


def test_session_benchmark_runs_and_its_state_is_valid() -> None:
    r = measure(64, options())
    assert r.violations == 0
    assert len(r.session_ms) == 12 and len(r.solve_ms) == 4 and len(r.release_ms) == 5
    assert r.background > 0
    assert format_rows([r]).splitlines()[1].split()[0] == "64"


def test_the_shapes_stream_times_every_shape_and_its_state_is_valid() -> None:
    r = measure(64, options(shapes=True, shape_arrivals=2, no_budgets=True, placements=100))
    assert r.violations == 0
    assert {shape: len(ms) for shape, ms in r.shape_cpu_ms.items()} == \
        {shape: 2 * weight for shape, _, weight in SHAPES}
    assert sum(map(sum, r.shape_shards.values())) > 0  # something placed
    assert [line.split()[2] for line in format_shapes([r]).splitlines()[1:]] == \
        [shape for shape, _, _ in SHAPES]

"""`python -m bench headofline` on a small cluster: without nominations the gang behind the churn
is never placed, with them it is, and every final state passes the independent checker,
nominations included (the numbers are for docs/benchmarks.md)."""

from __future__ import annotations

import argparse

from bench.headofline import run


def test_the_gang_is_placed_only_with_nominations_and_the_states_are_valid() -> None:
    args = argparse.Namespace(nodes=32, gang=8, steps=1500, nominate_after=10, check=True)
    without, with_ = run(args, False, 1), run(args, True, 1)
    assert without.placed_at is None and without.violations == 0 and without.idle_accelerator_steps == 0
    assert with_.placed_at is not None and with_.placed_at < 1500 and with_.violations == 0
    assert with_.idle_accelerator_steps > 0 and len(with_.decide_ms) + len(with_.refused_ms) == with_.placed_at

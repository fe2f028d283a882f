"""`python -m bench headofline` on a small cluster: without nominations the gang behind the churn
is never placed, with them it is; with gangs waiting in two zones, one nomination a zone serves
both at once where one at a time serves them in turn; and every final state passes the
independent checker, nominations included (the numbers are for docs/benchmarks.md)."""

from __future__ import annotations

import argparse

from bench.headofline import run


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"nodes": 32, "gang": 8, "gangs": 1, "zones": 1, "steps": 1500, "nominate_after": 10,
                                 "check": True, **kw})


def test_the_gang_is_placed_only_with_nominations_and_the_states_are_valid() -> None:
    args = _args()
    without, with_ = run(args, "off", 1), run(args, "zone", 1)
    assert without.placed_at is None and without.violations == 0 and without.idle_accelerator_steps == 0
    assert with_.placed_at is not None and with_.placed_at < 1500 and with_.violations == 0
    assert with_.idle_accelerator_steps > 0 and len(with_.decide_ms) + len(with_.refused_ms) == with_.placed_at
    assert with_.most_nominated == 1 and with_.gangs_placed_at == [with_.placed_at]


def test_gangs_in_two_zones_gather_room_at_once_with_one_nomination_a_zone() -> None:
    args = _args(nodes=64, gangs=2, zones=2, steps=4000)
    one, zone = run(args, "one", 1), run(args, "zone", 1)
    assert one.most_nominated == 1 and zone.most_nominated == 2
    assert None not in one.gangs_placed_at and None not in zone.gangs_placed_at
    assert zone.placed_at < one.placed_at  # in parallel, not in turn
    assert one.violations == 0 and zone.violations == 0

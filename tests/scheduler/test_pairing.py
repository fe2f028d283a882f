"""Prices of free room per accelerator (scheduler/pairing.py): the packing LP's duals."""

from __future__ import annotations

import numpy as np

from scheduler.pairing import expected_packing, pairing_values

# The openb `default` trace's demand: (milli per accelerator, % of the GPU milli asked).
OPENB_DEFAULT = [(1000, 64.25 + 5.78 + 0.99 + 0.53), (810, 14.35), (470, 5.79), (650, 2.7),
                 (320, 1.72), (460, 0.97), (590, 0.73), (550, 0.65), (230, 0.53), (370, 0.29),
                 (220, 0.22), (160, 0.19), (480, 0.15), (110, 0.04)]


def test_pairings_of_a_best_packing_lose_nothing_and_bad_ones_do() -> None:
    values = pairing_values(OPENB_DEFAULT, accelerators=6212)
    assert values is not None

    def loss(free: int, milli: int) -> float:
        return round(float(values.loss(np.array([free]), milli)[0]), 6)

    # What the best packing of this workload does: 470 + 470, 650 + 320, 810 alone.
    assert loss(1000, 470) == 0 and loss(530, 470) == 0
    assert loss(1000, 650) == 0 and loss(350, 320) == 0
    assert loss(1000, 810) == 0
    # A 320 in the 530 a 470 left strands 210 that only the rare small tasks fill; a 470
    # in the 680 a 320 left does the same.
    assert loss(530, 320) > 0
    assert loss(680, 470) > 0


def test_room_values_are_monotone_and_losses_never_negative() -> None:
    values = pairing_values(OPENB_DEFAULT, accelerators=100)
    assert values is not None
    assert np.all(np.diff(values.room_value) >= -1e-9)
    free = np.arange(0, 1001, 10)
    for milli in (110, 230, 470, 810):
        fits = free >= milli
        assert np.all(values.loss(free[fits], milli) >= 0)


def test_nothing_fractional_has_no_prices() -> None:
    assert pairing_values([(1000, 1.0)], accelerators=8) is None
    assert pairing_values([(500, 1.0)], accelerators=0) is None



def test_an_empty_cluster_priced_as_it_stands_is_priced_as_a_fresh_one() -> None:
    fresh = pairing_values(OPENB_DEFAULT, accelerators=1000)
    standing = pairing_values(OPENB_DEFAULT, accelerators=1000, used={0: 1000})
    assert fresh is not None and standing is not None
    assert np.allclose(fresh.room_value, standing.room_value)
    assert fresh.net_value == standing.net_value


def test_priced_as_it_stands_empty_accelerators_are_kept_for_whole_tasks() -> None:
    # 500 accelerators hold a 470 alone (530 free each), 50 are empty: the room a 470 can
    # pair into is plenty, empty accelerators are what whole tasks need.
    values = pairing_values(OPENB_DEFAULT, accelerators=550, used={470: 500, 0: 50})
    assert values is not None

    def loss(free: int, milli: int) -> float:
        return round(float(values.loss(np.array([free]), milli)[0]), 6)

    assert loss(530, 470) == 0
    assert loss(1000, 470) > 0
    # Priced on an empty cluster, both cost nothing: only the state tells them apart.
    fresh = pairing_values(OPENB_DEFAULT, accelerators=550)
    assert fresh is not None
    assert float(fresh.loss(np.array([1000]), 470)[0]) < 1e-6


def test_a_cluster_without_room_has_no_prices() -> None:
    assert pairing_values(OPENB_DEFAULT, accelerators=10, used={}) is None


def test_expected_packing_prefers_room_the_workload_fills() -> None:
    # Two accelerators, 600 milli used either way. Of 700-milli demand, two 300s apart leave
    # two 700 holes (both filled); paired on one accelerator they leave 400 (nothing fits)
    # and one empty accelerator (one 700).
    apart = expected_packing([(700, 1.0)], accelerators=2, used={300: 2})
    paired = expected_packing([(700, 1.0)], accelerators=2, used={600: 1, 0: 1})
    assert apart is not None and paired is not None
    assert round(apart) == 1400 and round(paired) == 700
    # Of 500-milli demand both take two: one in each 700 hole, or two on the empty one.
    apart = expected_packing([(500, 1.0)], accelerators=2, used={300: 2})
    paired = expected_packing([(500, 1.0)], accelerators=2, used={600: 1, 0: 1})
    assert apart is not None and paired is not None
    assert round(apart) == round(paired) == 1000


def test_expected_packing_never_exceeds_the_room_left() -> None:
    used = {0: 40, 810: 30, 470: 20, 650: 10, 940: 5}
    room = sum((1000 - milli) * n for milli, n in used.items())
    packed = expected_packing(OPENB_DEFAULT, accelerators=105, used=used)
    assert packed is not None and 0 < packed <= room + 1e-6
    assert expected_packing([(1000, 1.0)], accelerators=8, used={0: 8}) is None

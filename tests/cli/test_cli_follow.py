"""`EventFollower` (`maiactl get events -w`): each event shown once, the late ones included."""

from __future__ import annotations

from dataclasses import dataclass

from controller.cli.follow import EventFollower


@dataclass(frozen=True)
class Ev:
    id: int


def _ids(events: list[Ev]) -> list[int]:
    return [e.id for e in events]


def test_asks_from_behind_until_the_settle_time_passed_and_shows_each_event_once() -> None:
    now = [100.0]
    follower = EventFollower([Ev(5), Ev(7)], settle_s=10.0, clock=lambda: now[0])
    assert follower.after_id() == 4  # from the first shown: 6 may still commit
    assert _ids(follower.fresh([Ev(5), Ev(7), Ev(9)])) == [9]
    now[0] += 5
    assert follower.after_id() == 4
    assert _ids(follower.fresh([Ev(5), Ev(6), Ev(7), Ev(8), Ev(9)])) == [6, 8]  # committed late
    now[0] += 5  # 10 s after the first shown: up to 7 is settled
    assert follower.after_id() == 9  # the asks of 100 and 100 (up to 9) are 10 s old
    assert _ids(follower.fresh([Ev(10)])) == [10]
    assert _ids(follower.fresh([Ev(10)])) == []


def test_nothing_shown_yet_everything_is_new() -> None:
    follower = EventFollower([], clock=lambda: 0.0)
    assert follower.after_id() == 0
    assert _ids(follower.fresh([Ev(1), Ev(2)])) == [1, 2]
    assert follower.after_id() == 0  # not settled yet
    assert _ids(follower.fresh([Ev(1), Ev(2), Ev(3)])) == [3]


def test_an_event_below_the_settled_floor_is_not_shown() -> None:
    """Once settled, the floor is never asked below again (an event reported under it is old)."""
    now = [0.0]
    follower = EventFollower([Ev(3)], settle_s=1.0, clock=lambda: now[0])
    follower.fresh([Ev(4)])
    now[0] = 2.0
    assert follower.after_id() == 4
    assert follower.fresh([Ev(2), Ev(4), Ev(5)]) == [Ev(5)]


def test_a_quiet_objects_follower_moves_on_to_how_far_each_read_reached_once_settled() -> None:
    """Following one object's events, the floor stayed at its last event: every poll walked the
    history since, and retention deleting past it ended the watch."""
    now = [0.0]
    follower = EventFollower([Ev(3)], settle_s=1.0, clock=lambda: now[0])
    assert follower.fresh([], read_through=50) == []
    assert follower.after_id() == 2  # not before the read has settled: a late commit below 50 may come
    now[0] = 1.5
    assert follower.after_id() == 50
    assert follower.fresh([Ev(40), Ev(51)], read_through=60) == [Ev(51)]  # below the floor: shown already


def test_skip_to_asks_after_what_retention_deleted() -> None:
    follower = EventFollower([Ev(3)], clock=lambda: 0.0)
    follower.skip_to(20)
    assert follower.after_id() == 20
    assert follower.fresh([Ev(21)]) == [Ev(21)]
    follower.skip_to(10)  # never back
    assert follower.after_id() == 20

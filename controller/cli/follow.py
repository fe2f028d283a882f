"""Following the events history (`maiactl get events --watch`): every event shown once, none missed.

`ListEvents(after_id=N, oldest_first=true)` gives the oldest events after N (0 too). An event's
id is taken as it is written, not as its transaction commits, so on PostgreSQL two writers can
commit out of id order: a follower that asked from the last id it saw would pass an event still
being committed, and never see it. `EventFollower` asks from a little behind instead: from the highest id it had seen
`settle_s` seconds ago, and drops the ids it has shown already. An event whose transaction takes
longer than that to commit after a larger id was seen is still missed; the controller's
transactions take milliseconds. The price: each poll reads the last `settle_s` of events again
(~1,000 at 100 events/s), dropped here.

A reply also says how far its read reached (`read_through`, the highest id in the history, of
any object), and the follower's floor moves to that once it has settled too: following one quiet
object's events, the floor used to stay at its last event, days back, so that every poll walked
the whole history since, and the controller's event retention deleting past it answered
OUT_OF_RANGE. When that is answered all the same (the follower was stopped for longer than the
retention keeps events), `skip_to` resumes after what was deleted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

# How far behind the follower asks from: what a transaction may take to commit once a later one has.
SETTLE_S = 10.0
# The most events a ListEvents reply holds (`usecases/events.py`): a full one is followed by another ask.
PAGE = 1000


class HasId(Protocol):
    @property
    def id(self) -> int: ...


E = TypeVar("E", bound=HasId)


class EventFollower:
    """Which ids to ask after, and which events are new, for one follower of the history."""

    def __init__(self, shown: Sequence[HasId], *, settle_s: float = SETTLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`shown`: the events shown before following (oldest first; none: everything is new)."""
        self._settle_s = settle_s
        self._clock = clock
        # Every event up to `_floor` was shown, or had `settle_s` to commit: never asked for again.
        self._floor = shown[0].id - 1 if shown else 0
        self._seen = {e.id for e in shown}
        # (when, the highest id seen by then): `_floor` moves to it once `settle_s` has passed.
        self._marks: deque[tuple[float, int]] = deque()
        if shown:
            self._marks.append((clock(), shown[-1].id))

    def after_id(self) -> int:
        """The id to ask after: the highest seen `settle_s` ago (the ids shown since are kept)."""
        now = self._clock()
        while self._marks and now - self._marks[0][0] >= self._settle_s:
            self._floor = max(self._floor, self._marks.popleft()[1])
        self._seen = {i for i in self._seen if i > self._floor}
        return self._floor

    def fresh(self, events: Sequence[E], read_through: int = 0) -> list[E]:
        """The events not shown before, in the order given; from now on they count as shown.
        `read_through`: how far the read that returned them reached (0: as far as the last)."""
        new = [e for e in events if e.id > self._floor and e.id not in self._seen]
        self._seen.update(e.id for e in new)
        reached = max(max(self._seen, default=0), read_through)
        if reached:
            self._marks.append((self._clock(), reached))
        return new

    def skip_to(self, event_id: int) -> None:
        """Ask after `event_id` from now on: those up to it are gone (the controller's retention)."""
        self._floor = max(self._floor, event_id)
        self._seen = {i for i in self._seen if i > self._floor}


def read_after(fetch: Callable[[int], tuple[Sequence[E], int]], after_id: int) -> tuple[list[E], int]:
    """Every event after `after_id`, oldest first, and how far the last read reached:
    `fetch(after)` (one ListEvents: its events and `read_through`) asked again from the last id
    while a reply is full."""
    got: list[E] = []
    while True:
        page, read_through = fetch(after_id)
        got.extend(page)
        if len(page) < PAGE:
            return got, read_through
        after_id = page[-1].id

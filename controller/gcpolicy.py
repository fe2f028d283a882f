"""The cyclic garbage collector's thresholds for the long-running processes (`maia-controller`,
`maia-simnode`).

Both keep a large, long-lived heap (a controller: ORM rows, agent sessions, a warm cluster; a fleet:
hundreds of simulated nodes) and allocate many short-lived objects per request. With CPython's
default thresholds (700, 10, 10) a young-generation collection runs every 700 net allocations, so
the objects of every request in flight at that moment survive it and are promoted; promotions
pile up and force a full collection, which walks the whole heap, every few seconds. Measured on
the end-to-end benchmark (1,024 simulated nodes, SQLite, 64 clients, load ~9): about 14 % of the
controller's CPU went to collections, full ones taking up to 0.16 s of event-loop time each; with
the thresholds below, 0.22 s in all over the whole run. A request's objects are freed by reference
counting long before a collection: only cycles wait for one, and these thresholds still collect
them every 20,000 (young) and 1,000,000 (middle) net allocations.

Once warm (`WarmHeapFreezer`: its agents connected, their sessions, streams and the cluster's
warm state built), the controller moves its heap out of the collector's reach (`gc.freeze`): the
middle and full collections then walk only what was made since, not the ~800,000 objects of a
controller of 4,096 nodes and 10,000 placements (a full collection of that heap held the event
loop 0.68 s; the first middle collection after the agents joined, 0.34 s). Frozen objects are
still freed when their last reference goes; only cycles are kept: those alive at the freeze that
become garbage later (a few hundred objects of calls in flight), and those already garbage in the
old generation, which only the pacer's full collection empties (21,141 garbage objects in the frozen
heap 40 s into the submits after a 4,096-node join, against 4,669 when paced collections were
young ones: one run each). The warm cluster is frozen again each time the reconciler builds it
whole (`WarmHeapFreezer.built`: at the start and at a re-sync).

The controller's collections are paced by time (`CollectionPacer`), not by the collector's count
alone. The count is net (allocations minus deallocations, of any generation's objects), and each of
the 4,096 agent streams' pending read (a coroutine, an async generator's step, a Future, gRPC's
callback and batch tags, the message: ~20 objects a stream) is made anew at each heartbeat while
the one before is freed: the count hardly moves, and the young generation fills with every
stream's pending read. At 50 submits/s it reached 20,000 every ~12 s, and each young collection
then walked ~100,000 objects (58-72 ms holding the GIL, measured at 4,096 nodes). Collected every
`PACED_EVERY_S`, a collection walks what was made since and is alive: mostly the pending reads of
the streams that beat in that time (measured at 0.5 s, 50 submits/s: 4,000-13,000 objects, 75-90 %
of them alive, ~20 a read; every pending read survives the collection that first sees it, for it
lives until the stream's next message).

Each paced collection is a middle one (generation 1: the young generation and what CPython's own
young collections promoted since the last tick, usually nothing), not a young one, so what
survives it goes straight to the old generation and is not walked again before a full
collection: however often the pacer runs, each object is walked about once, so a shorter period
means shorter pauses, not more walking (only objects of calls in flight are caught a little more
often). Two things made the middle generation the controller's longest pauses (138-211 ms, every
~20 s of the join and of saturation, at 4,096 nodes) when the paced collections were young ones:
- every `gc.collect(0)` adds one to the middle generation's count (CPython 3.11 gcmodule.c,
  `gc_collect_main`: `generations[generation+1].count += 1`), so after `MIDDLE_EVERY` paced ones
  the next collection CPython started itself (20,000 net allocations between two ticks: at joins,
  at saturation) was made a middle one, whatever the pacer's own count said;
- by then the middle generation held what all those young collections had promoted and was still
  alive (118,000-330,000 objects in a probe: every stream's pending read, the reports and beats
  the streams keep, and during the join each stream's task and generators and the warm build's
  rows), walked at once.
So, while the pacer runs, CPython's own collections are young ones only (`PacedThresholds`: the
older generations' thresholds out of reach), and the pacer starts the middle and full ones: a
middle one every tick, and a full one every `PACED_OLD_EVERY` ticks, which walks what survived
since the heap was last frozen (every live stream's pending read and the state made since: the
one long pause left, every 5 minutes) so that cycles among old objects are still collected.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

log = logging.getLogger("maia.gc")

YOUNG_THRESHOLD = 20_000  # net allocations between young-generation collections (CPython: 700)
MIDDLE_EVERY = 50         # young collections per middle-generation collection (CPython: 10; unpaced processes)
OLD_EVERY = 20            # middle collections before a full one is considered (CPython: 10; unpaced processes)


def configure_gc() -> None:
    """Set the collector's thresholds for a long-running, request-serving process."""
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_EVERY, OLD_EVERY)


# The controller's collections: one every PACED_EVERY_S, a middle one that walks what was made since
# the last (at 4,096 streams beating every ~8 s, 500 heartbeats a second, ~100 pending reads and
# what the calls of that time left alive); every PACED_OLD_EVERY-th a full one (5 minutes). Each
# object is walked once before it reaches the old generation however often they run: more often
# means shorter pauses, not more of them in all.
PACED_EVERY_S = 0.2
PACED_OLD_EVERY = round(300 / PACED_EVERY_S)

# What the older generations' thresholds are set to while the pacer runs: counts that never get
# there (`gc.set_threshold` takes C ints), so CPython's own collections stay young ones.
OUT_OF_REACH = 2**31 - 1


class PacedThresholds:
    """While held (by each running pacer; the first sets, the last restores), CPython starts
    young collections only: the older generations' thresholds are out of reach, since the pacer
    starts those collections itself (module docstring)."""

    _holders = 0
    _before: tuple[int, int, int] = (0, 0, 0)

    def __enter__(self) -> None:
        cls = PacedThresholds
        if cls._holders == 0:
            cls._before = gc.get_threshold()
            gc.set_threshold(cls._before[0], OUT_OF_REACH, OUT_OF_REACH)
        cls._holders += 1

    def __exit__(self, *exc: object) -> None:
        cls = PacedThresholds
        cls._holders -= 1
        if cls._holders == 0:
            gc.set_threshold(*cls._before)


class CollectionPacer:
    """A middle collection every tick, and every `old_every`-th a full one (module docstring)."""

    def __init__(self, *, old_every: int = PACED_OLD_EVERY, collect: Callable[[int], int] = gc.collect) -> None:
        self._old_every = old_every
        self._collect = collect
        self._ticks = 0

    def tick(self) -> int:
        """One paced collection; the generation it collected."""
        self._ticks += 1
        generation = 2 if self._ticks % self._old_every == 0 else 1
        self._collect(generation)
        return generation

    async def run(self, every_s: float = PACED_EVERY_S) -> None:
        """A collection every `every_s` until cancelled, CPython's own ones young only meanwhile."""
        with PacedThresholds():
            while True:
                await asyncio.sleep(every_s)
                self.tick()


# The warm measure (connected agents) is read this often; unchanged this many reads in a row, it
# has settled and the heap is frozen; frozen again only once it settles this much higher (a fleet
# joined): each freeze keeps the cycles alive at that moment, so not at every change.
FREEZE_CHECK_S = 5.0
FREEZE_SETTLED_READS = 3
REFREEZE_GROWTH = 1.25


def freeze_heap() -> None:
    """Move every object the collector tracks now out of its collections (`gc.freeze`: a splice of
    its lists), with no collection first (that would walk the whole heap at once). Nor is what it
    froze counted: `gc.get_freeze_count` walks the frozen list (124 ms for ~330,000 objects, measured
    on the event loop at 4,096 nodes)."""
    gc.freeze()


class WarmHeapFreezer:
    """Freezes the heap once the process is warm: `measure` (how much long-lived state it holds:
    the connected agents) read unchanged `settled_reads` times in a row, above zero, and at least
    `growth` times what it was at the last freeze (module docstring)."""

    def __init__(self, measure: Callable[[], int], *, settled_reads: int = FREEZE_SETTLED_READS,
                 growth: float = REFREEZE_GROWTH, freeze: Callable[[], None] = freeze_heap) -> None:
        self._measure = measure
        self._settled_reads = settled_reads
        self._growth = growth
        self._freeze = freeze
        self._last: int | None = None
        self._same = 0
        self.frozen_at: int | None = None  # the measure at the last freeze (None: never frozen)
        self.builds_frozen = 0  # freezes after a warm state was built (`built`)

    def read(self) -> bool:
        """One read of the measure; whether it froze the heap."""
        value = self._measure()
        self._same = self._same + 1 if value == self._last else 1
        self._last = value
        if (self._same < self._settled_reads or value <= 0
                or (self.frozen_at is not None and value < self.frozen_at * self._growth)):
            return False
        self._freeze()
        self.frozen_at = value
        log.info("heap frozen out of the collector's reach (warm measure %d)", value)
        return True

    def built(self) -> None:
        """Long-lived state was just built whole (the reconciler's warm cluster, read afresh: at
        the start, and at each re-sync): frozen at once, before young collections walk it and
        promote it, and middle and full ones walk it again."""
        self._freeze()
        self.builds_frozen += 1
        log.debug("heap frozen after a warm state was built (%d so far)", self.builds_frozen)

    async def run(self, every_s: float = FREEZE_CHECK_S) -> None:
        """Read the measure every `every_s` until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            self.read()

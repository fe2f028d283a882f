"""The collector's policy for the long-running processes (`controller.gcpolicy`): the heap is
frozen once the process is warm (its measure settled above zero), not before, and again only
after it grew by the re-freeze factor."""

from __future__ import annotations

import asyncio
import contextlib
import gc

from controller.gcpolicy import CollectionPacer, WarmHeapFreezer, freeze_heap


def _freezer(values: list[int], *, settled_reads: int = 3, growth: float = 1.25) -> tuple[WarmHeapFreezer, list[int]]:
    """A freezer reading `values` in turn; the values it froze at."""
    reads = iter(values)
    frozen: list[int] = []
    freezer = WarmHeapFreezer(lambda: next(reads), settled_reads=settled_reads, growth=growth,
                              freeze=lambda: frozen.append(len(frozen)))
    return freezer, frozen


def test_the_heap_is_frozen_once_the_measure_settles_above_zero() -> None:
    values = [0, 0, 0, 0, 100, 300, 300, 300, 300, 300]
    freezer, frozen = _freezer(values)
    froze = [freezer.read() for _ in values]
    assert froze == [False] * 7 + [True, False, False]  # the third equal read of 300, once
    assert frozen == [0] and freezer.frozen_at == 300


def test_frozen_again_only_after_the_measure_grew_by_the_factor_and_settled() -> None:
    values = [400, 400, 400, 450, 450, 450, 450, 500, 500, 500, 300, 300, 300]
    freezer, frozen = _freezer(values)
    froze = [i for i, _ in enumerate(values) if freezer.read()]
    assert froze == [2, 9]  # at 400; 450 is not 1.25x 400, 500 is; a shrink never freezes
    assert len(frozen) == 2 and freezer.frozen_at == 500


def test_freeze_heap_moves_the_tracked_objects_out_of_the_generations() -> None:
    gc.collect()
    kept = [[i] for i in range(1000)]  # tracked containers, alive
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert not any(o is kept for o in gc.get_objects(2))  # out of the full collection's walk
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_a_built_warm_state_is_frozen_at_once_whatever_the_measure() -> None:
    freezer, frozen = _freezer([])
    freezer.built()
    freezer.built()
    assert frozen == [0, 1] and freezer.builds_frozen == 2 and freezer.frozen_at is None


def test_paced_collections_are_middle_ones_with_a_full_one_every_nth() -> None:
    collected: list[int] = []
    pacer = CollectionPacer(old_every=3, collect=lambda generation: collected.append(generation) or 0)
    generations = [pacer.tick() for _ in range(7)]
    assert generations == collected == [1, 1, 2, 1, 1, 2, 1]


def test_a_paced_collection_walks_only_what_was_made_since_the_last() -> None:
    """What the pacer exists for: a collection takes what it found alive out of the young and the
    middle generations, so the next one walks only what was made after it (the count alone would
    let them pile up)."""
    gc.collect()
    gc.disable()  # no collection but the pacer's
    try:
        kept = [[i] for i in range(1000)]
        assert any(o is kept for o in gc.get_objects(0))
        CollectionPacer().tick()
        assert not any(o is kept for o in gc.get_objects(0) + gc.get_objects(1))
    finally:
        gc.enable()


async def test_while_the_pacer_runs_the_collections_cpython_starts_itself_stay_young() -> None:
    """In CPython 3.11 every collection of a generation adds one to the next one's count, and the
    collection CPython next starts itself is made one of the oldest generation whose count is
    past its threshold: without the pacer's thresholds, 50 paced collections (or 50 of CPython's
    own young ones) made the next one a middle one, walking all the young ones promoted."""
    before = gc.get_threshold()
    automatic: list[int] = []
    paced: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and not collecting_paced:
            automatic.append(info["generation"])

    def collect(generation: int) -> int:
        nonlocal collecting_paced
        collecting_paced = True
        try:
            paced.append(generation)
            return gc.collect(generation)
        finally:
            collecting_paced = False

    collecting_paced = False
    gc.set_threshold(100, 10, 10)  # the controller's semantics, in small numbers
    gc.callbacks.append(seen)
    pacer = asyncio.create_task(CollectionPacer(old_every=1_000, collect=collect).run(every_s=0))
    try:
        while len(paced) < 30:  # three times the middle generation's threshold
            await asyncio.sleep(0)
        assert gc.get_threshold()[0] == 100
        garbage_free = [[i] for i in range(100 * 30)]  # thirty of CPython's own collections, no tick between
        assert len(automatic) >= 25 and set(automatic) == {0}
        del garbage_free
    finally:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
        gc.callbacks.remove(seen)
        now = gc.get_threshold()
        gc.set_threshold(*before)
    assert now == (100, 10, 10)  # restored once the pacer stopped

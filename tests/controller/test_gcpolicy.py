"""The collector's policy for the long-running processes (`controller.gcpolicy`): the heap is
frozen once the process is warm (its measure settled above zero), not before, and again only
after it grew by the re-freeze factor."""

from __future__ import annotations

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


def test_paced_collections_are_young_with_a_middle_one_every_nth_and_a_full_one_every_nth_middle() -> None:
    collected: list[int] = []
    pacer = CollectionPacer(middle_every=3, old_every=2, collect=lambda generation: collected.append(generation) or 0)
    generations = [pacer.tick() for _ in range(12)]
    assert generations == collected == [0, 0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 2]


def test_a_paced_young_collection_walks_only_what_was_made_since_the_last() -> None:
    """What the pacer exists for: a collection takes the young objects out of the young generation,
    so the next one walks only what was made after it (the count alone would let them pile up)."""
    gc.collect()
    gc.disable()  # no collection but the pacer's
    try:
        kept = [[i] for i in range(1000)]
        assert any(o is kept for o in gc.get_objects(0))
        CollectionPacer(middle_every=1_000).tick()
        assert not any(o is kept for o in gc.get_objects(0))
    finally:
        gc.enable()

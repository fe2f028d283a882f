"""The warm cluster's heap goes out of the collector's walks each time it is built whole (issue 8:
a cache read afresh at the start or at a re-sync otherwise sat in the young generation, walked by
young collections and promoted, then walked again by middle and full ones): the reconciler tells
the collector policy (`gcpolicy.WarmHeapFreezer.built`), and only then, not on passes that follow
it as deltas."""

from __future__ import annotations

from controller.gcpolicy import WarmHeapFreezer
from controller.reconcile import Reconciler
from controller.store.db import Database
from uc_builders import deployment, no_publish, submit


async def test_the_heap_is_frozen_when_the_warm_cluster_is_built_and_at_each_re_sync(cluster: Database) -> None:
    frozen: list[int] = []
    freezer = WarmHeapFreezer(lambda: 0, freeze=lambda: frozen.append(len(frozen)))
    loop = Reconciler(cluster, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=60_000,
                      backoff_s=0.0, on_warm_built=freezer.built)

    await submit(cluster, deployment("first", accelerators=2, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 0  # read whole: the cache built
    assert len(frozen) == 1

    await submit(cluster, deployment("second", accelerators=1, locality="node"))
    assert (await loop.reconcile_once()).solved and loop.fast_passes == 1  # on the cache: nothing built
    assert len(frozen) == 1

    assert (await loop.reconcile_once(force=True)).solved  # a whole pass on the cache: followed, not built
    assert len(frozen) == 1

    loop._warm.drop()  # what a change the cache cannot follow does: the next pass reads the cluster again
    assert (await loop.reconcile_once(force=True)).solved and loop.warm_snapshot is not None
    assert len(frozen) == 2
    assert freezer.builds_frozen == 2
    assert freezer.frozen_at is None  # the agents' measure is its own: no join counted

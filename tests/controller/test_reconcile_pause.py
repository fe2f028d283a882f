"""The run loop pauses after a whole-cluster pass as long as that pass took (a join storm must
not turn the event loop into back-to-back snapshots), and not after a pass that did less."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controller import reconcile
from controller.reconcile import Reconciler, ReconcileOutcome


async def _publish(nodes: set[str], deleted: list[Any]) -> None:
    pass


@pytest.mark.parametrize("full", [True, False])
async def test_a_whole_cluster_pass_is_followed_by_a_pause_as_long_as_it(monkeypatch, full: bool) -> None:
    r = Reconciler(None, push=lambda nodes: None, publish=_publish, interval_s=0.001, settle_s=0.0)  # type: ignore[arg-type]
    passes: list[float] = []
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def one_pass(*, force: bool = False) -> ReconcileOutcome:  # what the real pass records
        began = reconcile.time.perf_counter()
        await real_sleep(0.05)  # the pass's own work
        if full:
            r.full_passes += 1
            r._full_pass_s = reconcile.time.perf_counter() - began
        else:
            r._full_pass_s = 0.0
        passes.append(r._full_pass_s)
        if len(passes) == 3:
            raise asyncio.CancelledError
        return ReconcileOutcome()

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(r, "reconcile_once", one_pass)
    monkeypatch.setattr(reconcile.asyncio, "sleep", sleep)
    r.wake()
    with pytest.raises(asyncio.CancelledError):
        await r.run()
    if full:
        assert len(pauses) >= 2 and all(p >= 0.05 for p in pauses[-2:])
        assert pauses[-2:] == passes[:2]
    else:
        assert not [p for p in pauses if p > 0.01]

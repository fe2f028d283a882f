"""What `bench e2e` reads from its WatchDeployments stream: the submits start once the watch
has listed the deployments that exist, and each commit's delivery is timed from the
deployment's updated_at. Never its times (those are for docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import time

from bench.e2e import Run, _seen, watch_listed
from maia.v1 import deployments_pb2 as D

ADDED, MODIFIED = D.DeploymentEvent.TYPE_ADDED, D.DeploymentEvent.TYPE_MODIFIED


def _event(kind: int, name: str, *, placed: int = 0, updated_s: float = 0.0) -> D.DeploymentEvent:
    event = D.DeploymentEvent(type=kind, deployment=D.Deployment(
        spec=D.DeploymentSpec(name=name, tenant="lab-a", replicas=1), placed_replicas=placed))
    event.deployment.updated_at.FromNanoseconds(int(updated_s * 1e9))
    return event


async def test_the_submits_wait_until_the_watch_listed_the_preloaded_deployments() -> None:
    run = Run(names=frozenset({"mine"}), preexisting=3)
    waiting = asyncio.create_task(watch_listed(run, timeout_s=60))
    for i in range(2):
        _seen(run, _event(ADDED, f"pre-{i}"), time.perf_counter())
    _seen(run, _event(MODIFIED, "pre-0"), time.perf_counter())  # a change is not the listing
    await asyncio.sleep(0)
    assert not waiting.done()
    _seen(run, _event(ADDED, "pre-2"), time.perf_counter())
    await asyncio.wait_for(waiting, timeout=60)
    assert run.listed == 3 and run.errors == []


async def test_a_watch_that_never_lists_them_is_an_error_not_a_hang() -> None:
    run = Run(names=frozenset({"mine"}), preexisting=3)
    await watch_listed(run, timeout_s=0.01)
    assert run.errors == ["the watch listed 0 of the 3 preloaded deployments in 0 s"]


def test_a_commit_is_timed_from_its_updated_at_to_the_watch_seeing_it() -> None:
    run = Run(names=frozenset({"mine"}))
    _seen(run, _event(MODIFIED, "mine", placed=0, updated_s=time.time() - 30), time.perf_counter())
    assert run.times["mine"].commit_seen_ms is None  # not placed yet
    committed_at = time.time() - 2.0
    _seen(run, _event(MODIFIED, "mine", placed=1, updated_s=committed_at), time.perf_counter())
    assert 2000.0 <= run.times["mine"].commit_seen_ms < 60_000.0
    _seen(run, _event(MODIFIED, "mine", placed=1, updated_s=time.time()), time.perf_counter())
    assert run.times["mine"].commit_seen_ms >= 2000.0  # the first event seen committed counts

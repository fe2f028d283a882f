"""The reconcile loop on a thread of its own (`Reconciler(own_thread=True)`, when asked;
`scheduling/own_loop.py`): its passes run on that thread's event loop with their own
database connections, what they push to nodes and publish to watchers is handed to the
controller's loop (the views of what changed read on the reconciler's connection), wakes and resyncs reach it from the controller's loop, and cancelling `run`
stops the thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from controller.reconcile import NoObserver, Reconciler
from controller.scheduling.own_loop import OwnLoop
from controller.domain.values import DeploymentView
from controller.store.db import Database, UnitOfWork
from controller.usecases.deployments import views_of
from uc_builders import deployment, submit


class ThreadsSeen(NoObserver):
    def __init__(self) -> None:
        self.passes: list[tuple[str, str]] = []  # (path, thread name)

    def pass_taken(self, path: str) -> None:
        self.passes.append((path, threading.current_thread().name))


async def _until(condition: Any, what: str) -> None:
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def test_passes_run_on_their_own_thread_and_hand_pushes_and_publishes_to_the_controllers_loop(
        cluster: Database) -> None:
    main = threading.current_thread().name
    pushed: list[tuple[str, set[str]]] = []
    published: list[tuple[str, set[str]]] = []

    def push(nodes: set[str]) -> None:
        pushed.append((threading.current_thread().name, set(nodes)))

    read_on: set[str] = set()

    async def read_views(uow: UnitOfWork, keys: set[str]) -> list[DeploymentView]:
        read_on.add(threading.current_thread().name)
        return await views_of(uow, keys)

    async def publish(changed: set[str], deleted: list[Any], views: list[DeploymentView]) -> None:
        await asyncio.sleep(0)  # a coroutine of the controller's loop
        assert {v.spec.key for v in views} == changed  # read by the reconciler, handed over
        published.append((threading.current_thread().name, set(changed)))

    seen = ThreadsSeen()
    r = Reconciler(cluster, push=push, publish=publish, read_views=read_views, observer=seen, own_thread=True,
                   interval_s=0.2, solve_time_limit_ms=60_000, backoff_s=0.0)
    task = asyncio.create_task(r.run())
    await submit(cluster, deployment("first", accelerators=2, locality="node"))
    r.wake()
    await _until(lambda: any("t1/first" in names for _, names in published), "first published")
    await submit(cluster, deployment("second", accelerators=2, locality="node"))
    r.wake()
    await _until(lambda: any("t1/second" in names for _, names in published), "second published")
    assert pushed and {name for name, _ in pushed + published} == {main}
    assert {thread for _, thread in seen.passes} == read_on == {"reconciler"}
    assert [path for path, _ in seen.passes][:2] == ["full", "fast"]

    r.resync()  # from the controller's loop, as on election: one whole-cluster pass
    await _until(lambda: [path for path, _ in seen.passes].count("full") == 2, "the resync's full pass")

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "reconciler" not in {t.name for t in threading.enumerate()}
    async with cluster.unit_of_work() as uow:  # the controller's own handle is the reconciler's again
        assert r._state.db is cluster and uow is not None


async def test_by_default_passes_run_on_the_loop_that_runs_the_reconciler(cluster: Database) -> None:
    """On either database (`cluster` is both): the passes' thread is the controller's, no
    "reconciler" thread is started (docs/benchmarks.md, `ownloop`: the PostgreSQL default moved)."""
    main = threading.current_thread().name
    published: list[set[str]] = []

    async def publish(changed: set[str], deleted: list[Any], views: list[DeploymentView]) -> None:
        published.append(set(changed))

    seen = ThreadsSeen()
    r = Reconciler(cluster, push=lambda nodes: None, publish=publish, read_views=views_of, observer=seen,
                   interval_s=0.2, solve_time_limit_ms=60_000, backoff_s=0.0)
    task = asyncio.create_task(r.run())
    await submit(cluster, deployment("first", accelerators=2, locality="node"))
    r.wake()
    await _until(lambda: any("t1/first" in names for names in published), "first published")
    assert seen.passes and {thread for _, thread in seen.passes} == {main}
    assert "reconciler" not in {t.name for t in threading.enumerate()}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_own_loop_reports_the_works_error_and_stops_when_cancelled() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the work broke")

    with pytest.raises(RuntimeError, match="the work broke"):
        await OwnLoop("failing").run(fails)

    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    own = OwnLoop("forever")
    task = asyncio.create_task(own.run(forever))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "forever" not in {t.name for t in threading.enumerate()} and own.loop.is_closed()

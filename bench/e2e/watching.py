"""What the run learns from the controller's WatchDeploymentBatches stream: when each deployment
is committed, runs and is gone (timestamped as seen, and from its updated_at), whether the watch
has listed the preloaded deployments before the submits start, and the deletions settling."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.e2e.load import Run, Times


async def watch(channel: Any, run: Run) -> None:
    """Timestamps commits, Running and deletions from `WatchDeploymentBatches` (WatchDeployments'
    events several to a message: one event a message, a busy controller streamed ~65 a second at
    4,096 nodes, and a pass's burst waited seconds for the watch), watching again when the
    controller cuts the stream off (a watcher that falls behind is ended UNAVAILABLE; the new
    stream starts with the current state, so a deployment committed or running meanwhile is
    stamped when it is seen)."""
    import grpc
    from maia.v1 import deployments_pb2, deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    while True:
        run.watches += 1
        run.listed = 0
        try:
            async for batch in stub.WatchDeploymentBatches(deployments_pb2.WatchDeploymentsRequest()):
                now = time.perf_counter()
                for event in batch.events:
                    _seen(run, event, now)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                run.errors.append(f"watch: {exc.code().name} {exc.details()}")
                return
        await asyncio.sleep(0.1)


def _seen(run: Run, event: Any, now: float) -> None:
    from maia.v1 import deployments_pb2
    d = event.deployment
    if d.spec.name not in run.names:
        if event.type == deployments_pb2.DeploymentEvent.TYPE_ADDED:
            run.listed += 1
            if run.listed >= run.preexisting:
                run.current_listed.set()
        return
    t = run.times.setdefault(d.spec.name, Times())
    if event.type == deployments_pb2.DeploymentEvent.TYPE_DELETED:
        t.deleted = t.deleted or now
        return
    if not t.committed and d.placed_replicas >= d.spec.replicas:
        t.committed = now
        # updated_at: when the commit that placed the last replica began (a later change only
        # makes it later), on this machine's clock
        t.commit_at = d.updated_at.ToMicroseconds() / 1e6
        t.commit_seen_ms = (time.time() - t.commit_at) * 1000
    if not t.running and d.phase == deployments_pb2.DEPLOYMENT_PHASE_RUNNING:
        t.running = now
        t.running_at = d.updated_at.ToMicroseconds() / 1e6
        t.running_seen_ms = (time.time() - t.running_at) * 1000
        run.newly_running.put_nowait(d.spec.name)
        run.running += 1
        if run.running >= run.expected:
            run.all_running.set()


async def watch_listed(run: Run, timeout_s: float) -> None:
    """Until the watch is established before the first submit: it has listed the deployments
    that exist (the preloaded ones: what a watch starts with), or, with none, half a second."""
    if not run.preexisting:
        await asyncio.sleep(0.5)
        return
    try:
        await asyncio.wait_for(run.current_listed.wait(), timeout=timeout_s)
    except TimeoutError:
        run.errors.append(f"the watch listed {run.listed} of the {run.preexisting} preloaded deployments "
                          f"in {timeout_s:.0f} s")


async def _settle_deletions(run: Run, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if all(t.deleted for t in run.times.values() if t.delete_sent):
            return
        await asyncio.sleep(0.2)
    run.errors.append("deleted deployments still present after the run")

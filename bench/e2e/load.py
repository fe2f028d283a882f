"""The load the clients offer: what each deployment's times are (`Times`) and what the run's
clients, watch and deleters share (`Run`); the submits in a closed loop (`client`, one call at a
time, `--submit-batch` several deployments a call) or an open one (`offered`: arrivals at a rate,
never waiting for answers); and the deleters, every `--delete-every`-th deployment to run."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.e2e.cluster import Work
from controller.api.interceptors import SENT_AT_METADATA_KEY


@dataclass
class Times:
    submitted: float = 0.0      # the submit call started
    acknowledged: float = 0.0   # it returned
    committed: float = 0.0      # first seen with every replica placed
    commit_seen_ms: float | None = None  # from that commit (the deployment's updated_at) to seeing it
    commit_at: float = 0.0      # that updated_at (seconds since the epoch, the controller's clock)
    running: float = 0.0
    running_at: float = 0.0     # updated_at when first seen Running: the flush that recorded it
    running_seen_ms: float | None = None  # from that flush to seeing it
    delete_due: float = 0.0     # picked for deletion (seen Running): sent then, or once a deleter is free
    delete_sent: float = 0.0
    delete_answered: float = 0.0
    deleted: float = 0.0


@dataclass
class Run:
    times: dict[str, Times] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    delete_rpc_ms: list[float] = field(default_factory=list)
    deleters: int = 1  # concurrent deleting clients (`deleter`)
    all_running: asyncio.Event = field(default_factory=asyncio.Event)
    newly_running: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    expected: int = 0
    names: frozenset[str] = frozenset()  # the workload's (the preloaded deployments are not watched)
    running: int = 0
    watches: int = 0  # WatchDeployments streams opened (more than one: the controller cut one off)
    # The current state a watch starts with: the preloaded deployments it must list before the
    # first submit (else the submits' events queue behind that list and their delivery is timed).
    preexisting: int = 0
    listed: int = 0  # by the stream open now
    current_listed: asyncio.Event = field(default_factory=asyncio.Event)
    send_late_ms: list[float] = field(default_factory=list)  # open loop: each submit sent this late
    # The bench's own event loop, late by this much every tick from the first submit: when it is
    # small, what the clients and the watch wait for is the controller (and the transport).
    loop_lag_ms: list[float] = field(default_factory=list)
    sending_s: float = 0.0  # open loop: from the first submit sent to the last


async def submit_one(stub: Any, work: Work, run: Run) -> None:
    """One SubmitDeployment, timestamped (an error is recorded and the deployment not waited for)."""
    import grpc
    from maia.v1 import deployments_pb2
    t = run.times.setdefault(work.name, Times())
    request = deployments_pb2.SubmitDeploymentRequest(spec=work.spec())
    t.submitted = time.perf_counter()
    try:
        # the send time: the controller observes the call's wait before its handler (maia_grpc_server_queued_seconds)
        await stub.SubmitDeployment(request, timeout=60, metadata=((SENT_AT_METADATA_KEY, f"{time.time():.6f}"),))
    except grpc.aio.AioRpcError as exc:
        _refused(run, f"submit {work.name}: {exc.code().name} {exc.details()}")
        return
    t.acknowledged = time.perf_counter()


async def submit_many(stub: Any, works: list[Work], run: Run) -> None:
    """One SubmitDeployments call of `works`, each timestamped as `submit_one` times its own call
    (submitted and answered with the call); a request the answer refuses is recorded as an error."""
    import grpc
    from google.rpc import code_pb2
    from maia.v1 import deployments_pb2
    request = deployments_pb2.SubmitDeploymentsRequest(
        requests=[deployments_pb2.SubmitDeploymentRequest(spec=work.spec()) for work in works])
    started = time.perf_counter()
    for work in works:
        run.times.setdefault(work.name, Times()).submitted = started
    try:
        answer = await stub.SubmitDeployments(request, timeout=60,
                                              metadata=((SENT_AT_METADATA_KEY, f"{time.time():.6f}"),))
    except grpc.aio.AioRpcError as exc:
        for work in works:
            _refused(run, f"submit {work.name}: {exc.code().name} {exc.details()}")
        return
    answered = time.perf_counter()
    for work, result in zip(works, answer.results, strict=True):
        if result.HasField("error"):
            _refused(run, f"submit {work.name}: {code_pb2.Code.Name(result.error.code)} {result.error.message}")
        else:
            run.times[work.name].acknowledged = answered


def _refused(run: Run, error: str) -> None:
    """A submit refused: recorded, and its deployment not waited for."""
    run.errors.append(error)
    run.expected -= 1
    if run.running >= run.expected:
        run.all_running.set()


async def client(channel: Any, queue: list[Work], run: Run, batch: int = 1) -> None:
    """Closed loop: the next submit once the last was answered. With `batch` K > 1 the next up to
    K single-shard deployments go in one SubmitDeployments call (a gang alone, as before)."""
    from maia.v1 import deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    while queue:
        if batch == 1 or queue[-1].shards > 1:
            await submit_one(stub, queue.pop(), run)
            continue
        works: list[Work] = []
        while queue and len(works) < batch and queue[-1].shards == 1:
            works.append(queue.pop())
        await submit_many(stub, works, run)


def arrival_offsets(count: int, rate: float, poisson: bool, rng: random.Random) -> list[float]:
    """Seconds from the start at which `count` arrivals come, `rate` a second: exponential gaps
    (a Poisson process) or even ones."""
    offsets, at = [], 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate) if poisson else 1.0 / rate
    return offsets


async def open_loop(offsets: Sequence[float], send: Any, late_ms: list[float]) -> float:
    """Call `send(i)` (a coroutine function) as a task of its own at each arrival `offsets[i]`
    (seconds from now), never waiting for an answer; appends how late each was sent (ms) to
    `late_ms`. Returns the seconds from the first send to the last; waits for every call."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    calls: list[asyncio.Task[Any]] = []
    try:
        for i, offset in enumerate(offsets):
            wait = start + offset - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            late_ms.append(max(0.0, loop.time() - start - offset) * 1000)
            calls.append(asyncio.create_task(send(i)))
        sent_s = loop.time() - start
        await asyncio.gather(*calls)
    finally:
        for call in calls:
            call.cancel()
    return sent_s


async def offered(channel: Any, works: list[Work], run: Run, rate: float, poisson: bool, seed: int) -> None:
    """Open loop: every deployment submitted at its arrival time, `rate` a second."""
    from maia.v1 import deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    offsets = arrival_offsets(len(works), rate, poisson, random.Random(seed))
    run.sending_s = await open_loop(offsets, lambda i: submit_one(stub, works[i], run), run.send_late_ms)


async def deleter(channel: Any, run: Run, every: int, deleters: int = 1) -> None:
    """Deletes every `every`-th deployment that starts running, while the submits go on, by
    `deleters` clients: each sends its next delete once the last was answered, so with one there is
    never more than one delete at the controller, with N up to N (those due meanwhile wait here)."""
    due: asyncio.Queue[str] = asyncio.Queue()
    clients = [asyncio.create_task(_delete_each(channel, run, due)) for _ in range(deleters)]
    try:
        seen = 0
        while True:
            name = await run.newly_running.get()
            if not name:  # the run is over
                break
            seen += 1
            if seen % every == 0:
                run.times[name].delete_due = time.perf_counter()
                due.put_nowait(name)
        for _ in clients:
            due.put_nowait("")
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()


async def _delete_each(channel: Any, run: Run, due: asyncio.Queue[str]) -> None:
    """One deleting client: the deployments `due` names, one after another, until an empty name."""
    import grpc
    from maia.v1 import deployments_pb2, deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    while True:
        name = await due.get()
        if not name:
            return
        t = run.times[name]
        t.delete_sent = time.perf_counter()
        try:
            await stub.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name=name), timeout=60)
        except grpc.aio.AioRpcError as exc:
            run.errors.append(f"delete {name}: {exc.code().name} {exc.details()}")
            continue
        t.delete_answered = time.perf_counter()
        run.delete_rpc_ms.append((t.delete_answered - t.delete_sent) * 1000)

"""Test harness for the real thing: an in-process controller on 127.0.0.1:0, stubs, simulated
node fleets as `maia-simnode` subprocesses, an in-test agent, and polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
from sqlalchemy import select

from controller.api.server import ControllerApp
from controller.bearer import TOKEN_ENV, aio_channel
from controller.config import Config
from controller.identity import CONTROLLER, Role
from controller.simnode.transport import status_lost
from controller.store import models as m
from controller.store.db import Database
from controller.domain.values import NodeInfo
from controller.usecases import agents as agent_cases
from controller.usecases import tokens
from maia.v1 import (
    admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, audit_pb2_grpc, common_pb2, deployments_pb2,
    deployments_pb2_grpc,
)

T = TypeVar("T")

# What integration tests run the controller with: quick loops, a short heartbeat timeout, short
# node-lifecycle graces (a silent node is down after 0.5 s more, its work evicted after 1 s).
TEST_CONFIG = Config(listen="127.0.0.1:0", reconcile_interval_s=0.2, heartbeat_timeout_s=2.0,
                     solve_time_limit_ms=1000, health_interval_s=0.5, watchdog_interval_s=0.5,
                     node_down_grace_s=0.5, node_eviction_grace_s=1.0, restart_grace_s=1.0,
                     # A lone test controller must not step down because a renewal was slow on a
                     # loaded machine (failover is tested with real processes and short leases).
                     lease_ttl_s=30.0,
                     # A decide process is an interpreter more for each of the hundreds of controllers
                     # these tests start, and beside their point; the default (on) is tested with real
                     # `maia-controller` processes (tests/cli, tests/simnode, test_decider.py), and a
                     # test about it would pass `decide_process=True`.
                     decide_process=False)


@asynccontextmanager
async def running_controller(db_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[ControllerApp]:
    """An in-process controller on 127.0.0.1:0 (TEST_CONFIG with `overrides`, authentication on,
    its bootstrap admin token in `tmp_path`), stopped after."""
    app = ControllerApp(replace(TEST_CONFIG, db_url=db_url, bootstrap_admin_token_file=str(tmp_path / "admin.token"),
                                **overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


@asynccontextmanager
async def controller_with_rack(db_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[ControllerApp, Stubs]]:
    """`running_controller` with admin stubs on it and rack rack-a (row row-a) applied."""
    async with running_controller(db_url, tmp_path, **overrides) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            yield app, stubs
        finally:
            await stubs.channel.close()


async def heard_node(app: ControllerApp, node: str = "n1", rack: str = "rack-00") -> None:
    """Rack `rack` (row row-a) applied through the API, and node `node` registered in it and heard
    from (its Hello, written by the use cases): a node the leader has a heartbeat lag for."""
    async with Stubs.connect(app.address, admin_token_of(app)).channel as channel:
        await Stubs.on(channel).admin.ApplyTopology(topology({rack: "row-a"}))
    async with app.db.unit_of_work() as uow:
        reg = await agent_cases.register_node(uow, CONTROLLER, NodeInfo(node, rack, 4), heartbeat_interval_ms=1000)
    async with app.db.unit_of_work() as uow:
        assert await agent_cases.hello(uow, CONTROLLER, node, reg.session_id, datetime.now(timezone.utc))


RUNNING = deployments_pb2.DEPLOYMENT_PHASE_RUNNING
PENDING = deployments_pb2.DEPLOYMENT_PHASE_PENDING


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    deployments: deployments_pb2_grpc.DeploymentServiceStub
    admin: admin_pb2_grpc.AdminServiceStub
    agent: agent_pb2_grpc.NodeAgentServiceStub
    audit: audit_pb2_grpc.AuditServiceStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> Stubs:
        return cls(channel, deployments_pb2_grpc.DeploymentServiceStub(channel),
                   admin_pb2_grpc.AdminServiceStub(channel), agent_pb2_grpc.NodeAgentServiceStub(channel),
                   audit_pb2_grpc.AuditServiceStub(channel))

    @classmethod
    def connect(cls, address: str, token: str | None) -> Stubs:
        """Stubs on a new channel whose every call carries `token` (none: anonymous)."""
        return cls.on(aio_channel(address, token))


def admin_token_of(app: Any) -> str:
    """The admin token a `ControllerApp` wrote to its bootstrap file at start."""
    return Path(app.config.bootstrap_admin_token_file or "").read_text().strip()


async def issue_token(db: Database, role: Role | str, *, tenant: str = "", name: str = "",
                      ttl_s: float | None = None) -> str:
    """A real token straight from the store (as `maiactl token create` would make), its bearer text."""
    async with db.unit_of_work() as uow:
        issued = tokens.add_token(uow, CONTROLLER, role=Role(role), name=name, tenant=tenant, ttl_s=ttl_s)
        await uow.commit()
    return issued.secret


async def eventually(probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], *,
                     timeout: float = 30.0, every: float = 0.1, what: str = "condition") -> T:
    """Poll `probe` until `check` holds; fail with the last value seen after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await probe()
            if check(last):
                return last
        except grpc.aio.AioRpcError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s; last value: {last}")
        await asyncio.sleep(every)


class BlackholeProxy:
    """A TCP proxy to `upstream` whose network can die silently and come back: `go_silent` and
    the connections open then drop what either side sends, for good (no FIN, no RST: their state
    is lost, as on a host that rebooted or behind a NAT that forgot them), and new connections are
    accepted but held; `heal` forwards the held ones and every one made after. `delay_s`: every
    read is held that long before it is passed on, as over a distant link (the HTTP/2 and TLS
    handshakes take several of them)."""

    def __init__(self, upstream: str, delay_s: float = 0.0) -> None:
        self._host, _, port = upstream.rpartition(":")
        self._port = int(port)
        self._delay_s = delay_s
        self._era = 0  # go_silent starts a new one; a connection forwards only in its own
        self._healed = asyncio.Event()
        self._healed.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def go_silent(self) -> None:
        self._era += 1
        self._healed.clear()

    def heal(self) -> None:
        self._healed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        held = asyncio.current_task()
        assert held is not None
        self._tasks.add(held)  # type: ignore[arg-type]
        await self._healed.wait()  # what the client sent meanwhile waits in the socket
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers.append(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self._tasks.add(asyncio.create_task(self._pump(source, sink, self._era)))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, era: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if self._delay_s:
                    await asyncio.sleep(self._delay_s)
                if era == self._era:
                    sink.write(data)
                    await sink.drain()
        # EOF: keep the other side open (a dead network tells nobody)


async def connect_answer(agent: agent_pb2_grpc.NodeAgentServiceStub, hello: agent_pb2.Hello,
                         *, tries: int = 5) -> tuple[grpc.StatusCode, Any]:
    """What a Connect that says `hello` is answered: OK and its first message, or the status it
    ends with (the error itself). A status grpcio's client lost to its own write race
    (`controller.simnode.transport.status_lost`; a refused Connect that goes on writing, about one
    time in three; one that writes only its hello, rarely) is asked again, at most `tries` times;
    any other answer is final."""
    for _ in range(tries):
        try:
            async for message in agent.Connect(iter([agent_pb2.AgentMessage(hello=hello)])):
                return grpc.StatusCode.OK, message
            return grpc.StatusCode.OK, None
        except grpc.aio.AioRpcError as exc:
            if not status_lost(exc):
                return exc.code(), exc
            lost = exc
    raise AssertionError(f"Connect's status was lost to the client's write race {tries} times: {lost!r}")


def topology(racks: dict[str, str], *, rack_budget_w: float | None = None) -> admin_pb2.Topology:
    """Zone z1 with the given racks (rack -> row)."""
    msg = admin_pb2.Topology(zones=[admin_pb2.Zone(id="z1")])
    for row in sorted(set(racks.values())):
        msg.rows.add(id=row, zone="z1")
    for rack, row in racks.items():
        r = msg.racks.add(id=rack, row=row)
        if rack_budget_w is not None:
            r.power_budget_w = rack_budget_w
    return msg


def spec(name: str, tenant: str = "lab", *, replicas: int = 1, shards: int = 1, accelerators: int = 1,
         locality: int = common_pb2.DOMAIN_RACK, models: tuple[str, ...] = (), **kw: Any) -> deployments_pb2.DeploymentSpec:
    return deployments_pb2.DeploymentSpec(
        name=name, tenant=tenant, replicas=replicas, shards_per_replica=shards, locality=locality,
        shard=common_pb2.ShardSpec(accelerators=accelerators, hbm_gib=16, power_w=400,
                                   accelerator_models=list(models)),
        **kw,
    )


async def connected_agent(stubs: Stubs, node_id: str, rack: str = "rack-a") -> HandAgent:
    """A hand agent registered and connected, its first set read (its stream served)."""
    agent = HandAgent(stubs, node_id, rack)
    await agent.register()
    await agent.connect()
    await agent.next_set()
    return agent


class SimFleet:
    """`maia-simnode` in a subprocess: racks x nodes real agents against the controller."""

    def __init__(self, address: str, *, racks: int, nodes_per_rack: int, token: str, rack_prefix: str = "rack-",
                 model: str = "maia-100", log_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.node_ids = [f"{rack_prefix}{r:02d}-n{n:02d}" for r in range(racks) for n in range(nodes_per_rack)]
        self.log_path = log_dir / f"simnode-{rack_prefix.strip('-')}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.simnode.main", "--controller", address, "--racks", str(racks),
             "--nodes-per-rack", str(nodes_per_rack), "--rack-prefix", rack_prefix, "--model", model,
             "--load-delay", "0.2", "--state-dir", str(log_dir / "simnode-state"), *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", TOKEN_ENV: token},
        )

    def kill(self) -> None:
        """SIGKILL: the agents vanish without closing their streams."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def stop(self) -> None:
        """SIGTERM, and wait for the exit (SIGKILL after 15 s) in a thread, off the event loop.
        Each agent half-closes its stream and waits up to `STOP_GRACE_S` (2 s) for the controller
        to end it: an in-process controller shares the test's loop, and a wait that blocked the
        loop kept it from answering, so every stop took those 2 s."""
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@asynccontextmanager
async def running_fleet(stubs: Stubs, app: Any, log_dir: Path, racks: dict[str, str], *,
                        nodes_per_rack: int = 4, tenants: tuple[str, ...] = ("lab",)) -> AsyncIterator[SimFleet]:
    """The topology `racks`, `tenants`, and a `maia-simnode` fleet on the first racks (named
    rack-NN), every agent connected and its node ready; stopped afterwards."""
    await stubs.admin.ApplyTopology(topology(racks))
    for tenant in tenants:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))
    bootstrap = await issue_token(app.db, "node-bootstrap", name="fleet")
    count = sum(1 for rack in racks if rack.startswith("rack-"))
    sim = SimFleet(app.address, racks=count, nodes_per_rack=nodes_per_rack, token=bootstrap, log_dir=log_dir)
    try:
        await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                         lambda r: sum(n.connected and n.state == common_pb2.NODE_STATE_READY
                                       for n in r.nodes) == count * nodes_per_rack,
                         timeout=30, what=f"{count * nodes_per_rack} agents connected")
        yield sim
    finally:
        await sim.stop()


class HandAgent:
    """A minimal hand-driven agent: Register, Connect with Hello, read sets, send reports."""

    def __init__(self, stubs: Stubs, node_id: str, rack: str, *, accelerators: int = 4, model: str = "maia-100") -> None:
        self.stubs = stubs
        self.info = agent_pb2.NodeInfo(node_id=node_id, hostname=node_id, rack=rack, accelerators=accelerators,
                                       accelerator_model=model, hbm_gib=64, idle_power_w=500)
        self.session_id = ""
        self.sets: asyncio.Queue[agent_pb2.AssignmentSet] = asyncio.Queue()
        self.told_intervals_ms: list[int] = []  # the HeartbeatPolicy messages received
        self._out: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._beating: asyncio.Task | None = None
        self.beat_power_w = 0.0  # what `keep_beating`'s heartbeats report

    async def register(self) -> agent_pb2.RegisterResponse:
        reply = await self.stubs.agent.Register(agent_pb2.RegisterRequest(node=self.info))
        self.session_id = reply.session_id
        return reply

    async def _outbound(self):
        while True:
            message = await self._out.get()
            if message is None:
                return
            yield message

    async def connect(self, session_id: str | None = None, *, heartbeat_interval_ms: int = 0) -> None:
        """Open Connect with a Hello (stating `heartbeat_interval_ms`; 0: none, as older agents)."""
        self.call = self.stubs.agent.Connect(self._outbound())
        self.send(agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_id=self.info.node_id,
                                                               session_id=session_id or self.session_id,
                                                               heartbeat_interval_ms=heartbeat_interval_ms)))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            body = message.WhichOneof("body")
            if body == "heartbeat_policy":
                self.told_intervals_ms.append(message.heartbeat_policy.heartbeat_interval_ms)
            elif body == "assignments":
                await self.sets.put(message.assignments)

    def send(self, message: agent_pb2.AgentMessage) -> None:
        self._out.put_nowait(message)

    def report(self, assignment: agent_pb2.Assignment, phase: int) -> None:
        self.send(agent_pb2.AgentMessage(shard_status=agent_pb2.ShardStatus(
            deployment=assignment.deployment, replica=assignment.replica, shard=assignment.shard,
            generation=assignment.generation, phase=phase)))

    def heartbeat(self, seq: int, power_w: float) -> None:
        self.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq, power_draw_w=power_w)))

    def keep_beating(self, every_s: float = 0.5, power_w: float = 500.0) -> None:
        """Heartbeats every `every_s` until `close()`, as a live agent sends them: for tests whose
        node must stay ready however slow the machine is (the test controller's timeout is 2 s).
        They report `beat_power_w` (`power_w` until a test sets another draw)."""
        self.beat_power_w = power_w

        async def beat() -> None:
            for seq in itertools.count(1):
                self.heartbeat(seq, self.beat_power_w)
                await asyncio.sleep(every_s)

        self._beating = asyncio.create_task(beat())

    def stop_beating(self) -> None:
        """No more heartbeats from `keep_beating`; the stream stays open."""
        if self._beating is not None:
            self._beating.cancel()

    async def next_set(self, check: Callable[[agent_pb2.AssignmentSet], bool] = lambda s: True,
                       timeout: float = 20.0) -> agent_pb2.AssignmentSet:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching AssignmentSet for {self.info.node_id} in {timeout}s")
            current = await asyncio.wait_for(self.sets.get(), remaining)
            if check(current):
                return current

    async def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        self._out.put_nowait(None)
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.CancelledError):
                pass

    async def reader_error(self) -> grpc.aio.AioRpcError | None:
        try:
            await asyncio.wait_for(self._reader, 10)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None


async def api_state(stubs: Stubs) -> tuple:
    """Everything a refused request could have written, as read back through the API. Not the
    reconciler's judgement of a pending deployment (its reasons, and the time they were written):
    a pass may rewrite it at any time (a solve past its time limit on a loaded machine added a
    TIME_LIMIT reason between two reads while the refused call wrote nothing)."""
    deployments = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
    for deployment in deployments.deployments:
        deployment.ClearField("reasons")
        deployment.ClearField("updated_at")
    tenants = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    topo = await stubs.admin.GetTopology(admin_pb2.GetTopologyRequest())
    nodes = await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())
    api_tokens = await stubs.admin.ListTokens(admin_pb2.ListTokensRequest(page_size=500))
    return (deployments.SerializeToString(deterministic=True), tenants.SerializeToString(deterministic=True),
            topo.SerializeToString(deterministic=True),
            [(n.id, n.hostname, dict(n.labels), n.accelerators) for n in nodes.nodes],
            api_tokens.SerializeToString(deterministic=True))


async def written_state(app: ControllerApp, stubs: Stubs) -> tuple:
    """`api_state`, and what the API shows of a node only mixed with its liveness (a down node
    reads DOWN, cordoned or not): its cordon and drain marks as stored. What a test on a shared
    controller must leave as it found it (tests/integration/conftest.py, `shared_seeded`)."""
    async with app.db.unit_of_work() as uow:
        marks = (await uow.session.execute(
            select(m.Node.id, m.Node.cordoned, m.Node.draining).order_by(m.Node.id))).all()
    return await api_state(stubs), marks


@asynccontextmanager
async def controlled_fleet(app: Any, tmp_path: Path, *, racks: int = 2,
                           nodes_per_rack: int = 2) -> AsyncIterator[tuple[Stubs, SimFleet, Path]]:
    """Admin stubs, a fleet serving a control socket (`maia-simnode fault ...`) and the socket's
    path, on a topology of `racks` racks in one row and tenant "lab"; stopped after."""
    stubs = Stubs.connect(app.address, admin_token_of(app))
    control = tmp_path / "fleet.sock"
    await stubs.admin.ApplyTopology(topology({f"rack-{r:02d}": "row-a" for r in range(racks)}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    token = await issue_token(app.db, "node-bootstrap", name="fleet")
    fleet = SimFleet(app.address, racks=racks, nodes_per_rack=nodes_per_rack, token=token, log_dir=tmp_path,
                     extra_args=("--control-socket", str(control)))
    try:
        yield stubs, fleet, control
    finally:
        await fleet.stop()
        await stubs.channel.close()

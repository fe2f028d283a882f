"""Stopping a controller that holds many agent streams: every stream ends with a status the agent
acts on (UNAVAILABLE, "controller is stopping": it goes to the next controller), a Register still queued is refused UNAVAILABLE with
nothing written (never cut off by the end of the grace), and the process exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from sqlalchemy import select

from controller.main import SHUTDOWN_DEADLINE_S
from controller.store import models as m
from controller.store.db import Database
from grpc_harness import HandAgent, SimFleet, Stubs, admin_token_of, eventually, running_controller, topology
from maia.v1 import admin_pb2, agent_pb2

AGENTS = 200
RACKS = 10


async def test_a_stop_ends_every_agent_stream_and_refuses_the_queued_register(migrated_db_url: str, tmp_path: Path) -> None:
    """200 agents connected, one Register queued behind the admission gate's only place (held):
    the stop refuses the queued Register UNAVAILABLE at once (it is neither written nor cancelled
    by the server at the end of the grace) and ends every stream with the controller's UNAVAILABLE
    ("controller is stopping", which sends an agent to the next controller). None of these calls is
    cut off (CANCELLED) by the server's grace running out."""
    # A 60 s heartbeat timeout: the 200 streams are silent until the stop, and with the test
    # controller's 2 s the first ones were ended before the last connected under load (.ci/run).
    async with running_controller(migrated_db_url, tmp_path, agent_admission_concurrency=1,
                                  agent_admission_queue=AGENTS, heartbeat_timeout_s=60) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        agents = [HandAgent(stubs, f"n{i:03d}", f"rack-{i % RACKS:02d}") for i in range(AGENTS)]
        try:
            await stubs.admin.ApplyTopology(topology({f"rack-{r:02d}": "row-a" for r in range(RACKS)}))
            for i in range(0, AGENTS, 20):
                await asyncio.gather(*(a.register() for a in agents[i:i + 20]))
            for agent in agents:
                await agent.connect()
            await asyncio.gather(*(agent.next_set() for agent in agents))  # every stream open and served
            assert len(app.hub.connected()) == AGENTS

            gate = app.hub.admission
            inside, release = asyncio.Event(), asyncio.Event()

            async def hold_the_gate() -> None:
                async with gate.admit():
                    inside.set()
                    await release.wait()

            holder = asyncio.create_task(hold_the_gate())
            await inside.wait()
            late = agent_pb2.NodeInfo(node_id="late", rack="rack-00", accelerators=4, accelerator_model="maia-100")
            queued = asyncio.ensure_future(stubs.agent.Register(agent_pb2.RegisterRequest(node=late), timeout=60))
            await eventually(lambda: _now(gate.waiting), lambda n: n == 1, timeout=20, what="the Register queued")

            await app.stop(grace_s=5.0)
            release.set()
            await holder

            try:
                await queued
                raise AssertionError("the queued Register was served after the stop began")
            except grpc.aio.AioRpcError as refused:
                assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
                assert "shutting down" in refused.details() and "nothing was written" in refused.details()
            assert gate.abandoned == 0
            ended = [await agent.reader_error() for agent in agents]
            # every stream ended by the controller's answer, none cut off
            assert {(e.code(), e.details().partition(":")[0]) for e in ended if e is not None} == {
                (grpc.StatusCode.UNAVAILABLE, "controller is stopping")}
            assert None not in ended
            assert app.hub.connected() == frozenset()
        finally:
            for agent in agents:
                await agent.close()
            await stubs.channel.close()
    db = Database(migrated_db_url)
    try:
        async with db.unit_of_work() as uow:
            nodes = set(await uow.session.scalars(select(m.Node.id)))
    finally:
        await db.dispose()
    assert "late" not in nodes and len(nodes) == AGENTS


async def _now(value: int) -> int:
    return value


def test_sigterm_with_a_fleet_connected_ends_every_stream_and_exits_0(tmp_path: Path) -> None:
    """A real `maia-controller` with 256 `maia-simnode` agents connected (one shared connection),
    SIGTERM: it exits 0 (not EXIT_STUCK from its own shutdown deadline), having ended the 256
    streams; the agents saw their streams ended by the controller (not broken): told it stops, or
    that answer lost to grpcio's client (grpc/grpc#36066: a heartbeat written as the stream ended)."""
    racks, per_rack = 16, 16
    token_file = tmp_path / "admin.token"
    log_path = tmp_path / "controller.log"
    log = log_path.open("w")  # a file, not a pipe: nobody reads the log while the fleet joins
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.main", "--listen", "127.0.0.1:0", "--db",
         f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", "--bootstrap-admin-token-file", str(token_file),
         "--heartbeat-timeout", "30", "--no-decide-process"],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    fleet: SimFleet | None = None
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("maia-controller listening on "), log_path.read_text() if proc.poll() else line
        address = line.rsplit(" ", 1)[1]

        async def setup() -> str:  # the topology, and a node-bootstrap token for the fleet
            stubs = Stubs.connect(address, token_file.read_text().strip())
            try:
                await stubs.admin.ApplyTopology(topology({f"rack-{r:02d}": "row-a" for r in range(racks)}))
                return (await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="node-bootstrap"))).secret
            finally:
                await stubs.channel.close()

        async def joined() -> None:
            stubs = Stubs.connect(address, token_file.read_text().strip())
            try:
                await eventually(lambda: stubs.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest()),
                                 lambda s: s.nodes_ready == racks * per_rack, timeout=120, every=0.5,
                                 what=f"{racks * per_rack} nodes ready")
            finally:
                await stubs.channel.close()

        fleet = SimFleet(address, racks=racks, nodes_per_rack=per_rack, token=asyncio.run(setup()), log_dir=tmp_path,
                         extra_args=("--shared-channel", "--stagger", "0"))
        asyncio.run(joined())
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=SHUTDOWN_DEADLINE_S + 30)
        err = log_path.read_text()
        assert code == 0, err[-3000:]
        assert f'"msg": "{racks * per_rack} agent streams ended in ' in err
        assert '"msg": "stopped"' in err
        asyncio.run(fleet.stop())
        told = fleet.log_path.read_text(errors="replace")
        assert (told.count("stream ended by the controller: UNAVAILABLE: controller is stopping")
                + told.count("ended by the controller, its answer lost")) >= racks * per_rack
    finally:
        if fleet is not None:
            asyncio.run(fleet.stop())
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

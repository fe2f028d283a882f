"""A controller restart on the same database: agents reconnect, nothing is re-placed."""

from __future__ import annotations

from pathlib import Path

from controller.api.server import ControllerApp
from controller.config import Config
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


def _config(db_url: str, listen: str, token_file: Path) -> Config:
    return Config(listen=listen, db_url=db_url, reconcile_interval_s=0.2, heartbeat_timeout_s=3.0,
                  solve_time_limit_ms=1000, bootstrap_admin_token_file=str(token_file))


async def _running(stubs: Stubs) -> deployments_pb2.Deployment:
    return await eventually(
        lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
        lambda d: d.phase == RUNNING, what="svc running")


async def test_restart_keeps_placements_and_agents_reconnect(db_url: str, tmp_path: Path):
    token_file = tmp_path / "admin.token"
    first = ControllerApp(_config(db_url, "127.0.0.1:0", token_file))
    address = await first.start()
    token = token_file.read_text().strip()
    fleet = SimFleet(address, racks=1, nodes_per_rack=2, token=await issue_token(first.db, "node-bootstrap"),
                     log_dir=tmp_path)
    second: ControllerApp | None = None
    try:
        async with Stubs.connect(address, token).channel as channel:
            stubs = Stubs.on(channel)
            await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
            await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                             lambda r: sum(n.connected for n in r.nodes) == 2, what="agents connected")
            await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
                spec=spec("svc", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
            before = await _running(stubs)
        await first.stop(grace_s=0.5)

        second = ControllerApp(_config(db_url, address, token_file))  # same port: the agents know only this one
        await second.start()
        assert token_file.read_text().strip() == token  # an admin token exists: the file is left alone
        async with Stubs.connect(address, token).channel as channel:
            stubs = Stubs.on(channel)
            nodes = await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                                     lambda r: sum(n.connected for n in r.nodes) == 2, timeout=30,
                                     what="agents reconnected")
            assert all(n.state == common_pb2.NODE_STATE_READY for n in nodes.nodes)
            after = await _running(stubs)
        assert [(p.node, list(p.accelerator_indices)) for p in after.placements] == \
               [(p.node, list(p.accelerator_indices)) for p in before.placements]
        assert after.generation == before.generation  # nothing was placed again
    finally:
        fleet.stop()
        if second is not None:
            await second.stop(grace_s=0.5)
        else:
            await first.stop(grace_s=0.5)

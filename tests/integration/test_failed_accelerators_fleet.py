"""Failed accelerators end to end: a real `maia-simnode` fleet (control socket) fails one
accelerator of a node (`maia-simnode fault fail-accelerator`); its heartbeats say so, the
controller releases the replica that used it, places it again off that accelerator and places
nothing new on it, shows it on the node, and takes it back once repaired. SQLite here; the store
rules run on both backends in tests/controller/test_uc_faults.py."""

from __future__ import annotations

from pathlib import Path

from bench.checking import check_state
from controller.store.snapshot import load_snapshot
from grpc_harness import RUNNING, controlled_fleet, eventually, running_controller, spec
from maia.v1 import admin_pb2, common_pb2, deployments_pb2
from test_metrics import scrape, value
from test_simnode_faults_fleet import fault

D = deployments_pb2


async def test_a_failed_accelerator_sheds_its_shard_takes_no_new_one_and_comes_back_when_repaired(
        tmp_path: Path) -> None:
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path,
                                  metrics_listen="127.0.0.1:0") as app, \
            controlled_fleet(app, tmp_path) as (stubs, _, control):

        def get(name: str = "svc") -> D.Deployment:
            return stubs.deployments.GetDeployment(D.GetDeploymentRequest(name=name))

        def node(node_id: str) -> admin_pb2.Node:
            return stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=node_id))

        await stubs.deployments.SubmitDeployment(D.SubmitDeploymentRequest(
            spec=spec("svc", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
        before = await eventually(get, lambda d: d.phase == RUNNING, timeout=60, what="svc running")
        sick = next(p.node for p in before.placements if p.replica == 0)

        failed = await fault(control, "fail-accelerator", "--node", sick, "--index", "2",
                             "--reason", "uncorrectable ECC error")
        assert failed.returncode == 0, failed.stderr
        shown = await eventually(lambda: node(sick), lambda n: len(n.failed_accelerators) == 1, timeout=30,
                                 what="the failed accelerator on the node")
        assert (shown.failed_accelerators[0].index, shown.failed_accelerators[0].reason) == (
            2, "uncorrectable ECC error")
        await eventually(get, lambda d: d.phase == RUNNING and len(d.placements) == 2 and all(
            p.node != sick for p in d.placements), timeout=60, what="replica 0 running again off the failed accelerator")
        events = (await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", object_id=sick))).events
        assert "node.accelerator_failed" in [e.kind for e in events]
        samples = await scrape(app.metrics_address)
        assert value(samples, "maia_accelerators_failed", node=sick, rack=shown.rack) == 1
        # 4 nodes x 4 accelerators, svc's 8 held, the failed one neither held nor free
        assert value(samples, "maia_accelerators_free", model="maia-100", zone="z1") == 16 - 8 - 1

        # Four whole accelerators on one node: the sick node has three that work, so it takes none.
        await stubs.deployments.SubmitDeployment(D.SubmitDeploymentRequest(
            spec=spec("big", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
        big = await eventually(lambda: get("big"), lambda d: d.placed_replicas == 1 and d.reasons, timeout=30,
                               what="big placed where it fits")
        assert all(p.node != sick for p in big.placements)
        # Three fit beside the failed one.
        await stubs.deployments.SubmitDeployment(D.SubmitDeploymentRequest(
            spec=spec("three", accelerators=3, locality=common_pb2.DOMAIN_NODE)))
        three = await eventually(lambda: get("three"), lambda d: d.placed_replicas == 1, timeout=30,
                                 what="three placed")
        assert [(p.node, sorted(p.accelerator_indices)) for p in three.placements] == [(sick, [0, 1, 3])]

        repaired = await fault(control, "repair-accelerator", "--node", sick)
        assert repaired.returncode == 0, repaired.stderr
        await eventually(lambda: node(sick), lambda n: not n.failed_accelerators, timeout=30,
                         what="the accelerator repaired")
        events = (await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", object_id=sick))).events
        assert "node.accelerator_recovered" in [e.kind for e in events]
        async with app.db.unit_of_work() as uow:
            committed = (await load_snapshot(uow.session)).problem
        assert check_state(committed, committed["placements"]) == []

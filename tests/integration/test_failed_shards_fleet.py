"""FAILED shards end to end: a real `maia-simnode` fleet (control socket) fails a shard on
command (`maia-simnode fault fail-shard`); the controller places the replica again on another
node after its back-off and the service runs again; a shard that fails on every load makes the
deployment Failed with the agent's message. SQLite only: the store-level rules run on both
backends in tests/controller/test_failed_shards.py."""

from __future__ import annotations

from pathlib import Path

from bench.checking import check_state
from controller.store.snapshot import load_snapshot
from grpc_harness import RUNNING, controlled_fleet, eventually, running_controller, spec
from maia.v1 import common_pb2, deployments_pb2
from test_simnode_faults_fleet import fault

FAILED = deployments_pb2.DEPLOYMENT_PHASE_FAILED
SHARD_FAILED = common_pb2.SHARD_PHASE_FAILED


async def test_a_failed_shard_is_placed_again_elsewhere_and_one_that_keeps_failing_fails_the_deployment(
        tmp_path: Path) -> None:
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path,
                                  restart_backoff_s=0.5, restart_limit=2) as app, \
            controlled_fleet(app, tmp_path) as (stubs, _, control):

        def get() -> deployments_pb2.Deployment:
            return stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc"))

        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("svc", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
        before = await eventually(get, lambda d: d.phase == RUNNING, timeout=60, what="svc running")
        failed_on = next(p.node for p in before.placements if p.replica == 0)

        failing = await fault(control, "fail-shard", "--deployment", "svc", "--replica", "0", "--shard", "0",
                              "--message", "HBM ECC error")
        assert failing.returncode == 0, failing.stderr
        again = await eventually(get, lambda d: d.phase == RUNNING and any(
            p.replica == 0 and p.node != failed_on for p in d.placements), timeout=30,
            what="replica 0 running again on another node")
        assert not any(r.code == "SHARD_FAILED" for r in again.reasons)

        keeps = await fault(control, "fail-shard", "--deployment", "svc", "--replica", "1", "--keep-failing",
                            "--message", "segfault in the loader")
        assert keeps.returncode == 0, keeps.stderr
        failed = await eventually(get, lambda d: d.phase == FAILED, timeout=30, what="svc failed")
        why = next(r.message for r in failed.reasons if r.code == "SHARD_FAILED")
        assert "segfault in the loader" in why and "failed 3 times in a row" in why
        assert any(p.replica == 1 and p.phase == SHARD_FAILED for p in failed.placements)
        assert any(p.replica == 0 and p.phase == common_pb2.SHARD_PHASE_RUNNING for p in failed.placements)
        async with app.db.unit_of_work() as uow:
            committed = (await load_snapshot(uow.session)).problem
        assert check_state(committed, committed["placements"]) == []

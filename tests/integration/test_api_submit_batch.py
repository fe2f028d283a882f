"""Concurrent submits through the real API (committed in batches, usecases/submits.py): each
call gets its own right answer and its own audit entry, and the chain verifies."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.api.server import ControllerApp
from controller.store import audit
from grpc_harness import Stubs, admin_token_of, running_controller, spec, topology
from maia.v1 import admin_pb2, agent_pb2, deployments_pb2

SUBMIT = "/maia.v1.DeploymentService/SubmitDeployment"


@pytest.fixture
async def throttled(migrated_db_url: str, tmp_path: Path) -> AsyncIterator[ControllerApp]:
    async with running_controller(migrated_db_url, tmp_path, submits_per_minute=3) as app:
        yield app


async def test_each_concurrent_submit_gets_its_own_answer_and_audit_entry(throttled: ControllerApp) -> None:
    stubs = Stubs.connect(throttled.address, admin_token_of(throttled))
    try:
        await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
        for tenant in ("dup-lab", "replay-lab", "slow"):
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))
        await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id="n1", rack="rack-a", accelerators=4, accelerator_model="maia-100")))
        calls = [("dup-lab", "dup", "a"), ("dup-lab", "dup", "b"),          # one name twice
                 ("replay-lab", "again", "r1"), ("replay-lab", "again", "r1")]  # one request retried
        calls += [("slow", f"s{i}", "") for i in range(5)]                  # 3 a minute
        results = await asyncio.gather(*(stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec(name, tenant), client_request_id=rid)) for tenant, name, rid in calls), return_exceptions=True)
        codes = Counter((tenant, "OK" if not isinstance(r, Exception) else r.code().name)
                        for (tenant, _, _), r in zip(calls, results))
        assert codes == {("dup-lab", "OK"): 1, ("dup-lab", "ALREADY_EXISTS"): 1, ("replay-lab", "OK"): 2,
                         ("slow", "OK"): 3, ("slow", "RESOURCE_EXHAUSTED"): 2}
        assert all(isinstance(r, grpc.aio.AioRpcError) or r.deployment.spec.name for r in results)
        listed = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
        assert sorted(d.spec.tenant for d in listed.deployments) == ["dup-lab", "replay-lab", "slow", "slow", "slow"]
        async with throttled.db.unit_of_work() as uow:
            entries = [e for e in await audit.list_entries(uow.session, limit=1000) if e.action == SUBMIT]
            assert (await audit.verify_chain(uow.session)).intact
        assert Counter((e.tenant, e.outcome) for e in entries) == codes  # one entry per call, its outcome
    finally:
        await stubs.channel.close()

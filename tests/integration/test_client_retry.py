"""The public client (`controller.cli.client.Controller`, maiactl's channel) against a real
controller: an ABORTED that is a conflict (a stale resource_version) carries no RetryInfo and is
not retried: exactly one attempt reaches the controller (each attempt of a mutating call is audited)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from controller.api.server import ControllerApp
from controller.cli.client import Controller
from controller.cli.config import Connection
from grpc_harness import Stubs, admin_token_of, spec
from maia.v1 import audit_pb2, deployments_pb2


def _update_with(address: str, token: str, request: deployments_pb2.UpdateDeploymentRequest) -> grpc.RpcError:
    client = Controller(Connection(address=address, token=token), timeout=10.0)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            client.deployments.UpdateDeployment(request, timeout=client.timeout)
        return refused.value
    finally:
        client.close()


async def test_an_update_based_on_a_stale_resource_version_is_sent_once(controller_app: ControllerApp,
                                                                       seeded: Stubs) -> None:
    read = await seeded.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="existing"))
    await seeded.deployments.UpdateDeployment(deployments_pb2.UpdateDeploymentRequest(
        spec=spec("existing", replicas=2), resource_version=read.resource_version))  # someone else's change
    stale = deployments_pb2.UpdateDeploymentRequest(spec=spec("existing", replicas=3),
                                                    resource_version=read.resource_version)
    refused = await asyncio.to_thread(_update_with, controller_app.address, admin_token_of(controller_app), stale)
    assert refused.code() == grpc.StatusCode.ABORTED and "changed since resource version" in refused.details()
    events = (await seeded.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=1000))).events
    attempts = [e for e in events if e.action.endswith("/UpdateDeployment") and e.outcome == "ABORTED"]
    assert len(attempts) == 1, [(e.action, e.outcome) for e in events]

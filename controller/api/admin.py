"""AdminService: protobuf in, use case, protobuf out. No rules here (a dry run: `api.dryrun`)."""

from __future__ import annotations

import asyncio

from grpc import aio

from controller.api import convert, dryrun
from controller.api.deps import ServiceDeps
from controller.identity import Role, current_principal
from controller.usecases import agents, events, nodes, policy, tenants, tokens, topology
from maia.v1 import admin_pb2, admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._deps = deps

    # --- tenants -----------------------------------------------------------------------------
    async def CreateTenant(self, request: admin_pb2.Tenant, context: aio.ServicerContext) -> admin_pb2.Tenant:
        async with self._deps.db.unit_of_work() as uow:
            view = await tenants.create_tenant(uow, current_principal(), convert.tenant_spec(request), self._deps.signals,
                                               dry_run=dryrun.asked(context, dryrun.CREATE_TENANT))
        return convert.tenant_msg(view)

    async def UpdateTenant(self, request: admin_pb2.Tenant, context: aio.ServicerContext) -> admin_pb2.Tenant:
        async with self._deps.db.unit_of_work() as uow:
            view = await tenants.update_tenant(uow, current_principal(), convert.tenant_spec(request), self._deps.signals,
                                               dry_run=dryrun.asked(context, dryrun.UPDATE_TENANT))
        return convert.tenant_msg(view)

    async def GetTenant(self, request: admin_pb2.GetTenantRequest, context: aio.ServicerContext) -> admin_pb2.Tenant:
        async with self._deps.db.unit_of_work() as uow:
            return convert.tenant_msg(await tenants.get_tenant(uow, current_principal(), request.id))

    async def ListTenants(self, request: admin_pb2.ListTenantsRequest,
                          context: aio.ServicerContext) -> admin_pb2.ListTenantsResponse:
        async with self._deps.db.unit_of_work() as uow:
            page = await tenants.list_tenants(uow, current_principal(), convert.page_request(request))
        return admin_pb2.ListTenantsResponse(tenants=[convert.tenant_msg(v) for v in page.items],
                                             next_page_token=page.next_token)

    async def DeleteTenant(self, request: admin_pb2.DeleteTenantRequest,
                           context: aio.ServicerContext) -> admin_pb2.DeleteTenantResponse:
        async with self._deps.db.unit_of_work() as uow:
            await tenants.delete_tenant(uow, current_principal(), request.id, self._deps.signals)
        return admin_pb2.DeleteTenantResponse()

    # --- topology ----------------------------------------------------------------------------
    async def ApplyTopology(self, request: admin_pb2.Topology, context: aio.ServicerContext) -> admin_pb2.Topology:
        async with self._deps.db.unit_of_work() as uow:
            view = await topology.apply_topology(uow, current_principal(), convert.topology_spec(request),
                                                 self._deps.signals, dry_run=dryrun.asked(context, dryrun.APPLY_TOPOLOGY))
        return convert.topology_msg(view)

    async def GetTopology(self, request: admin_pb2.GetTopologyRequest,
                          context: aio.ServicerContext) -> admin_pb2.Topology:
        async with self._deps.db.unit_of_work() as uow:
            return convert.topology_msg(await topology.get_topology(uow, current_principal()))

    async def DeleteRack(self, request: admin_pb2.TopologyItemRequest,
                         context: aio.ServicerContext) -> admin_pb2.Topology:
        return await self._delete_item("rack", request.id)

    async def DeleteRow(self, request: admin_pb2.TopologyItemRequest,
                        context: aio.ServicerContext) -> admin_pb2.Topology:
        return await self._delete_item("row", request.id)

    async def DeleteZone(self, request: admin_pb2.TopologyItemRequest,
                         context: aio.ServicerContext) -> admin_pb2.Topology:
        return await self._delete_item("zone", request.id)

    async def _delete_item(self, kind: str, item_id: str) -> admin_pb2.Topology:
        async with self._deps.db.unit_of_work() as uow:
            view = await topology.delete_item(uow, current_principal(), kind, item_id, self._deps.signals)
        return convert.topology_msg(view)

    # --- nodes -------------------------------------------------------------------------------
    async def ListNodes(self, request: admin_pb2.ListNodesRequest,
                        context: aio.ServicerContext) -> admin_pb2.ListNodesResponse:
        async with self._deps.db.unit_of_work() as uow:
            page = await nodes.list_nodes(uow, current_principal(), self._deps.connected(), self._deps.last_heard(),
                                          request.rack, convert.page_request(request))
        return admin_pb2.ListNodesResponse(nodes=[convert.node_msg(v) for v in page.items],
                                           next_page_token=page.next_token)

    async def GetNode(self, request: admin_pb2.GetNodeRequest, context: aio.ServicerContext) -> admin_pb2.Node:
        async with self._deps.db.unit_of_work() as uow:
            view = await nodes.get_node(uow, current_principal(), request.id, self._deps.connected(),
                                        self._deps.last_heard())
        return convert.node_msg(view)

    async def CordonNode(self, request: admin_pb2.NodeRequest, context: aio.ServicerContext) -> admin_pb2.Node:
        async with self._deps.db.unit_of_work() as uow:
            view = await nodes.cordon_node(uow, current_principal(), request.id, self._deps.signals,
                                           self._deps.connected(), self._deps.last_heard())
        return convert.node_msg(view)

    async def UncordonNode(self, request: admin_pb2.NodeRequest, context: aio.ServicerContext) -> admin_pb2.Node:
        async with self._deps.db.unit_of_work() as uow:
            view = await nodes.uncordon_node(uow, current_principal(), request.id, self._deps.signals,
                                             self._deps.connected(), self._deps.last_heard())
        return convert.node_msg(view)

    async def DrainNode(self, request: admin_pb2.NodeRequest, context: aio.ServicerContext) -> admin_pb2.Node:
        async with self._deps.db.unit_of_work() as uow:
            view = await nodes.drain_node(uow, current_principal(), request.id, self._deps.signals,
                                          self._deps.connected(), self._deps.last_heard())
        return convert.node_msg(view)

    async def DeleteNode(self, request: admin_pb2.NodeRequest,
                         context: aio.ServicerContext) -> admin_pb2.DeleteNodeResponse:
        async with self._deps.db.unit_of_work() as uow:
            await nodes.delete_node(uow, current_principal(), request.id, self._deps.signals)
        return admin_pb2.DeleteNodeResponse()

    async def ResetNodeCredential(self, request: admin_pb2.NodeRequest,
                                  context: aio.ServicerContext) -> admin_pb2.ResetNodeCredentialResponse:
        async with self._deps.db.unit_of_work() as uow:
            revoked = await agents.reset_node_credential(uow, current_principal(), request.id, self._deps.signals)
        return admin_pb2.ResetNodeCredentialResponse(node_id=request.id, revoked_token_ids=revoked)

    async def GetClusterSummary(self, request: admin_pb2.GetClusterSummaryRequest,
                                context: aio.ServicerContext) -> admin_pb2.ClusterSummary:
        async with self._deps.db.unit_of_work() as uow:
            return convert.cluster_summary_msg(await nodes.cluster_summary(uow, current_principal()))

    async def GetClusterSnapshot(self, request: admin_pb2.GetClusterSnapshotRequest,
                                 context: aio.ServicerContext) -> admin_pb2.ClusterSnapshot:
        async with self._deps.db.read_unit() as uow:  # every table as of one moment
            return convert.cluster_snapshot_msg(await nodes.cluster_snapshot(uow, current_principal()))

    # --- tokens ------------------------------------------------------------------------------
    async def CreateToken(self, request: admin_pb2.CreateTokenRequest,
                          context: aio.ServicerContext) -> admin_pb2.CreateTokenResponse:
        async with self._deps.db.unit_of_work() as uow:
            issued = await tokens.create_token(uow, current_principal(), convert.token_request(request))
        return admin_pb2.CreateTokenResponse(token=convert.token_msg(issued.view), secret=issued.secret)

    async def ListTokens(self, request: admin_pb2.ListTokensRequest,
                         context: aio.ServicerContext) -> admin_pb2.ListTokensResponse:
        async with self._deps.db.unit_of_work() as uow:
            page = await tokens.list_tokens(uow, current_principal(), role=request.role, tenant=request.tenant,
                                            page=convert.page_request(request))
        return admin_pb2.ListTokensResponse(tokens=[convert.token_msg(v) for v in page.items],
                                            next_page_token=page.next_token)

    async def RevokeToken(self, request: admin_pb2.RevokeTokenRequest, context: aio.ServicerContext) -> admin_pb2.Token:
        async with self._deps.db.unit_of_work() as uow:
            view = await tokens.revoke_token(uow, current_principal(), request.id, self._deps.signals)
        return convert.token_msg(view)

    # --- events ------------------------------------------------------------------------------
    async def ListEvents(self, request: admin_pb2.ListEventsRequest,
                         context: aio.ServicerContext) -> admin_pb2.ListEventsResponse:
        async with self._deps.db.unit_of_work() as uow:
            read = await events.list_events(uow, current_principal(), object_kind=request.object_kind,
                                            object_id=request.object_id, tenant=request.tenant,
                                            after_id=request.after_id, limit=request.limit,
                                            oldest_first=request.oldest_first)
        return admin_pb2.ListEventsResponse(events=[convert.event_msg(v) for v in read.events],
                                            read_through=read.read_through)

    # --- version -----------------------------------------------------------------------------
    async def GetVersion(self, request: admin_pb2.GetVersionRequest,
                         context: aio.ServicerContext) -> admin_pb2.VersionInfo:
        from controller.version import version_text
        from controller.store.migrate import database_revision, head_revision

        # Admins and tenants (`maiactl version`); not the nodes' credentials, the fleet's bootstrap
        # token among them, which may Register and Connect and nothing else (docs/security.md):
        # the answer names the controllers' addresses and the schema they run.
        policy.require_role(current_principal(), "reading the controller's version", Role.TENANT)
        return admin_pb2.VersionInfo(version=version_text(), schema_revision=await asyncio.to_thread(head_revision),
                                     address=self._deps.advertised(), leader=self._deps.leads(),
                                     leader_address=self._deps.leader_address(),
                                     database_revision=await database_revision(self._deps.db) or "")

"""DeploymentService: protobuf in, use case, protobuf out. No rules here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone

from grpc import aio

from controller.api import convert
from controller.api.deps import ServiceDeps
from controller.identity import current_principal
from controller.usecases import deployments as cases
from controller.usecases.updates import update_deployment
from controller.usecases.usage import usage_report
from controller.usecases.watch import watch_deployment_batches, watch_deployments
from maia.v1 import deployments_pb2, deployments_pb2_grpc


class DeploymentServicer(deployments_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._deps = deps

    async def SubmitDeployment(self, request: deployments_pb2.SubmitDeploymentRequest,
                               context: aio.ServicerContext) -> deployments_pb2.SubmitDeploymentResponse:
        spec = convert.deployment_spec(request.spec)
        who = current_principal()
        if request.dry_run:
            view = await cases.dry_run_deployment(self._deps.db, who, spec,
                                                  time_limit_ms=self._deps.solve_time_limit_ms,
                                                  throttle=self._deps.throttle,
                                                  replace_existing=request.replace_existing)
        elif self._deps.submits is not None:
            view = await self._deps.submits.submit(who, spec, throttle=self._deps.throttle,
                                                   capacity=self._deps.capacity,
                                                   request_id=request.client_request_id)
        else:
            async with self._deps.db.unit_of_work() as uow:
                view = await cases.submit_deployment(uow, who, spec, self._deps.signals, self._deps.throttle,
                                                     self._deps.capacity, request_id=request.client_request_id)
        return deployments_pb2.SubmitDeploymentResponse(deployment=convert.deployment_msg(view),
                                                        dry_run=request.dry_run)

    async def UpdateDeployment(self, request: deployments_pb2.UpdateDeploymentRequest,
                               context: aio.ServicerContext) -> deployments_pb2.UpdateDeploymentResponse:
        spec = convert.deployment_spec(request.spec)
        async with self._deps.db.unit_of_work() as uow:
            result = await update_deployment(uow, current_principal(), spec, request.resource_version,
                                             self._deps.signals, request_id=request.client_request_id)
        return deployments_pb2.UpdateDeploymentResponse(deployment=convert.deployment_msg(result.deployment),
                                                        changes=list(result.changes), rolling=result.rolling)

    async def GetDeployment(self, request: deployments_pb2.GetDeploymentRequest,
                            context: aio.ServicerContext) -> deployments_pb2.Deployment:
        async with self._deps.db.unit_of_work() as uow:
            return convert.deployment_msg(await cases.get_deployment(uow, current_principal(), request.name,
                                                                     tenant=request.tenant))

    async def ListDeployments(self, request: deployments_pb2.ListDeploymentsRequest,
                              context: aio.ServicerContext) -> deployments_pb2.ListDeploymentsResponse:
        async with self._deps.db.unit_of_work() as uow:
            page = await cases.list_deployments(uow, current_principal(), request.tenant,
                                                convert.page_request(request))
        return deployments_pb2.ListDeploymentsResponse(deployments=[convert.deployment_msg(v) for v in page.items],
                                                       next_page_token=page.next_token)

    async def DeleteDeployment(self, request: deployments_pb2.DeleteDeploymentRequest,
                               context: aio.ServicerContext) -> deployments_pb2.Deployment:
        if self._deps.deletes is not None:
            view = await self._deps.deletes.delete(current_principal(), request.name, tenant=request.tenant)
        else:
            view = await cases.delete_deployment_alone(self._deps.db, current_principal(), request.name,
                                                       self._deps.signals, tenant=request.tenant)
        return convert.deployment_msg(view)

    async def WatchDeployments(self, request: deployments_pb2.WatchDeploymentsRequest,
                               context: aio.ServicerContext) -> AsyncIterator[deployments_pb2.DeploymentEvent]:
        async for event in watch_deployments(self._deps.db.unit_of_work, current_principal(), self._deps.bus,
                                             tenant=request.tenant, name=request.name):
            yield convert.deployment_event_msg(event)

    async def WatchDeploymentBatches(
        self, request: deployments_pb2.WatchDeploymentsRequest, context: aio.ServicerContext,
    ) -> AsyncIterator[deployments_pb2.DeploymentEventBatch]:
        async for batch in watch_deployment_batches(self._deps.db.unit_of_work, current_principal(), self._deps.bus,
                                                    tenant=request.tenant, name=request.name):
            yield deployments_pb2.DeploymentEventBatch(events=[convert.deployment_event_msg(e) for e in batch])

    async def GetUsage(self, request: deployments_pb2.GetUsageRequest,
                       context: aio.ServicerContext) -> deployments_pb2.GetUsageResponse:
        async with self._deps.db.unit_of_work() as uow:
            report = await usage_report(uow, current_principal(), tenant=request.tenant,
                                        since=convert.optional_time(request, "since"),
                                        until=convert.optional_time(request, "until"), now=datetime.now(timezone.utc))
        return convert.usage_response_msg(report)

"""DeploymentService: protobuf in, use case, protobuf out. No rules here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import grpc
from grpc import aio

from controller.api import convert, dryrun
from controller.api.auditing import SUBMIT_DEPLOYMENTS
from controller.api.deps import ServiceDeps
from controller.api.interceptors import as_maia_error, internal_error, status_of
from controller.domain.values import DeploymentSpec, DeploymentView
from controller.errors import MaiaError
from controller.identity import Principal, current_principal
from controller.retryinfo import rich_error
from controller.usecases import deployments as cases
from controller.usecases import revisions
from controller.usecases.submits import check_submits_call
from controller.usecases.updates import update_deployment
from controller.usecases.usage import usage_report
from controller.usecases.watch import watch_deployment_batches, watch_deployments
from maia.v1 import deployments_pb2, deployments_pb2_grpc

SUBMIT_DEPLOYMENT = "/maia.v1.DeploymentService/SubmitDeployment"


class DeploymentServicer(deployments_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._deps = deps

    async def SubmitDeployment(self, request: deployments_pb2.SubmitDeploymentRequest,
                               context: aio.ServicerContext) -> deployments_pb2.SubmitDeploymentResponse:
        """A submit, or its dry run. The call's deadline is handed to the group commit, so the
        answer comes before it (`groupcommit`: UNAVAILABLE with a retry time when it could not be
        written in time, without one when its batch had not committed by then), not as
        DEADLINE_EXCEEDED, which tells the caller nothing of the write."""
        spec = convert.deployment_spec(request.spec)
        who = current_principal()
        if request.dry_run:
            view = await cases.dry_run_deployment(self._deps.db, who, spec,
                                                  time_limit_ms=self._deps.solve_time_limit_ms,
                                                  throttle=self._deps.throttle,
                                                  replace_existing=request.replace_existing,
                                                  allow_preemption=self._deps.allow_preemption)
        else:
            view = await self._submit(who, spec, request.client_request_id, context.time_remaining())
        return deployments_pb2.SubmitDeploymentResponse(deployment=convert.deployment_msg(view),
                                                        dry_run=request.dry_run)

    async def _submit(self, who: Principal, spec: DeploymentSpec, request_id: str,
                      time_left_s: float | None = None) -> DeploymentView:
        """A submit (not a dry run): in the group commit of submits, or alone in a unit of work."""
        if self._deps.submits is not None:
            return await self._deps.submits.submit(who, spec, throttle=self._deps.throttle,
                                                   capacity=self._deps.capacity, request_id=request_id,
                                                   time_left_s=time_left_s)
        async with self._deps.db.unit_of_work() as uow:
            return await cases.submit_deployment(uow, who, spec, self._deps.signals, self._deps.throttle,
                                                 self._deps.capacity, request_id=request_id)

    async def SubmitDeployments(self, request: deployments_pb2.SubmitDeploymentsRequest,
                                context: aio.ServicerContext) -> deployments_pb2.SubmitDeploymentsResponse:
        """Each request as its own SubmitDeployment would be (`_submit_item`), all at once: they
        queue for the submit group commit together, in order, and are written in its batches.
        The call's deadline is each one's: one its batch could not write in time is answered
        UNAVAILABLE with a retry time (not written), one whose batch had not committed by then
        UNAVAILABLE without (written with that batch or not at all), so the answer still comes."""
        items = request.requests
        check_submits_call(len(items), [(i, "dry_run" if item.dry_run else "replace_existing")
                                        for i, item in enumerate(items) if item.dry_run or item.replace_existing])
        who = current_principal()
        time_left_s = context.time_remaining()
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        results = await asyncio.gather(*(self._submit_item(who, index, item, deadline)
                                         for index, item in enumerate(items)))
        return deployments_pb2.SubmitDeploymentsResponse(results=results)

    async def _submit_item(self, who: Principal, index: int, item: deployments_pb2.SubmitDeploymentRequest,
                           deadline: float | None) -> deployments_pb2.SubmitDeploymentResult:
        """One request of a SubmitDeployments call, in a task of its own (its audit entry is the
        task's, `store.audit.open_call`): decided and audited as its own SubmitDeployment call would
        be (the entry's detail names the call and the request's index), its refusal its result."""
        try:
            if self._deps.audit is not None:
                entry = self._deps.audit.entry(SUBMIT_DEPLOYMENT, item, call=SUBMIT_DEPLOYMENTS, item=index)
                view = await self._deps.audit.run(entry, self._submit_request(who, item, deadline))
            else:
                view = await self._submit_request(who, item, deadline)
        except MaiaError as exc:
            return deployments_pb2.SubmitDeploymentResult(error=status_of(exc, f"requests[{index}]."))
        except Exception as exc:  # unexpected: logged, INTERNAL for this request alone
            return deployments_pb2.SubmitDeploymentResult(error=rich_error(
                grpc.StatusCode.INTERNAL, internal_error(SUBMIT_DEPLOYMENTS, exc)))
        return deployments_pb2.SubmitDeploymentResult(deployment=convert.deployment_msg(view))

    async def _submit_request(self, who: Principal, item: deployments_pb2.SubmitDeploymentRequest,
                              deadline: float | None) -> DeploymentView:
        """`_submit` of one request of a SubmitDeployments call; a failure raised as the error its
        caller is told (`interceptors.as_maia_error`: a database that failed is UNAVAILABLE)."""
        try:
            time_left_s = None if deadline is None else deadline - time.monotonic()
            return await self._submit(who, convert.deployment_spec(item.spec), item.client_request_id, time_left_s)
        except Exception as exc:
            known = as_maia_error(SUBMIT_DEPLOYMENTS, exc)
            if known is None or known is exc:
                raise
            raise known from exc

    async def UpdateDeployment(self, request: deployments_pb2.UpdateDeploymentRequest,
                               context: aio.ServicerContext) -> deployments_pb2.UpdateDeploymentResponse:
        spec = convert.deployment_spec(request.spec)
        async with self._deps.db.unit_of_work() as uow:
            result = await update_deployment(uow, current_principal(), spec, request.resource_version,
                                             self._deps.signals, request_id=request.client_request_id,
                                             dry_run=dryrun.asked(context, dryrun.UPDATE_DEPLOYMENT),
                                             throttle=self._deps.throttle)
        return deployments_pb2.UpdateDeploymentResponse(deployment=convert.deployment_msg(result.deployment),
                                                        changes=list(result.changes), rolling=result.rolling)

    async def ListDeploymentRevisions(self, request: deployments_pb2.ListDeploymentRevisionsRequest,
                                      context: aio.ServicerContext) -> deployments_pb2.ListDeploymentRevisionsResponse:
        async with self._deps.db.unit_of_work() as uow:
            views = await revisions.list_revisions(uow, current_principal(), request.name, tenant=request.tenant)
        return convert.revisions_msg(views)

    async def RollbackDeployment(self, request: deployments_pb2.RollbackDeploymentRequest,
                                 context: aio.ServicerContext) -> deployments_pb2.RollbackDeploymentResponse:
        async with self._deps.db.unit_of_work() as uow:
            done = await revisions.rollback_deployment(
                uow, current_principal(), request.name, self._deps.signals, tenant=request.tenant,
                to_revision=request.to_revision, resource_version=request.resource_version,
                request_id=request.client_request_id, dry_run=dryrun.asked(context, dryrun.ROLLBACK_DEPLOYMENT),
                throttle=self._deps.throttle)
        return deployments_pb2.RollbackDeploymentResponse(
            deployment=convert.deployment_msg(done.update.deployment), changes=list(done.update.changes),
            rolling=done.update.rolling, to_revision=done.to_revision)

    async def RestartDeployment(self, request: deployments_pb2.RestartDeploymentRequest,
                                context: aio.ServicerContext) -> deployments_pb2.RestartDeploymentResponse:
        async with self._deps.db.unit_of_work() as uow:
            done = await revisions.restart_deployment(
                uow, current_principal(), request.name, self._deps.signals, tenant=request.tenant,
                resource_version=request.resource_version, request_id=request.client_request_id,
                dry_run=dryrun.asked(context, dryrun.RESTART_DEPLOYMENT), throttle=self._deps.throttle)
        return deployments_pb2.RestartDeploymentResponse(deployment=convert.deployment_msg(done.deployment),
                                                         changes=list(done.changes))

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
            view = await self._deps.deletes.delete(current_principal(), request.name, tenant=request.tenant,
                                                   throttle=self._deps.throttle)
        else:
            view = await cases.delete_deployment_alone(self._deps.db, current_principal(), request.name,
                                                       self._deps.signals, tenant=request.tenant,
                                                       throttle=self._deps.throttle)
        return convert.deployment_msg(view)

    async def WatchDeployments(self, request: deployments_pb2.WatchDeploymentsRequest,
                               context: aio.ServicerContext) -> AsyncIterator[deployments_pb2.DeploymentEvent]:
        async for event in watch_deployments(self._deps.db.unit_of_work, current_principal(), self._deps.bus,
                                             tenant=request.tenant, name=request.name, streams=self._deps.streams):
            yield convert.deployment_event_msg(event)

    async def WatchDeploymentBatches(
        self, request: deployments_pb2.WatchDeploymentsRequest, context: aio.ServicerContext,
    ) -> AsyncIterator[deployments_pb2.DeploymentEventBatch]:
        async for batch in watch_deployment_batches(self._deps.db.unit_of_work, current_principal(), self._deps.bus,
                                                    tenant=request.tenant, name=request.name,
                                                    streams=self._deps.streams):
            yield convert.deployment_event_batch_msg(batch)

    async def GetUsage(self, request: deployments_pb2.GetUsageRequest,
                       context: aio.ServicerContext) -> deployments_pb2.GetUsageResponse:
        async with self._deps.db.unit_of_work() as uow:
            report = await usage_report(uow, current_principal(), tenant=request.tenant,
                                        since=convert.optional_time(request, "since"),
                                        until=convert.optional_time(request, "until"), now=datetime.now(timezone.utc))
        return convert.usage_response_msg(report)

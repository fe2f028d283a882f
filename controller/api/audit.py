"""AuditService: protobuf in, use case, protobuf out. No rules here."""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from grpc import aio

from controller.api.convert import optional_time, page_request, timestamp
from controller.api.deps import ServiceDeps
from controller.identity import current_principal
from controller.usecases import audit as cases
from maia.v1 import audit_pb2, audit_pb2_grpc


def audit_event_msg(view: cases.AuditEventView) -> audit_pb2.AuditEvent:
    detail = Struct()
    json_format.ParseDict(view.detail, detail)
    return audit_pb2.AuditEvent(
        seq=view.seq, at=timestamp(view.at), request_id=view.request_id, actor=view.actor, role=view.role,
        tenant=view.tenant, action=view.action, object_kind=view.object_kind, object_id=view.object_id,
        outcome=view.outcome, detail=detail, prev_hash=view.prev_hash, hash=view.hash,
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._deps = deps

    async def ListAuditEvents(self, request: audit_pb2.ListAuditEventsRequest,
                              context: aio.ServicerContext) -> audit_pb2.ListAuditEventsResponse:
        since = optional_time(request, "since")
        async with self._deps.db.unit_of_work() as uow:
            page = await cases.list_events(uow, current_principal(), tenant=request.tenant, since=since,
                                           page=page_request(request))
        return audit_pb2.ListAuditEventsResponse(events=[audit_event_msg(e) for e in page.items],
                                                 next_page_token=page.next_token)

    async def VerifyAuditLog(self, request: audit_pb2.VerifyAuditLogRequest,
                             context: aio.ServicerContext) -> audit_pb2.VerifyAuditLogResponse:
        expected = (request.expected_head_seq, request.expected_head_hash) \
            if request.expected_head_seq or request.expected_head_hash else None
        report = await cases.verify(self._deps.db, current_principal(), expected_head=expected)
        return audit_pb2.VerifyAuditLogResponse(
            intact=report.intact, entries=report.entries, head_seq=report.head_seq, head_hash=report.head_hash,
            first_bad_seq=report.first_bad_seq or 0, problem=report.problem, first_seq=report.first_seq,
        )

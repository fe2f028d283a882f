"""The audit interceptor: one entry per mutating call, written in one place for every service.

A call is mutating when it is a unary `maia.v1` method whose name does not start with a
read-only verb (Get, List, Watch, Verify, Check) and it is not a dry run (its request's
`dry_run`, or the metadata of `controller.api.dryrun`, which is judged here). The entry names the
caller (principal, role, tenant), the method, the object (kind from the method name, id and
tenant from the request) and the outcome: OK or the status code of the failure, so refused
and failed calls are audited too. A successful call's entry is written by the call's first
commit, in the same transaction as the change (`controller.store.audit.open_call`, used by
`UnitOfWork.commit`): the change and its entry persist together or not at all. A failed call's
entry (its transaction rolled back) is written after it, in a transaction of its own with the
entries of the other calls that ended meanwhile (`usecases.audit.EntryWriter`: the refused
requests of one SubmitDeployments call are one transaction, not one each); if that write fails,
the controller logs it at ERROR and the caller still gets its answer. A call whose entry
went with a commit whose answer was lost (PostgreSQL: `CommitOutcomeUnknown`; a group commit's
batch, its members then going alone) gets no second entry when that one landed
(`controller.store.audit.landed`, by the entry's seq and hash). A call whose caller went away
(cancelled), or was answered UNAVAILABLE as the group commit's batch that took it had not
committed in time, is audited when that batch ends, in a task of its own: by the batch's entry
when it committed, with what the caller was told when it did not (`_after_batch`).

A SubmitDeployments call is itemized (`ITEMIZED_METHODS`): its servicer audits each of its
requests as that request's own SubmitDeployment call would be audited (`AuditInterceptor.run`, in
the request's own task: action SubmitDeployment, the entry's detail naming the `call` and the
request's index, `item`), written with its deployment by the submit batch or after its refusal;
the call itself has an entry only when it fails as a whole (refused before any request was
decided: empty, too many, a dry run; or cancelled).

Agent heartbeats and shard reports (the Connect stream) are not calls of this kind; whatever the
controller refuses there is audited by the use case that refuses it (`usecases.audit.record`).

Calls refused UNAUTHENTICATED (any method, reads included) are audited by
`UnauthenticatedAuditor`, rate-limited: anyone can send them, so one entry each would let an
anonymous flood grow the audit table at the flood's rate. A controller-wide token bucket
(`limits.UNAUTHENTICATED_AUDITS_*`) lets through a few entries a minute; the calls refused
beyond it are counted, and the next entry written says how many were not written on their own
(`detail.unaudited_before`); an entry's message is the operator's reason (an unknown token and
a wrong secret, both "invalid token" to the caller, told apart: `Unauthenticated.why`). The log's
lines are sampled likewise, by a bucket of their own (the authentication interceptor). Calls refused with a
retry time (a busy controller shedding a join storm, a tenant over its rate) come in floods by
nature too, and each entry would be one more write transaction for the database they protect:
they are audited the same way (`limits.RETRY_LATER_AUDITS_*`, a bucket of their own). So are
calls whose callers gave up on them (CANCELLED, DEADLINE_EXCEEDED: a join storm on a starved
controller ends tens of thousands of Registers so, and on SQLite each entry's transaction queued
for the one writer ahead of the Registers' own batches, every minute more of them timing out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from controller import limits
from controller.api import dryrun
from controller.api.interceptors import as_maia_error, code_of, reads_only, status_for
from controller.api.interceptors.status import DATABASE_FAILED_RETRY_MS
from controller.api.targets import describe_target
from controller.domain.values import deployment_key
from controller.identity import Role, current_principal, new_request_id
from controller.ratelimit import Sampler
from controller.store.audit import AuditRecord, CallEntry, close_call, open_call
from controller.store.db import Database
from controller.usecases import audit

log = logging.getLogger("maia.audit")

T = TypeVar("T")

AUDITED_PACKAGE = "/maia.v1."
# Outcomes of calls their callers gave up on: audited at a bounded rate, like refusals with a retry time.
ABANDONED = frozenset({grpc.StatusCode.CANCELLED.name, grpc.StatusCode.DEADLINE_EXCEEDED.name})
# Calls whose requests their servicer audits one by one (`AuditInterceptor.run` per request, each
# entry as that request's own call would have it): the call itself gets an entry only when it
# fails as a whole (refused before any of its requests was decided, or cancelled).
SUBMIT_DEPLOYMENTS = "/maia.v1.DeploymentService/SubmitDeployments"
ITEMIZED_METHODS = frozenset({SUBMIT_DEPLOYMENTS})


def is_mutating(method: str, request: Any) -> bool:
    if not method.startswith(AUDITED_PACKAGE) or reads_only(method):
        return False
    return not getattr(request, "dry_run", False)




def outcome_of(method: str, context: aio.ServicerContext | None, failed: BaseException | None, *,
               database_retry_ms: int = DATABASE_FAILED_RETRY_MS) -> tuple[str, str, int | None]:
    """(status code name, message, retry_after_ms) a call ends with. The interceptor sits inside
    the error translation, so a use case's error is seen before it becomes a status (and the entry is
    written before the caller hears the answer): translated here as the caller will be told
    (a database that failed under the call is UNAVAILABLE, not INTERNAL)."""
    if failed is None:
        return "OK", "", None
    if (known := as_maia_error(method, failed, logged=False, retry_after_ms=database_retry_ms)) is not None:
        return status_for(known).name, known.message, known.retry_after_ms
    if isinstance(failed, aio.AbortError) and context is not None:  # an interceptor further in aborted
        return code_of(context, failed), (context.details() if hasattr(context, "details") else "") or "", None
    if isinstance(failed, asyncio.CancelledError):  # as the log and the metrics count it (`code_of`)
        if context is not None and code_of(context, failed) == grpc.StatusCode.DEADLINE_EXCEEDED.name:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name, "the call's deadline passed", None
        return grpc.StatusCode.CANCELLED.name, "the call was cancelled", None
    return grpc.StatusCode.INTERNAL.name, type(failed).__name__, None


class AuditInterceptor(aio.ServerInterceptor):
    """Appends one audit entry per mutating call (see the module docstring)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._failures = db.failures  # the pause a caller the database failed is told grows with it
        self._entries = audit.EntryWriter(db)  # the entries of calls that failed or wrote nothing
        self._clock = clock
        self._retry_later: dict[str, Sampler] = {}  # a tenant's callers' own (`_retry_later_of`)
        self._settling: set[asyncio.Task[None]] = set()  # calls left while a batch held them (`_after_batch`)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(AUDITED_PACKAGE):
            return handler
        behaviour = handler.unary_unary

        itemized = details.method in ITEMIZED_METHODS

        async def audited(request: Any, context: aio.ServicerContext) -> Any:
            # A dry run writes nothing (a write without one refuses the metadata: `api.dryrun`).
            if dryrun.asked(context, details.method) or not is_mutating(details.method, request):
                return await behaviour(request, context)
            return await self.run(self.entry(details.method, request), behaviour(request, context), context,
                                  itemized=itemized)

        return grpc.unary_unary_rpc_method_handler(audited, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    async def run(self, entry: AuditRecord, work: Awaitable[T], context: aio.ServicerContext | None = None, *,
                  itemized: bool = False) -> T:
        """`work` awaited as one audited call, in the caller's task: `entry` is written by the
        first commit `work` makes in this task, or, when it fails (or committed nothing), after
        it in its own transaction with its outcome. `itemized`: a call whose parts are audited one
        by one (`ITEMIZED_METHODS`): an entry of its own only when it fails as a whole."""
        failed: BaseException | None = None
        call = open_call(entry)
        try:
            return await work
        except BaseException as exc:
            failed = exc
            raise
        finally:
            committed = close_call(call)
            if committed is not None and committed.written:
                pass  # its entry was written with its change (a failure after it changes nothing written)
            elif failed is not None or not itemized:
                ended = self._ended(entry, context, failed)
                if committed is not None and committed.carrier is not None and not committed.carrier.done():
                    self._after_batch(ended, committed)  # its caller was answered while a batch held the call
                else:
                    await self._record(ended, sent=committed)

    def _after_batch(self, entry: AuditRecord, call: CallEntry) -> None:
        """Audit a call whose caller went, or was answered, while a batch held it
        (`CallEntry.carrier`: cancelled, or UNAVAILABLE as its batch had not committed in time)
        once that batch ends, in a task of its own (the caller is not held up): nothing when the
        batch wrote the call's entry (its outcome, OK), `entry` (CANCELLED, UNAVAILABLE) when it
        did not. Written at once, the call had both."""
        async def when_settled(carrier: asyncio.Future[Any]) -> None:
            await asyncio.wait([carrier])
            if not call.written:
                await self._record(entry, sent=call)

        task = asyncio.create_task(when_settled(call.carrier), name="audit-after-batch")  # type: ignore[arg-type]
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    @staticmethod
    def entry(method: str, request: Message, **detail: Any) -> AuditRecord:
        """The call's entry as it reads when the call succeeds (`detail`: more of its detail; a
        part of an itemized call says which)."""
        principal = current_principal()
        kind, object_id, tenant = describe_target(method, request)
        own = audit.principal_tenant(principal)
        if own and tenant and tenant != own:
            # A tenant's call naming another tenant (refused, NOT_FOUND) is the caller's own entry:
            # filed under the other tenant, it planted entries in that tenant's log, naming the
            # caller's token, and went missing from the caller's. What it named stays in the detail.
            detail = {**detail, "requested_tenant": tenant}
            tenant = own
        tenant = tenant or own
        if kind == "deployment" and tenant and object_id:  # names are per tenant: the object is TENANT/NAME
            object_id = deployment_key(tenant, object_id)
        return AuditRecord(
            actor=principal.name, role=audit.principal_role(principal),
            tenant=tenant, action=method, object_kind=kind,
            object_id=object_id,
            detail={**({"token_id": principal.token_id} if principal.token_id else {}), **detail},
            request_id=principal.request_id or new_request_id(),
        )

    def _ended(self, entry: AuditRecord, context: aio.ServicerContext | None,
               failed: BaseException | None) -> AuditRecord:
        outcome, message, retry = outcome_of(entry.action, context, failed,
                                             database_retry_ms=self._failures.retry_after_ms())
        return replace(entry, outcome=outcome, detail={**entry.detail, **({"message": message} if message else {}),
                                                       **({"retry_after_ms": retry} if retry is not None else {})})

    def _retry_later_of(self, entry: AuditRecord) -> Sampler:
        """The sampler of the calls refused with a retry time a call's entry belongs to: a tenant
        token's its tenant's own, everyone else's (admins, agents) one more. One for all let a
        tenant's flood leave another tenant's refusals unaudited, and read their count in its own
        entries' `unaudited_before`."""
        key = entry.tenant if entry.role == Role.TENANT.value else ""
        sampler = self._retry_later.get(key)
        if sampler is None:
            if len(self._retry_later) >= limits.RETRY_LATER_SAMPLERS_MAX:  # tenants are far fewer
                self._retry_later.clear()
            sampler = self._retry_later[key] = Sampler(limits.RETRY_LATER_AUDITS_PER_MINUTE,
                                                       limits.RETRY_LATER_AUDITS_BURST, self._clock)
        return sampler

    async def _record(self, entry: AuditRecord, sent: CallEntry | None = None) -> None:
        """A failed call's entry (or a call that committed nothing), in its own transaction with
        those of the calls that ended meanwhile (`audit.EntryWriter`); of
        the calls refused with a retry time, a sample (the entry counts those left out before it).
        None when the call's entry was `sent` with a commit whose answer was lost and it landed
        (the call went on alone, or failed UNAVAILABLE 'may have landed'): it has its entry."""
        if entry.outcome != "OK" and (entry.detail.get("retry_after_ms") is not None or entry.outcome in ABANDONED):
            skipped = self._retry_later_of(entry).sample()
            if skipped is None:
                return
            if skipped:
                entry = replace(entry, detail={**entry.detail, "unaudited_before": skipped})
        try:
            await self._entries.record(entry, unless_landed=sent)
        except Exception:  # the call itself is done: say loudly that its audit entry is missing
            log.exception("could not write the audit entry of %s (actor=%s object=%s/%s outcome=%s)",
                          entry.action, entry.actor, entry.object_kind, entry.object_id, entry.outcome)


class UnauthenticatedAuditor:
    """Audits calls refused UNAUTHENTICATED, at most at the bucket's rate (module docstring)."""

    def __init__(self, db: Database, *, per_minute: float = limits.UNAUTHENTICATED_AUDITS_PER_MINUTE,
                 burst: float = limits.UNAUTHENTICATED_AUDITS_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._sampler = Sampler(per_minute, burst, clock)

    @property
    def unaudited(self) -> int:
        return self._sampler.left_out

    async def refused(self, method: str, reason: str, peer: str) -> None:
        skipped = self._sampler.sample()
        if skipped is None:
            return
        detail = {"message": reason, "peer": peer[:limits.HOSTNAME_MAX]}
        if skipped:
            detail["unaudited_before"] = skipped
        entry = AuditRecord(actor="anonymous", role="", tenant="", action=method[:128], object_kind="", object_id="",
                            outcome=grpc.StatusCode.UNAUTHENTICATED.name, detail=detail,
                            request_id=new_request_id())
        try:  # in its own transaction, like every refused call's entry
            await audit.record(self._db, entry)
        except Exception:
            log.exception("could not write the audit entry of an unauthenticated %s call", method)

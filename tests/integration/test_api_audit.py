"""Every mutating call is audited once, in one place, with its outcome; reads and dry runs are not.
Tenants list their own entries only; only admins verify the chain."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import grpc
import pytest
from sqlalchemy import text

from controller import limits
from controller.api.auditing import AuditInterceptor, UnauthenticatedAuditor
from controller.ratelimit import Sampler
from controller.api.server import ControllerApp
from controller.store import audit
from controller.store.audit import AuditRecord
from controller.store.db import Database, UnitOfWork
from controller.usecases import audit as usecase_audit
from controller.usecases import paging
from grpc_harness import Stubs, issue_token, spec, topology
from maia.v1 import admin_pb2, agent_pb2, audit_pb2, deployments_pb2

ADMIN = "/maia.v1.AdminService/"
DEPLOYMENTS = "/maia.v1.DeploymentService/"


async def _entries(app: ControllerApp) -> list:
    async with app.db.unit_of_work() as uow:
        return await audit.list_entries(uow.session, limit=1000)


async def test_mutating_calls_are_audited_with_who_what_which_and_outcome(controller_app: ControllerApp,
                                                                         stubs: Stubs) -> None:
    alice = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "admin", name="alice"))
    await alice.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await alice.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await alice.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
        node_id="n1", rack="rack-a", accelerators=4, accelerator_model="maia-100")))
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("chat"), dry_run=True))
    await alice.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("chat")))
    await alice.channel.close()
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="nope"))
    # Reads are not audited.
    await stubs.admin.GetTenant(admin_pb2.GetTenantRequest(id="lab"))
    await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())

    calls = [e for e in await _entries(controller_app) if e.action.startswith("/")]
    assert [(e.action, e.actor, e.object_kind, e.object_id, e.tenant, e.outcome) for e in calls] == [
        (ADMIN + "ApplyTopology", "alice", "topology", "", "", "OK"),
        (ADMIN + "CreateTenant", "alice", "tenant", "lab", "lab", "OK"),
        (ADMIN + "CreateTenant", "alice", "tenant", "lab", "lab", "ALREADY_EXISTS"),
        ("/maia.v1.NodeAgentService/Register", "bootstrap-admin", "node", "n1", "", "OK"),
        (DEPLOYMENTS + "SubmitDeployment", "alice", "deployment", "lab/chat", "lab", "OK"),  # TENANT/NAME
        (DEPLOYMENTS + "DeleteDeployment", "bootstrap-admin", "deployment", "nope", "", "NOT_FOUND"),
    ]
    assert "already exists" in calls[2].detail["message"]
    assert all(len(e.request_id) == 32 for e in calls) and len({e.request_id for e in calls}) == len(calls)
    async with controller_app.db.unit_of_work() as uow:
        assert (await audit.verify_chain(uow.session)).intact


async def test_tenants_list_their_own_entries_only_and_only_admins_verify(controller_app: ControllerApp,
                                                                         stubs: Stubs) -> None:
    for tenant in ("lab-a", "lab-b"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))
    lab_a = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab-a"))
    bootstrap = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "node-bootstrap"))
    try:
        for asked in ("", "lab-a"):
            page = await lab_a.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant=asked))
            assert [(e.object_id, e.tenant) for e in page.events] == [("lab-a", "lab-a")]
        for asked in ("lab-b", "nobody"):  # was answered with its own entries, as if they were lab-b's
            with pytest.raises(grpc.aio.AioRpcError) as unseen:
                await lab_a.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant=asked))
            assert (unseen.value.code(), unseen.value.details()) == (grpc.StatusCode.NOT_FOUND,
                                                                   f"tenant {asked} not found")
        everything = await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest())
        assert [e.object_id for e in everything.events] == ["lab-a", "lab-b"]
        for call in (lab_a.audit.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest()),
                     bootstrap.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await stubs.audit.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())).intact
    finally:
        await lab_a.channel.close()
        await bootstrap.channel.close()


async def test_a_change_is_committed_with_its_audit_entry_or_not_at_all(controller_app: ControllerApp,
                                                                       stubs: Stubs) -> None:
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-a"))
    async with controller_app.db.engine.begin() as conn:  # the audit log cannot be appended to
        await conn.execute(text("DELETE FROM audit_head"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-b"))
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    listed = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert [t.id for t in listed.tenants] == ["lab-a"]  # lab-b was not created without its entry
    assert [(e.object_id, e.outcome) for e in await _entries(controller_app)] == [("lab-a", "OK")]


async def test_a_tenant_update_is_audited_and_evented_with_what_it_changed(controller_app: ControllerApp,
                                                                          stubs: Stubs) -> None:
    """An update's entry carried the caller's token id alone, its event no message: a lowered cap
    could not be told from a no-op."""
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-a", max_accelerators=96))
    await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="lab-a", max_accelerators=64, isolation="ISOLATION_DEDICATED_NODE"))
    updated = [e for e in await _entries(controller_app) if e.action == ADMIN + "UpdateTenant"]
    assert [e.detail["changed"] for e in updated] == [
        {"isolation": ["shared", "dedicated_node"], "max_accelerators": [96.0, 64.0]}]
    events = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest())
    [event] = [e for e in events.events if e.kind == "tenant.updated"]
    assert event.message == "isolation shared -> dedicated_node, max_accelerators 96.0 -> 64.0"


async def test_a_token_creation_is_audited_with_the_token_it_made(controller_app: ControllerApp, stubs: Stubs) -> None:
    """The entry named the caller's token alone (and no object without --name): a creation could
    not be matched with the token's later revocation, nor its role read."""
    created = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin", ttl_seconds=3600))
    [entry] = [e for e in await _entries(controller_app) if e.action == ADMIN + "CreateToken"]
    assert entry.detail["created_token"] == created.token.id and entry.detail["created_role"] == "admin"
    assert entry.detail["expires_at"].startswith(str(created.token.expires_at.ToDatetime().year))


async def test_a_call_the_database_failed_under_is_audited_as_its_caller_was_told(
        controller_app: ControllerApp, stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller hears UNAVAILABLE ("what it wrote may have landed"), the log and the metrics say
    UNAVAILABLE; the audit entry said INTERNAL ("OperationalError"), as for a bug."""
    from sqlalchemy.exc import OperationalError

    from controller.usecases import tenants

    async def locked(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE tenants ...", None, Exception("database is locked"))

    monkeypatch.setattr(tenants, "create_tenant", locked)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-a"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    [entry] = await _entries(controller_app)
    assert (entry.object_id, entry.outcome) == ("lab-a", "UNAVAILABLE")
    assert entry.detail["message"] == failed.value.details()
    assert entry.detail["retry_after_ms"] == 1000
    # Failing for a while, the caller is told a longer pause: the entry says the same one.
    import time as time_module
    monkeypatch.setattr(controller_app.db.failures, "committed", lambda: None)  # nothing lands in an outage
    controller_app.db.failures.began = controller_app.db.failures.last = time_module.monotonic() - 20.0
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-b"))
    told = int(dict(again.value.trailing_metadata() or ())["retry-after-ms"])
    [later] = [e for e in await _entries(controller_app) if e.object_id == "lab-b"]
    assert told >= 5000 and later.detail["retry_after_ms"] == told


async def test_a_since_outside_what_a_time_can_hold_is_invalid_argument(stubs: Stubs) -> None:
    # Found by the fuzz suite: Timestamp seconds 2**63-1 was an INTERNAL error.
    request = audit_pb2.ListAuditEventsRequest()
    request.since.seconds = 2**63 - 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.audit.ListAuditEvents(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "since is not a valid time" in (refused.value.details() or "")


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant="t\x00")), "tenant id"),
    (lambda s: s.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", object_id="n\x00")), "node id"),
    (lambda s: s.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="tenant", object_id="t" * 300)),
     "tenant id"),
])
async def test_an_admins_filter_that_names_no_possible_object_is_invalid_argument(stubs: Stubs, call, field) -> None:
    """An admin's filter went to the database as it came: a NUL failed INTERNAL on PostgreSQL
    (SQLite answered an empty list); checked as each kind's own calls check its id."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(stubs)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(field)


@pytest.mark.parametrize("token", ["not-a-token", paging.encode_token(("seq",)), paging.encode_token((2**64,))])
async def test_a_page_token_this_list_did_not_return_is_invalid_argument(stubs: Stubs, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_token=token))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token is not a token this list returned" in (refused.value.details() or "")


async def test_unauthenticated_calls_are_audited_with_the_operators_reason_the_caller_is_told_less(
        controller_app: ControllerApp, admin_token: str) -> None:
    """An unknown token and a known token's id with a wrong secret are both "invalid token" to the
    caller (it must not learn which ids exist); the audit entry, the operator's, tells them apart."""
    admin_id = admin_token.removeprefix("maia_").partition(".")[0]
    anonymous = Stubs.connect(controller_app.address, None)
    forged = Stubs.connect(controller_app.address, "maia_0123456789abcdef." + "A" * 43)
    guessed = Stubs.connect(controller_app.address, f"maia_{admin_id}." + "A" * 43)
    told = []
    try:
        for caller in (anonymous, forged, guessed):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await caller.admin.ListTenants(admin_pb2.ListTenantsRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            told.append(refused.value.details())
    finally:
        for caller in (anonymous, forged, guessed):
            await caller.channel.close()
    assert told[1] == told[2] == "invalid token"
    refused = [e for e in await _entries(controller_app) if e.outcome == "UNAUTHENTICATED"]
    assert [(e.actor, e.action, e.role, e.tenant) for e in refused] == [
        ("anonymous", ADMIN + "ListTenants", "", "")] * 3
    assert "authentication required" in refused[0].detail["message"]
    assert refused[1].detail["message"] == "unknown token 0123456789abcdef" and refused[1].detail["peer"]
    assert refused[2].detail["message"] == f"wrong secret for token {admin_id}"


async def test_a_flood_of_unauthenticated_calls_is_logged_at_a_bounded_rate(
        controller_app: ControllerApp, caplog: pytest.LogCaptureFixture) -> None:
    """A token-guessing run wrote a WARNING line per call, at the run's rate: the lines are sampled
    (a bucket of `UNAUTHENTICATED_LINES_BURST`), each saying the operator's reason."""
    caplog.set_level(logging.WARNING, logger="maia.api")
    forged = Stubs.connect(controller_app.address, "maia_0123456789abcdef." + "A" * 43)
    calls = 3 * int(limits.UNAUTHENTICATED_LINES_BURST)
    try:
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError):
                await forged.admin.ListTenants(admin_pb2.ListTenantsRequest())
    finally:
        await forged.channel.close()
    lines = [r.getMessage() for r in caplog.records if "code=UNAUTHENTICATED" in r.getMessage()]
    # The burst, and at most one more the bucket refilled while the calls ran (10 a minute).
    assert limits.UNAUTHENTICATED_LINES_BURST <= len(lines) <= limits.UNAUTHENTICATED_LINES_BURST + 1, lines
    assert all("reason=unknown token 0123456789abcdef" in line for line in lines), lines[0]


async def test_a_flood_of_unauthenticated_calls_is_counted_not_written_one_by_one(database: Database) -> None:
    now = [0.0]
    auditor = UnauthenticatedAuditor(database, per_minute=60.0, burst=2.0, clock=lambda: now[0])
    for _ in range(50):
        await auditor.refused("/maia.v1.AdminService/ListTenants", "invalid token", "ipv4:10.0.0.9:1234")
    async with database.unit_of_work() as uow:
        assert len(await audit.list_entries(uow.session, limit=1000)) == 2  # the burst, then counting
    assert auditor.unaudited == 48
    now[0] = 1.0  # one more entry a second at 60 a minute: it says how many went unwritten
    await auditor.refused("/maia.v1.AdminService/ListTenants", "invalid token", "ipv4:10.0.0.9:1234")
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
        assert (await audit.verify_chain(uow.session)).intact
    assert len(entries) == 3 and entries[-1].detail["unaudited_before"] == 48 and auditor.unaudited == 0


async def test_calls_their_callers_gave_up_on_are_audited_at_a_bounded_rate(database: Database) -> None:
    """A join storm on a starved controller ends Registers CANCELLED or DEADLINE_EXCEEDED by the
    ten thousand: each entry would be one more write transaction, so they are sampled (a refusal
    the caller can act on, say FAILED_PRECONDITION, is written every time)."""
    now = [0.0]
    auditor = AuditInterceptor(database, clock=lambda: now[0])
    gave_up = AuditRecord(actor="agent", action="/maia.v1.NodeAgentService/Register", object_kind="node",
                          object_id="n1", outcome="CANCELLED")
    for outcome in ("CANCELLED", "DEADLINE_EXCEEDED") * 30:
        await auditor._record(replace(gave_up, outcome=outcome))
    await auditor._record(replace(gave_up, outcome="FAILED_PRECONDITION"))
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
    assert len(entries) == limits.RETRY_LATER_AUDITS_BURST + 1 and entries[-1].outcome == "FAILED_PRECONDITION"


async def test_a_call_cancelled_after_its_entry_was_written_does_not_spend_the_sample(database: Database) -> None:
    """A call whose commit wrote its entry and which was cancelled after took the sample's next
    token for a CANCELLED entry that was then not written (its own had landed): the count of
    the calls left out before it went with it, said by no entry."""
    now = [0.0]
    auditor = AuditInterceptor(database, clock=lambda: now[0])
    auditor._retry_later = {"": Sampler(1.0, 1.0, lambda: now[0])}  # the bucket of callers with no tenant
    gave_up = AuditRecord(actor="agent", action="/maia.v1.NodeAgentService/Register", object_kind="node",
                          object_id="n1", outcome="CANCELLED")
    for _ in range(2):  # one written, one left out
        await auditor._record(gave_up)

    async def commits_then_is_cancelled() -> None:
        async with database.unit_of_work() as uow:
            await uow.commit()  # the call's entry, OK
        raise asyncio.CancelledError()

    now[0] = 61.0
    with pytest.raises(asyncio.CancelledError):
        await auditor.run(replace(gave_up, actor="committed", outcome="OK"), commits_then_is_cancelled())
    now[0] = 122.0
    await auditor._record(gave_up)
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
    assert [(e.actor, e.outcome, e.detail.get("unaudited_before")) for e in entries] == [
        ("agent", "CANCELLED", None), ("committed", "OK", None), ("agent", "CANCELLED", 1)]


async def test_a_tenants_refused_calls_are_sampled_apart_from_other_tenants(database: Database) -> None:
    """One bucket for the whole controller: a tenant's flood of rate-limited calls left another
    tenant's refusals without an entry, and the flooder's next entry counted them in
    `unaudited_before`, which its own token reads (found in review)."""
    now = [0.0]
    auditor = AuditInterceptor(database, clock=lambda: now[0])

    def refused(tenant: str) -> AuditRecord:
        return AuditRecord(actor=f"{tenant}-ci", role="tenant", tenant=tenant, action=f"{DEPLOYMENTS}SubmitDeployment",
                           object_kind="deployment", object_id=f"{tenant}/x", outcome="RESOURCE_EXHAUSTED",
                           detail={"retry_after_ms": 500})

    flood = int(limits.RETRY_LATER_AUDITS_BURST)
    for _ in range(flood + 3):
        await auditor._record(refused("t1"))
    for _ in range(2):
        await auditor._record(refused("t2"))
    await auditor._record(replace(refused("t1"), role="admin", actor="root"))  # an admin's: a bucket of its own
    now[0] = 60.0 / limits.RETRY_LATER_AUDITS_PER_MINUTE  # one more token a bucket
    await auditor._record(refused("t1"))
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
    seen = [(e.actor, e.detail.get("unaudited_before")) for e in entries]
    assert seen == [("t1-ci", None)] * flood + [("t2-ci", None)] * 2 + [("root", None), ("t1-ci", 3)]


async def test_entries_of_calls_that_end_together_are_appended_in_one_transaction(database: Database) -> None:
    """A burst of failed calls' entries (the refused requests of one SubmitDeployments call) costs
    the single writer a transaction a batch, not one an entry: each entry still comes back with its
    own seq, in the order the calls ended, on an intact chain. An `append` writes one time for all
    the entries of its transaction, so the times say how many transactions there were."""
    writer = usecase_audit.EntryWriter(database)
    refused = [AuditRecord(actor="alice", action=f"{DEPLOYMENTS}SubmitDeployment", object_kind="deployment",
                           object_id=f"lab/d{i}", outcome="INVALID_ARGUMENT") for i in range(30)]
    seqs = await asyncio.gather(*(writer.record(entry) for entry in refused))
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
        assert (await audit.verify_chain(uow.session)).intact
    assert seqs == [e.seq for e in entries] and [e.object_id for e in entries] == [e.object_id for e in refused]
    assert len({e.at for e in entries}) <= 3  # the first alone (no timer), the rest queued behind it: one or two
    assert writer.stats.batches == len({e.at for e in entries})


async def test_an_entry_that_landed_with_a_lost_commit_is_not_appended_again_by_its_batch(database: Database) -> None:
    """`unless_landed` holds in a batch as it does alone: the call whose entry went with a commit
    whose answer was lost, and landed, gets no second entry; the others in its batch are written."""
    landed = audit.CallEntry(AuditRecord(actor="alice", action=f"{DEPLOYMENTS}DeleteDeployment", object_id="lab/x"),
                             None)
    async with database.unit_of_work() as uow:
        await audit.append_calls(uow.session, [landed])
        await uow.commit()
    writer = usecase_audit.EntryWriter(database)
    others = [AuditRecord(actor="bob", action=f"{DEPLOYMENTS}DeleteDeployment", object_id=f"lab/y{i}",
                          outcome="NOT_FOUND") for i in range(5)]
    seqs = await asyncio.gather(writer.record(replace(landed.record, outcome="UNAVAILABLE"), unless_landed=landed),
                                *(writer.record(entry) for entry in others))
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
    assert seqs[0] is None and [e.object_id for e in entries] == ["lab/x", *(f"lab/y{i}" for i in range(5))]
    assert seqs[1:] == [e.seq for e in entries[1:]]


async def test_a_batch_that_fails_to_commit_leaves_each_entry_to_be_written_alone(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of a failed batch is written; each of its callers then appends its entry alone."""
    writer = usecase_audit.EntryWriter(database)
    failing = [True]
    real_append = audit.append_calls

    async def append_once_failing(session, calls, **kwargs):  # type: ignore[no-untyped-def]
        if failing[0] and len(calls) > 1:
            failing[0] = False
            raise RuntimeError("the batch's append failed")
        return await real_append(session, calls, **kwargs)

    monkeypatch.setattr(audit, "append_calls", append_once_failing)
    refused = [AuditRecord(actor="alice", action=f"{DEPLOYMENTS}SubmitDeployment", object_id=f"lab/d{i}",
                           outcome="INVALID_ARGUMENT") for i in range(6)]
    seqs = await asyncio.gather(*(writer.record(entry) for entry in refused))  # all queued before one batch
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
        assert (await audit.verify_chain(uow.session)).intact
    assert not failing[0] and writer.stats.batches == 1 and writer.stats.alone == 6  # each written alone after
    assert sorted(seqs) == [e.seq for e in entries] and len(entries) == 6


async def test_a_batch_whose_commit_landed_unanswered_has_each_entry_once(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's COMMIT landed and its answer was lost (a connection lost with it in flight):
    each member went alone and appended its entry again."""
    writer = usecase_audit.EntryWriter(database)
    real_commit = UnitOfWork.commit
    lost = [True]

    async def commit_answer_lost(self: UnitOfWork) -> None:
        await real_commit(self)
        if lost[0]:
            lost[0] = False
            raise ConnectionError("the connection was lost with the COMMIT's answer in flight")

    monkeypatch.setattr(UnitOfWork, "commit", commit_answer_lost)
    refused = [AuditRecord(actor="alice", action=f"{DEPLOYMENTS}DeleteDeployment", object_id=f"lab/d{i}",
                           outcome="NOT_FOUND") for i in range(3)]
    seqs = await asyncio.gather(*(writer.record(entry) for entry in refused))
    async with database.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
        assert (await audit.verify_chain(uow.session)).intact
    assert not lost[0] and writer.stats.alone == 3
    assert [e.object_id for e in entries] == [f"lab/d{i}" for i in range(3)] and sorted(seqs) == [e.seq for e in entries]


@pytest.mark.parametrize(("seq", "hash_", "says"), [
    (0, "ab" * 32, "expected_head_hash needs expected_head_seq"),  # it was ignored: answered intact, unchecked
    (1, "\x00", "expected_head_hash must be 64 lowercase hex digits"),  # it was a tamper alarm
    (1, "AB" * 32, "expected_head_hash must be 64 lowercase hex digits"),
])
async def test_an_expected_head_no_log_could_have_is_invalid_argument(stubs: Stubs, seq: int, hash_: str,
                                                                       says: str) -> None:
    """A hash without its seq was ignored (the log told intact, nothing checked); one that is no
    SHA-256 was told as a rewritten log and logged at ERROR as a tamper alarm. Both are the
    caller's mistake."""
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))  # an entry to check against
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.audit.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest(expected_head_seq=seq,
                                                                        expected_head_hash=hash_))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(says), refused.value.details()


@pytest.mark.parametrize("left_s, outcome", [(0.0, "DEADLINE_EXCEEDED"), (5.0, "CANCELLED")])
async def test_a_call_ended_by_its_deadline_is_audited_as_the_log_counts_it(database: Database, left_s: float,
                                                                            outcome: str) -> None:
    """gRPC cancels a handler whose deadline passed: the log and the metrics say DEADLINE_EXCEEDED
    (`code_of`), and the audit said CANCELLED (found in review)."""
    from types import SimpleNamespace

    from controller.identity import Principal, Role, reset_principal, set_principal

    async def behaviour(request: object, context: object) -> None:
        raise asyncio.CancelledError()  # what gRPC does to a handler whose call ended under it

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(behaviour)

    handler = await AuditInterceptor(database).intercept_service(
        continuation, SimpleNamespace(method="/maia.v1.AdminService/CreateTenant"))
    context = SimpleNamespace(invocation_metadata=lambda: (), time_remaining=lambda: left_s, code=lambda: None)
    token = set_principal(Principal("alice", Role.ADMIN))
    try:
        with pytest.raises(asyncio.CancelledError):
            await handler.unary_unary(admin_pb2.Tenant(id="lab"), context)
    finally:
        reset_principal(token)
    async with database.unit_of_work() as uow:
        [entry] = await audit.list_entries(uow.session)
    assert entry.outcome == outcome

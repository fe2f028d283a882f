"""SubmitDeployments through the real API, on SQLite and PostgreSQL: each request of the call is
decided as its own SubmitDeployment would be (written, or refused in its own result), with its
own event and audit entry; what refuses the whole call writes nothing. A lone SubmitDeployment
and a SubmitDeployments call are answered before their deadline alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from controller import limits
from controller.api.server import ControllerApp
from controller.retryinfo import status_retry_s, told_retry_s
from controller.store import audit
from grpc_harness import Stubs, controller_with_rack, issue_token, spec, topology
from maia.v1 import admin_pb2, deployments_pb2

SUBMIT = "/maia.v1.DeploymentService/SubmitDeployment"
SUBMIT_MANY = "/maia.v1.DeploymentService/SubmitDeployments"


def request(*items: tuple[deployments_pb2.DeploymentSpec, str]) -> deployments_pb2.SubmitDeploymentsRequest:
    return deployments_pb2.SubmitDeploymentsRequest(requests=[
        deployments_pb2.SubmitDeploymentRequest(spec=s, client_request_id=rid) for s, rid in items])


def violations(status: status_pb2.Status) -> list[str]:
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def listed(stubs: Stubs) -> list[tuple[str, str]]:
    answer = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
    return sorted((d.spec.tenant, d.spec.name) for d in answer.deployments)


async def submitted_events(stubs: Stubs) -> list[admin_pb2.EventRecord]:
    """The deployments' submit events (the reconciler adds its own to pending ones at any time)."""
    answer = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="deployment", limit=1000))
    return [e for e in answer.events if e.kind == "deployment.submitted"]


@pytest.fixture
async def lab(controller_app: ControllerApp, stubs: Stubs) -> Stubs:
    """Rack rack-a, tenants lab and other (no nodes: submitted deployments stay pending)."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    for tenant in ("lab", "other"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))
    return stubs


async def test_each_request_is_written_or_refused_on_its_own_with_its_event_and_audit_entry(
        controller_app: ControllerApp, lab: Stubs) -> None:
    answer = await lab.deployments.SubmitDeployments(request(
        (spec("a"), "r-a"), (spec("bad", replicas=0), "r-bad"), (spec("b", tenant="other"), ""),
        (spec("a"), "r-a2"), (spec("c"), "r-c")))
    kinds = [r.WhichOneof("result") for r in answer.results]
    assert kinds == ["deployment", "error", "deployment", "error", "deployment"]
    assert [r.deployment.spec.name for r in answer.results if r.HasField("deployment")] == ["a", "b", "c"]
    bad, again = answer.results[1].error, answer.results[3].error
    assert bad.code == code_pb2.INVALID_ARGUMENT and "replicas must be between 1 and 4096" in bad.message
    assert violations(bad) == ["requests[1].spec.replicas"]
    assert again.code == code_pb2.ALREADY_EXISTS  # a name taken earlier in the same call, as one after the other
    assert await listed(lab) == [("lab", "a"), ("lab", "c"), ("other", "b")]

    assert sorted(e.object_id for e in await submitted_events(lab)) == ["lab/a", "lab/c", "other/b"]
    async with controller_app.db.unit_of_work() as uow:
        entries = await audit.list_entries(uow.session, limit=1000)
        assert (await audit.verify_chain(uow.session)).intact
    mine = sorted((e.detail["item"], e.object_id, e.outcome) for e in entries if e.detail.get("call") == SUBMIT_MANY)
    assert mine == [(0, "lab/a", "OK"), (1, "lab/bad", "INVALID_ARGUMENT"), (2, "other/b", "OK"),
                    (3, "lab/a", "ALREADY_EXISTS"), (4, "lab/c", "OK")]
    assert all(e.action == SUBMIT for e in entries if e.detail.get("call") == SUBMIT_MANY)
    assert not [e for e in entries if e.action == SUBMIT_MANY]  # the call itself: its requests' entries only


async def test_the_refused_requests_of_a_call_are_audited_in_one_transaction_not_one_each(
        controller_app: ControllerApp, lab: Stubs) -> None:
    """Refused requests write no deployment, only their entries: those of one call go to the
    database's single writer together (an `append` gives its transaction's entries one time)."""
    answer = await lab.deployments.SubmitDeployments(request(*((spec(f"bad{i}", replicas=0), "") for i in range(12))))
    assert {r.error.code for r in answer.results} == {code_pb2.INVALID_ARGUMENT}
    async with controller_app.db.unit_of_work() as uow:
        entries = [e for e in await audit.list_entries(uow.session, limit=1000) if e.detail.get("call") == SUBMIT_MANY]
        assert (await audit.verify_chain(uow.session)).intact
    assert sorted(e.detail["item"] for e in entries) == list(range(12))
    assert len({e.at for e in entries}) <= 2


async def test_a_tenant_token_submits_into_its_own_tenant_only(controller_app: ControllerApp, lab: Stubs) -> None:
    token = await issue_token(controller_app.db, "tenant", tenant="lab", name="lab-ci")
    tenant = Stubs.connect(controller_app.address, token)
    try:
        answer = await tenant.deployments.SubmitDeployments(request(
            (spec("mine", tenant=""), ""), (spec("theirs", tenant="other"), ""), (spec("named", tenant="lab"), "")))
    finally:
        await tenant.channel.close()
    assert [r.WhichOneof("result") for r in answer.results] == ["deployment", "error", "deployment"]
    assert answer.results[0].deployment.spec.tenant == "lab"
    assert answer.results[1].error.code == code_pb2.NOT_FOUND  # as its own call: no hint that `other` exists
    assert await listed(lab) == [("lab", "mine"), ("lab", "named")]


async def test_the_same_request_ids_again_return_the_same_deployments_and_write_nothing(lab: Stubs) -> None:
    call = request((spec("a"), "run-1/a"), (spec("b"), "run-1/b"))
    first = await lab.deployments.SubmitDeployments(call)
    before = await lab.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
    submitted = await submitted_events(lab)
    again = await lab.deployments.SubmitDeployments(call)
    assert [r.WhichOneof("result") for r in again.results] == ["deployment", "deployment"]
    assert [(r.deployment.spec.name, r.deployment.created_at, r.deployment.resource_version) for r in again.results] == \
        [(r.deployment.spec.name, r.deployment.created_at, r.deployment.resource_version) for r in first.results]
    after = await lab.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
    assert [(d.spec.name, d.created_at) for d in after.deployments] == \
        [(d.spec.name, d.created_at) for d in before.deployments]
    assert await submitted_events(lab) == submitted and len(submitted) == 2
    # The same id with another spec is refused, as a lone submit's would be.
    changed = await lab.deployments.SubmitDeployments(request((spec("a", replicas=2), "run-1/a")))
    assert changed.results[0].error.code == code_pb2.FAILED_PRECONDITION


@pytest.fixture
async def throttled(db_url: str, tmp_path: Path) -> AsyncIterator[Stubs]:
    async with controller_with_rack(db_url, tmp_path, submits_per_minute=3) as (_, stubs):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        yield stubs


async def test_the_tenant_submit_rate_counts_each_request(throttled: Stubs) -> None:
    answer = await throttled.deployments.SubmitDeployments(request(*((spec(f"s{i}"), "") for i in range(5))))
    assert [r.WhichOneof("result") for r in answer.results] == ["deployment"] * 3 + ["error"] * 2
    for refused in answer.results[3:]:
        assert refused.error.code == code_pb2.RESOURCE_EXHAUSTED
        assert status_retry_s(refused.error) is not None  # nothing written: call again after the pause told
    assert len(await listed(throttled)) == 3


async def late_submit(stubs: Stubs, method: str, name: str, request_id: str) -> tuple[int, str, float | None]:
    """A submit with a 3 s deadline by `method`: its answer's code, message and RetryInfo pause."""
    if method == SUBMIT_MANY:
        answer = await stubs.deployments.SubmitDeployments(request((spec(name), request_id)), timeout=3.0)
        [result] = answer.results
        return result.error.code, result.error.message, status_retry_s(result.error)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec(name), client_request_id=request_id), timeout=3.0)
    return (refused.value.code().value[0], refused.value.details() or "",
            told_retry_s(refused.value.trailing_metadata()))


@pytest.mark.parametrize("method", [SUBMIT, SUBMIT_MANY])
async def test_a_request_whose_batch_had_not_committed_by_the_deadline_is_answered_unknown(
        controller_app: ControllerApp, lab: Stubs, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The answer comes before the call's deadline, for a lone SubmitDeployment as for each
    request of a SubmitDeployments: a request taken into a batch that has not committed by then
    is UNAVAILABLE without RetryInfo (it may land: ask again with its request id), not
    DEADLINE_EXCEEDED, and it is written with that batch."""
    assert controller_app.deps is not None and controller_app.deps.submits is not None
    batcher = controller_app.deps.submits
    release = asyncio.Event()
    commit = batcher.commit_batch

    async def held(batch):  # type: ignore[no-untyped-def]
        await release.wait()
        return await commit(batch)

    monkeypatch.setattr(batcher, "commit_batch", held)
    # Answered at half the deadline, not at 90 %: a loaded host's stall of the last 0.3 s would let
    # the client's own deadline fire first (DEADLINE_EXCEEDED), which is not what this is about.
    monkeypatch.setattr(batcher._group, "_answer_reserve", lambda time_left_s: time_left_s / 2)
    code, message, retry_s = await late_submit(lab, method, "late", "r-late")
    assert code == code_pb2.UNAVAILABLE and "had not committed" in message
    assert retry_s is None  # not "call again as it is": read (or replay) first
    release.set()
    again = await lab.deployments.SubmitDeployments(request((spec("late"), "r-late")))
    assert again.results[0].deployment.spec.name == "late"  # it landed with its batch: the replay says so
    assert await listed(lab) == [("lab", "late")]


async def test_a_call_refused_as_a_whole_writes_nothing(shared_seeded: Stubs) -> None:
    deployments = shared_seeded.deployments
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await deployments.SubmitDeployments(deployments_pb2.SubmitDeploymentsRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert empty.value.details() == (f"requests is empty: a SubmitDeployments call carries 1 to "
                                     f"{limits.SUBMITS_PER_CALL_MAX} requests")

    too_many = request(*((spec(f"d{i}"), "") for i in range(limits.SUBMITS_PER_CALL_MAX + 1)))
    with pytest.raises(grpc.aio.AioRpcError) as over:
        await deployments.SubmitDeployments(too_many)
    assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert over.value.details().startswith(f"requests has {limits.SUBMITS_PER_CALL_MAX + 1} entries; at most "
                                           f"{limits.SUBMITS_PER_CALL_MAX} a call")

    dry = request((spec("x1"), ""), (spec("x2"), ""))
    dry.requests[1].dry_run = True
    with pytest.raises(grpc.aio.AioRpcError) as mixed:
        await deployments.SubmitDeployments(dry)
    assert mixed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mixed.value.details().startswith("requests[1] asks for a dry run")

    replacing = request((spec("x3"), ""), (spec("x4"), ""))
    replacing.requests[0].replace_existing = True
    with pytest.raises(grpc.aio.AioRpcError) as replaced:
        await deployments.SubmitDeployments(replacing)
    assert replaced.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(dict(replaced.value.trailing_metadata())["grpc-status-details-bin"])
    assert violations(status) == ["requests[0].replace_existing"]  # the field that is set, not dry_run


async def test_an_unauthenticated_call_writes_nothing(shared_controller: ControllerApp, shared_seeded: Stubs) -> None:
    anonymous = Stubs.connect(shared_controller.address, None)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.deployments.SubmitDeployments(request((spec("anon"), "")))
    finally:
        await anonymous.channel.close()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

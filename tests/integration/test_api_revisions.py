"""Rollout history and rollbacks over real gRPC with real agents (`maia-simnode` subprocesses):
ListDeploymentRevisions keeps each revision an update rolled to, RollbackDeployment rolls a
deployment back to one (only its template: the replica count stays), make-before-break as any
rollout; RestartDeployment replaces every replica the same way without changing the spec; a
revision not kept, a stale resource version and a dry run write nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.api.dryrun import DRY_RUN_ALL, DRY_RUN_METADATA_KEY
from grpc_harness import SimFleet, Stubs, eventually, running_fleet
from maia.v1 import audit_pb2, deployments_pb2
from test_api_rollout import _get, _rolled_out, _svc, _update, committed_violations, never_below, running_timeline

P = deployments_pb2
RACKS = {"rack-00": "row-a", "rack-01": "row-a"}


@pytest.fixture
async def fleet(stubs: Stubs, controller_app, tmp_path: Path) -> AsyncIterator[SimFleet]:
    async with running_fleet(stubs, controller_app, tmp_path, RACKS) as sim:
        yield sim


async def _history(stubs: Stubs, name: str = "svc") -> list[P.DeploymentRevision]:
    return list((await stubs.deployments.ListDeploymentRevisions(
        P.ListDeploymentRevisionsRequest(name=name))).revisions)


async def _rollback(stubs: Stubs, **kw: object) -> P.RollbackDeploymentResponse:
    return await stubs.deployments.RollbackDeployment(P.RollbackDeploymentRequest(name="svc", **kw))


async def test_a_rollback_takes_an_older_revisions_template_and_rolls_it_out(stubs: Stubs, fleet: SimFleet,
                                                                             controller_app):
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    first = await eventually(lambda: _get(stubs, "svc"), _rolled_out, timeout=60, what="svc running")
    [only] = await _history(stubs)
    assert (only.revision, only.current, list(only.changes), only.spec.shard.hbm_gib) == (1, True, [], 16)
    assert only.created_at.ToDatetime() == first.created_at.ToDatetime()

    changed = _svc()
    changed.shard.hbm_gib = 24
    await _update(stubs, changed, 1)
    await eventually(lambda: _get(stubs, "svc"), lambda d: _rolled_out(d) and d.revision == 2, timeout=60,
                     what="revision 2 rolled out")
    scaled = _svc(replicas=3)
    scaled.shard.hbm_gib = 24
    await _update(stubs, scaled, 2)  # not a new revision: the history does not grow
    history = await _history(stubs)
    assert [(r.revision, r.current, r.spec.shard.hbm_gib) for r in history] == [(2, True, 24), (1, False, 16)]
    assert list(history[0].changes) == ["shard.hbm_gib: 16 -> 24"] and history[0].spec.replicas == 3
    assert history[1].spec.replicas == 2  # as it stood when the update rolled away from it
    assert history[1].created_at.ToDatetime() == first.created_at.ToDatetime()

    back = await _rollback(stubs, client_request_id="undo-1")
    assert back.to_revision == 1 and back.rolling
    assert list(back.changes) == ["shard.hbm_gib: 24 -> 16"]
    assert back.deployment.revision == 3 and back.deployment.spec.replicas == 3  # only the template goes back
    done = await eventually(lambda: _get(stubs, "svc"), lambda d: _rolled_out(d) and d.revision == 3, timeout=90,
                            what="the rollback rolled out")
    assert {p.revision for p in done.placements} == {3} and len(done.placements) == 6
    assert done.spec.shard.hbm_gib == 16
    assert [(r.revision, r.spec.shard.hbm_gib) for r in await _history(stubs)] == [(3, 16), (2, 24), (1, 16)]

    # The same request again is answered, not rolled back once more; the current revision's own
    # template is no change.
    again = await _rollback(stubs, client_request_id="undo-1")
    assert again.deployment.resource_version == back.deployment.resource_version and again.deployment.revision == 3
    same = await _rollback(stubs, to_revision=3)
    assert list(same.changes) == [] and same.deployment.resource_version == back.deployment.resource_version

    entries = (await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=1000))).events
    rollbacks = [e for e in entries if e.action.endswith("/RollbackDeployment")]
    assert [(e.object_id, e.outcome) for e in rollbacks][:1] == [("svc", "OK")]
    assert await committed_violations(controller_app) == []


async def test_rollbacks_that_cannot_be_made_write_nothing(stubs: Stubs, fleet: SimFleet):
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    with pytest.raises(grpc.aio.AioRpcError) as none_before:
        await _rollback(stubs)
    assert none_before.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no revision before 1 with another template" in none_before.value.details()

    changed = _svc()
    changed.shard.hbm_gib = 24
    await _update(stubs, changed, 1)
    before = await _get(stubs, "svc")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _rollback(stubs, to_revision=7)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no revision 7 kept (kept: 1, 2;" in unknown.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await _rollback(stubs, resource_version=1)
    assert stale.value.code() == grpc.StatusCode.ABORTED
    dry = await stubs.deployments.RollbackDeployment(P.RollbackDeploymentRequest(name="svc"),
                                                     metadata=((DRY_RUN_METADATA_KEY, DRY_RUN_ALL),))
    # (revision 1's replicas may still run beside revision 2's: then they are adopted, said after)
    assert dry.to_revision == 1 and list(dry.changes)[:1] == ["shard.hbm_gib: 24 -> 16"]
    assert dry.deployment.revision == 3
    after = await _get(stubs, "svc")
    assert (after.resource_version, after.revision, after.spec.shard.hbm_gib) == (before.resource_version, 2, 24)
    assert [r.revision for r in await _history(stubs)] == [2, 1]


async def test_a_restart_replaces_every_replica_make_before_break(stubs: Stubs, fleet: SimFleet, controller_app):
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=_svc()))
    first = await eventually(lambda: _get(stubs, "svc"), _rolled_out, timeout=60, what="svc running")
    dry = await stubs.deployments.RestartDeployment(P.RestartDeploymentRequest(name="svc"),
                                                    metadata=((DRY_RUN_METADATA_KEY, DRY_RUN_ALL),))
    assert dry.deployment.revision == 2 and (await _get(stubs, "svc")).revision == 1

    restarted = await stubs.deployments.RestartDeployment(P.RestartDeploymentRequest(
        name="svc", client_request_id="restart-1"))
    assert restarted.deployment.revision == 2 and list(restarted.changes) == [
        "restart: every replica replaced by a new one, one at a time"]
    assert restarted.deployment.spec == first.spec
    again = await stubs.deployments.RestartDeployment(P.RestartDeploymentRequest(
        name="svc", client_request_id="restart-1"))  # a retry: answered, not restarted once more
    assert again.deployment.resource_version == restarted.deployment.resource_version
    done = await eventually(lambda: _get(stubs, "svc"), lambda d: _rolled_out(d) and d.revision == 2, timeout=90,
                            what="the restart rolled out")
    assert {p.revision for p in done.placements} == {2} and len(done.placements) == 4
    # Every shard is a new one (a new assignment), and from the agents' own log never fewer than
    # the 2 asked ran once both did.
    counts = running_timeline(fleet.log_path.read_text(errors="replace"), "svc", 2)
    assert never_below(counts, 2), counts
    assert max(counts) == 3, counts
    [current, before] = await _history(stubs)
    assert (current.revision, list(current.changes), before.revision) == (
        2, ["restart: every replica replaced by a new one, one at a time"], 1)
    assert await committed_violations(controller_app) == []

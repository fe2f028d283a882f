"""Fairness and staying useful, over real gRPC on SQLite and PostgreSQL: per-tenant rate limits
on submits and dry runs, quarantine of a deployment the solver fails on (the others still
placed), stored data beyond today's limits set aside, and health that turns NOT_SERVING when
the controller cannot do its job and SERVING again when it can."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from controller.reconcile import fast_path, full_path
from controller.api.server import ControllerApp
from controller.health import LIVENESS_SERVICE
from controller.store import models as m
from controller.usecases import planning
from scheduler.session import Session
from controller.api.dryrun import DRY_RUN_METADATA_KEY
from grpc_harness import (HandAgent, Stubs, admin_token_of, eventually, issue_token, running_controller, spec,
                          topology)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

QUARANTINED = deployments_pb2.DEPLOYMENT_PHASE_QUARANTINED


@pytest.fixture
async def make_app(migrated_db_url: str, tmp_path) -> AsyncIterator:
    stack = AsyncExitStack()
    channels: list[grpc.aio.Channel] = []

    async def start(**overrides) -> tuple[ControllerApp, Stubs]:
        app = await stack.enter_async_context(running_controller(migrated_db_url, tmp_path, **overrides))
        stubs = Stubs.connect(app.address, admin_token_of(app))
        channels.append(stubs.channel)
        await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
        for tenant in ("lab", "other"):
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))
        return app, stubs

    yield start
    for channel in channels:
        await channel.close()
    await stack.aclose()


def _submit(stubs: Stubs, name: str, tenant: str = "lab", *, dry_run: bool = False, **kw):
    return stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec(name, tenant, **kw), dry_run=dry_run))


def _get(stubs: Stubs, name: str):
    return stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name=name))


async def test_submits_are_rate_limited_per_tenant_with_retry_info(make_app):
    _, stubs = await make_app(submits_per_minute=2)
    await _submit(stubs, "a1")
    await _submit(stubs, "a2")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _submit(stubs, "a3")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("tenant lab exceeded 2 submits a minute; retry in ")
    retry_ms = int(dict(info.value.trailing_metadata())["retry-after-ms"])
    assert 0 < retry_ms <= 30_000  # one token a 30 s
    status = rpc_status.from_call(info.value)  # the standard rich error: google.rpc.RetryInfo
    assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    retry = error_details_pb2.RetryInfo()
    assert len(status.details) == 1 and status.details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == retry_ms
    with pytest.raises(grpc.aio.AioRpcError):
        await _get(stubs, "a3")  # nothing written
    await _submit(stubs, "b1", "other")  # another tenant has its own bucket


async def test_dry_runs_are_rate_limited_per_tenant(make_app):
    _, stubs = await make_app(dry_runs_per_minute=1)
    reply = await _submit(stubs, "d1", dry_run=True)
    assert reply.dry_run
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _submit(stubs, "d1", dry_run=True)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("tenant lab exceeded 1 dry runs a minute; retry in ")
    assert "retry-after-ms" in dict(info.value.trailing_metadata())
    assert (await _submit(stubs, "d1", "other", dry_run=True)).dry_run


async def test_a_tenant_tokens_updates_and_deletions_are_rate_limited_per_tenant(make_app):
    """A tenant token updated 89 deployments a second (each a rollout) and sent refused deletes by
    the thousand (each an audit row) with nothing to bound them: they take a token of the tenant's
    change rate now, refused ones included. Dry runs, retries of an update that landed and an
    operator's changes are not counted."""
    app, admin = await make_app(changes_per_minute=2)
    for name in ("c1", "c2", "c3"):
        await _submit(admin, name)
    lab = Stubs.connect(app.address, await issue_token(app.db, "tenant", tenant="lab"))
    try:
        current = await _get(lab, "c2")
        changed = deployments_pb2.DeploymentSpec()
        changed.CopyFrom(current.spec)
        changed.replicas = 2
        update = deployments_pb2.UpdateDeploymentRequest(spec=changed, resource_version=current.resource_version,
                                                         client_request_id="scale-c2")
        await lab.deployments.UpdateDeployment(update, metadata=((DRY_RUN_METADATA_KEY, "all"),))  # not counted
        await lab.deployments.UpdateDeployment(update)
        await lab.deployments.UpdateDeployment(update)  # a retry of it (its answer lost): answered, not counted
        await lab.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="c1"))
        for refused in (lab.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="c3")),
                        lab.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="nothing"))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refused
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details().startswith("tenant lab exceeded 2 updates and deletions a minute; retry in ")
        assert (await _get(lab, "c3")).phase != deployments_pb2.DEPLOYMENT_PHASE_DELETING  # nothing written
        await admin.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="c3", tenant="lab"))
    finally:
        await lab.channel.close()


async def test_a_deployment_the_solver_fails_on_is_quarantined_and_the_others_are_placed(make_app, monkeypatch):
    # A hand agent that never heartbeats: a timeout no loaded machine reaches while the pass isolates.
    app, stubs = await make_app(quarantine_after_failures=2, heartbeat_timeout_s=60)
    real = app.reconciler._full._solve

    async def poisoned(problem, **kw):
        if any(d["id"] == "lab/poison" for d in problem.get("deployments", ())):  # ids are TENANT/NAME
            raise RuntimeError("the solver trips on poison")
        return await real(problem, **kw)

    # Both ways a pass decides trip on it: the warm session's arrival decisions (the fast path,
    # which then falls back to a whole-cluster solve) and that solve.
    place = Session.place

    def poisoned_place(session: Session, deployment):
        if getattr(deployment, "id", deployment) == "lab/poison":
            raise RuntimeError("the solver trips on poison")
        return place(session, deployment)

    monkeypatch.setattr(Session, "place", poisoned_place)
    app.reconciler._full._solve = poisoned
    agent = HandAgent(stubs, "n1", "rack-a")
    await agent.register()
    await agent.connect()
    await _submit(stubs, "poison", accelerators=1, locality=common_pb2.DOMAIN_NODE)
    await _submit(stubs, "good", "other", accelerators=1, locality=common_pb2.DOMAIN_NODE)

    dep = await eventually(lambda: _get(stubs, "poison"), lambda d: d.phase == QUARANTINED, what="poison quarantined")
    assert [(r.code, r.message) for r in dep.reasons] == [(
        "QUARANTINED", "the solver failed on it 2 times (RuntimeError: the solver trips on poison); "
                       "submit it again or delete it")]
    assert list(dep.placements) == []
    good = await eventually(lambda: _get(stubs, "good"), lambda d: d.placed_replicas == 1, what="good placed")
    assert [p.node for p in good.placements] == ["n1"]

    app.reconciler._full._solve = real  # fixed: submitting it again releases it
    monkeypatch.setattr(Session, "place", place)
    await _submit(stubs, "poison", accelerators=1, locality=common_pb2.DOMAIN_NODE)
    released = await eventually(lambda: _get(stubs, "poison"), lambda d: d.placed_replicas == 1, what="released")
    assert list(released.reasons) == []
    await agent.close()


async def test_stored_data_beyond_the_limits_is_set_aside_and_never_solved(make_app):
    app, stubs = await make_app(heartbeat_timeout_s=60)
    async with app.db.unit_of_work() as uow:  # as a database from before the limits could hold
        huge = planning.spec_of_doc({"id": "huge", "tenant": "lab", "replicas": 10**9, "shards_per_replica": 1,
                                     "shard": {"accelerators": 1}})
        from controller.store import repositories as repo
        uow.session.add(repo.new_deployment_row(huge))
        uow.session.add(m.Node(id="giant", rack_id="rack-a", accelerators=10**9))
        await repo.bump_cluster_generation(uow.session)
        await uow.commit()
    agent = HandAgent(stubs, "n1", "rack-a")
    await agent.register()
    await agent.connect()
    await _submit(stubs, "fine", "other", accelerators=1, locality=common_pb2.DOMAIN_NODE)

    dep = await eventually(lambda: _get(stubs, "huge"), lambda d: d.phase == QUARANTINED, what="huge quarantined")
    assert dep.reasons[0].message == (
        "exceeds the controller's limits: deployment huge: replicas must be between 1 and 4096, got 1000000000; "
        "submit it again within them")
    fine = await eventually(lambda: _get(stubs, "fine"), lambda d: d.placed_replicas == 1, what="fine placed")
    assert [p.node for p in fine.placements] == ["n1"]  # never on the node beyond the limits
    await stubs.admin.DeleteNode(admin_pb2.NodeRequest(id="giant"))  # and an admin can remove it
    await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="huge"))
    await eventually(lambda: stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest()),
                     lambda r: [d.spec.name for d in r.deployments] == ["fine"], what="huge deleted")
    await agent.close()


async def _health(stubs: Stubs, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_is_not_serving_while_the_reconciler_keeps_failing_and_recovers(make_app, monkeypatch):
    app, stubs = await make_app(health_interval_s=0.1)
    assert await _health(stubs) == SERVING
    real = full_path.commit_plan

    async def broken(*args, **kwargs):
        raise RuntimeError("cannot write the plan")

    # Both the full path and the fast path (arrivals on the warm cluster) commit through it.
    for path in (fast_path, full_path):
        monkeypatch.setattr(path, "commit_plan", broken)
    await _submit(stubs, "svc")  # an arrival: every pass now fails
    await eventually(lambda: _health(stubs), lambda s: s == NOT_SERVING, what="NOT_SERVING")
    assert any("the reconciler failed" in p for p in app.monitor.problems)
    for path in (fast_path, full_path):
        monkeypatch.setattr(path, "commit_plan", real)
    await eventually(lambda: _health(stubs), lambda s: s == SERVING, what="SERVING again")


async def test_health_is_not_serving_above_the_memory_ceiling(make_app):
    app, stubs = await make_app(max_rss_mib=1, health_interval_s=0.1)
    await eventually(lambda: _health(stubs), lambda s: s == NOT_SERVING, what="NOT_SERVING")
    assert app.monitor.problems[0].startswith("resident memory ")
    assert app.monitor.problems[0].endswith(" MiB is above the ceiling of 1 MiB")
    app.monitor._max_rss = 1 << 20  # raised by the operator: serving again
    await eventually(lambda: _health(stubs), lambda s: s == SERVING, what="SERVING again")


async def test_health_is_not_serving_when_the_database_is_gone(tmp_path):
    path = tmp_path / "maia.db"
    async with running_controller(f"sqlite+aiosqlite:///{path}", tmp_path, health_interval_s=0.1) as app:
        await _lose_the_database(app, path)


async def _replace_with_a_directory(app: ControllerApp, path) -> None:
    """Put a directory where the database file was, so that no new connection can open it.

    The controller's background work (lease renewal, health probes, passes) keeps opening
    connections, and SQLite creates a missing file on open: one may land between the unlink and
    the mkdir. So retry until the directory is in place, then drop pooled connections once more
    (one opened in between holds the unlinked file and would still answer).
    """
    for _ in range(100):
        await app.db.dispose()  # drop pooled connections: the next one opens the path again
        for suffix in ("", "-wal", "-shm"):
            path.with_name(f"maia.db{suffix}").unlink(missing_ok=True)
        try:
            path.mkdir()  # a directory where the database file was: it cannot be opened
        except FileExistsError:
            continue  # a connection re-created the file in between
        await app.db.dispose()
        return
    raise AssertionError(f"{path} kept being re-created; could not replace it with a directory")


async def _lose_the_database(app: ControllerApp, path) -> None:
    stubs = Stubs.connect(app.address, admin_token_of(app))
    try:
        assert await _health(stubs) == SERVING
        await _replace_with_a_directory(app, path)
        await eventually(lambda: _health(stubs), lambda s: s == NOT_SERVING, what="NOT_SERVING")
        assert "the database does not answer" in app.monitor.problems
        # A liveness probe (deploy/k8s) restarts a wedged controller, not one whose database is away.
        assert await _health(stubs, LIVENESS_SERVICE) == SERVING
    finally:
        await stubs.channel.close()

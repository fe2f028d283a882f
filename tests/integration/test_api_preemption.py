"""Preemption end to end with real agents (`maia-simnode` subprocesses): higher-priority work
stops preemptible replicas on their nodes; the victim is told why (phase, PREEMPTED reason,
event, watch), the decision is audited, and the victim is placed again once capacity frees up.
The committed state passes the independent checker at every step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench.checking import check_state
from controller.api import convert
from controller.identity import CONTROLLER
from controller.usecases import deployments as cases
from controller.store.snapshot import load_snapshot
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, running_fleet, spec
from maia.v1 import admin_pb2, audit_pb2, common_pb2, deployments_pb2

P = deployments_pb2
RACKS = {"rack-00": "row-a", "rack-01": "row-a"}
NODE = common_pb2.DOMAIN_NODE


async def _get(stubs: Stubs, name: str) -> P.Deployment:
    return await stubs.deployments.GetDeployment(P.GetDeploymentRequest(name=name))


async def _violations(app) -> list[str]:
    async with app.db.unit_of_work() as uow:
        problem = (await load_snapshot(uow.session)).problem
    return [f"{v.rule}: {v.message}" for v in check_state(problem, problem["placements"])]


@pytest.fixture
async def fleet(stubs: Stubs, controller_app, tmp_path: Path) -> AsyncIterator[SimFleet]:
    """2 racks x 4 nodes x 4 accelerators; tenants `lab` and `burst`."""
    async with running_fleet(stubs, controller_app, tmp_path, RACKS, tenants=("lab", "burst")) as sim:
        yield sim


async def test_higher_priority_work_preempts_and_the_victim_is_told_and_requeued(
        stubs: Stubs, fleet: SimFleet, controller_app) -> None:
    # Burst capacity fills every node (8 replicas x a whole node).
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(
        spec=spec("scavenger", "burst", replicas=8, accelerators=4, locality=NODE, preemptible=True)))
    full = await eventually(lambda: _get(stubs, "scavenger"), lambda d: d.phase == RUNNING and d.running_replicas == 8,
                            timeout=60, what="scavenger running on every node")
    watch = stubs.deployments.WatchDeployments(P.WatchDeploymentsRequest(name="scavenger"))

    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(
        spec=spec("prod", "lab", replicas=2, accelerators=4, locality=NODE, priority=10)))
    prod = await eventually(lambda: _get(stubs, "prod"), lambda d: d.phase == RUNNING, timeout=60, what="prod running")
    victim = await _get(stubs, "scavenger")
    assert victim.phase == P.DEPLOYMENT_PHASE_DEGRADED and victim.placed_replicas == 6
    assert victim.reasons[0].code == "PREEMPTED" and "re-queued" in victim.reasons[0].message
    freed = {(p.replica, p.node) for p in full.placements} - {(p.replica, p.node) for p in victim.placements}
    assert {node for _, node in freed} == {p.node for p in prod.placements}

    # The watch told the victim's followers why.
    async for event in watch:
        if event.deployment.reasons and event.deployment.reasons[0].code == "PREEMPTED":
            break
    watch.cancel()
    # The agents stopped the victims' shards on their nodes (their own log says so).
    stopped = {f"scavenger/{replica}/0 stopped" for replica, _ in freed}
    await eventually(lambda: _text(fleet), lambda text: all(s in text for s in stopped), what="victims stopped")
    events = (await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="deployment",
                                                                       object_id="scavenger"))).events
    assert [e for e in events if e.kind == "deployment.preempted"]
    audited = (await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant="burst"))).events
    assert [a for a in audited if a.action == "deployment.preempted" and a.object_id == "burst/scavenger"]  # TENANT/NAME
    assert await _violations(controller_app) == []

    # Re-queued: once prod goes, the victim runs all its replicas again and the reason clears.
    await stubs.deployments.DeleteDeployment(P.DeleteDeploymentRequest(name="prod"))
    back = await eventually(lambda: _get(stubs, "scavenger"), lambda d: d.phase == RUNNING and d.running_replicas == 8,
                            timeout=60, what="scavenger placed again")
    assert not back.reasons
    assert await _violations(controller_app) == []


async def _text(fleet: SimFleet) -> str:
    return fleet.log_path.read_text(errors="replace")


async def test_a_dry_run_solves_with_the_controllers_preemption_and_says_what_it_would_preempt(
        stubs: Stubs, fleet: SimFleet, controller_app) -> None:
    """Dry runs never preempted, and said "fits after preempting ... (allow_preemption is off)"
    while the controller's passes preempt (--preemption, the default): the apply then placed
    what the dry run said it would not. They now solve as the passes do, and say whom the pass
    placing it would preempt (redacted for a tenant); with preemption off, nothing."""
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(
        spec=spec("scavenger", "burst", replicas=8, accelerators=4, locality=NODE, preemptible=True)))
    await eventually(lambda: _get(stubs, "scavenger"), lambda d: d.phase == RUNNING and d.running_replicas == 8,
                     timeout=60, what="scavenger running on every node")
    prod = spec("prod", "lab", replicas=2, accelerators=4, locality=NODE, priority=10)
    dry = (await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=prod, dry_run=True))).deployment
    assert dry.placed_replicas == 2
    assert [(r.code, r.message, r.scope) for r in dry.reasons] == [
        ("PREEMPTS", "placing it preempts 2 replicas of burst/scavenger", "burst/scavenger")]
    async with Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab")
                             ).channel as channel:
        seen = (await Stubs.on(channel).deployments.SubmitDeployment(
            P.SubmitDeploymentRequest(spec=prod, dry_run=True))).deployment
    assert [(r.code, r.message, r.scope) for r in seen.reasons] == [
        ("PREEMPTS", "placing it preempts 2 replicas of another tenant's deployment", "")]
    off = replace(controller_app.deps, allow_preemption=False)  # maia-controller --no-preemption
    no = await cases.dry_run_deployment(off.db, CONTROLLER, convert.deployment_spec(prod),
                                        time_limit_ms=2000, allow_preemption=off.allow_preemption)
    assert no.placed_replicas == 0 and "PREEMPTS" not in {r.code for r in no.reasons}
    assert any("allow_preemption is off" in r.message for r in no.reasons)
    assert (await _get(stubs, "scavenger")).running_replicas == 8  # nothing was preempted

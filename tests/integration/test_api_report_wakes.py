"""Agents' reports wake the reconciler when a pass waits on them, and only then, over real gRPC
with hand-driven agents and a controller whose reconcile interval is longer than the test (a
pass runs only when woken): a rolling update's old replica is stopped once its replacement is
reported running (woken by that report), a new deployment's shards loading and running wake
nothing, a shard failing does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from controller.api.server import ControllerApp
from controller.domain.values import DeploymentEvent, DeploymentView
from grpc_harness import HandAgent, Stubs, admin_token_of, eventually, running_controller, spec, topology
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2

P = deployments_pb2
QUIET_S = 600.0  # the reconcile interval: no pass but a woken one within a test


def _count_wakes(app: ControllerApp) -> list[None]:
    """One item per `app.reconciler.wake()` from now on (it still wakes)."""
    calls: list[None] = []
    wake = app.reconciler.wake

    def counted() -> None:
        calls.append(None)
        wake()

    app.reconciler.wake = counted  # type: ignore[method-assign]
    return calls


async def _published(events: asyncio.Queue, check: Callable[[DeploymentView], bool]) -> DeploymentView:
    """The next deployment event to watchers whose view passes `check` (a report's is published
    after the flush chose whether to wake the reconciler)."""
    while True:
        event: DeploymentEvent = await asyncio.wait_for(events.get(), 20)
        if check(event.deployment):
            return event.deployment


def _assignments(agents: dict[str, HandAgent], view: DeploymentView, replica: int) -> list[tuple[HandAgent, int]]:
    return [(agents[p.node], p.shard) for p in view.placements if p.replica == replica]


async def test_reports_wake_the_reconciler_when_a_pass_waits_on_them(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_controller(migrated_db_url, tmp_path, reconcile_interval_s=QUIET_S) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        agents = {f"node-{i}": HandAgent(stubs, f"node-{i}", "rack-a", accelerators=2) for i in (1, 2)}
        try:
            await _rolls_on_the_report_that_completes_a_replacement(app, stubs, agents)
        finally:
            for agent in agents.values():
                await agent.close()
            await stubs.channel.close()


async def _rolls_on_the_report_that_completes_a_replacement(app: ControllerApp, stubs: Stubs,
                                                            agents: dict[str, HandAgent]) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    sets: dict[str, agent_pb2.AssignmentSet] = {}
    for node_id, agent in agents.items():
        await agent.register()
        await agent.connect()
        agent.keep_beating()
        sets[node_id] = await agent.next_set()
    for node_id in agents:
        await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=node_id)),
                         lambda n: n.connected and n.state == common_pb2.NODE_STATE_READY, what=f"{node_id} ready")
    events = app.bus.subscribe()
    wakes = _count_wakes(app)

    svc = spec("svc", locality=common_pb2.DOMAIN_NODE)
    await stubs.deployments.SubmitDeployment(P.SubmitDeploymentRequest(spec=svc))
    placed = await _published(events, lambda v: v.placed_replicas == 1)
    [(first, _)] = _assignments(agents, placed, 0)
    [assignment] = (await first.next_set(lambda s: len(s.assignments) == 1)).assignments
    for phase, said in ((common_pb2.SHARD_PHASE_LOADING, "loading"), (common_pb2.SHARD_PHASE_RUNNING, "running")):
        before = len(wakes)
        first.report(assignment, phase)
        await _published(events, lambda v: v.placements[0].phase == said)
        assert len(wakes) == before, f"a new deployment's shard {said}: nothing waits on it"

    svc.shard.hbm_gib = 24  # what a replica is: a rolling update
    assert (await stubs.deployments.UpdateDeployment(P.UpdateDeploymentRequest(spec=svc, resource_version=1))).rolling
    rolling = await _published(events, lambda v: v.placed_replicas == 2)
    [new] = [p for p in rolling.placements if not p.outgoing]
    replacement = agents[new.node]
    [given] = [a for a in (await replacement.next_set(
        lambda s: any(a.replica == new.replica for a in s.assignments))).assignments if a.replica == new.replica]
    before = len(wakes)
    replacement.report(given, common_pb2.SHARD_PHASE_RUNNING)
    await _published(events, lambda v: any(p.replica == new.replica and p.phase == "running" for p in v.placements))
    assert len(wakes) == before + 1, "the report that completes a replacement wakes the reconciler"
    # The pass it woke stops the old replica (no other pass runs meanwhile: the interval is longer).
    await first.next_set(lambda s: all(a.replica != assignment.replica for a in s.assignments))
    rolled = await stubs.deployments.GetDeployment(P.GetDeploymentRequest(name="svc"))
    assert rolled.outgoing_replicas == 0 and [p.replica for p in rolled.placements] == [new.replica]

    before = len(wakes)
    replacement.report(given, common_pb2.SHARD_PHASE_FAILED)
    await _published(events, lambda v: v.placements[0].phase == "failed")
    assert len(wakes) == before + 1, "a failed shard wakes the reconciler (it is placed again)"

"""The phases an agent reports, over real gRPC with hand-driven agents (SQLite and PostgreSQL): a
STOPPED shard still assigned is a failure, and so is a shard its agent never says anything of.
(Phases an agent never reports end its stream: test_api_agent_bounds.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from grpc_harness import RUNNING, HandAgent, Stubs, controller_with_rack, eventually, spec
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2


async def _two_agents_and_svc(stubs: Stubs) -> tuple[dict[str, HandAgent], Callable[[], Awaitable[deployments_pb2.Deployment]],
                                                     deployments_pb2.Deployment]:
    """Tenant lab, hand agents n1 and n2 beating and ready, and a node-local deployment svc of
    one 4-accelerator replica: the agents, a read of svc, and svc as first placed (not taken up)."""
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    agents = {node_id: HandAgent(stubs, node_id, "rack-a") for node_id in ("n1", "n2")}
    for agent in agents.values():
        await agent.register()
        await agent.connect()
        agent.keep_beating()
        await agent.next_set()
    await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                     lambda r: sum(n.connected and n.state == common_pb2.NODE_STATE_READY for n in r.nodes) == 2,
                     what="both nodes ready")
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("svc", accelerators=4, locality=common_pb2.DOMAIN_NODE)))

    def svc() -> Awaitable[deployments_pb2.Deployment]:
        return stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc"))

    return agents, svc, await eventually(svc, lambda d: len(d.placements) == 1, what="svc placed")


async def test_a_shard_its_agent_stopped_while_still_assigned_is_placed_again(migrated_db_url: str, tmp_path):
    """An agent stops only the shards its set no longer names; one that says STOPPED of a shard
    still assigned to it runs it no more: a failure, placed again (elsewhere) after its back-off,
    not a placement left STOPPED that nothing moves again."""
    async with controller_with_rack(migrated_db_url, tmp_path, restart_backoff_s=0.2) as (_, stubs):
        agents, svc, placed = await _two_agents_and_svc(stubs)
        holder = agents[placed.placements[0].node]
        other = next(agent for agent in agents.values() if agent is not holder)
        assigned = (await holder.next_set(lambda s: len(s.assignments) == 1)).assignments[0]
        holder.report(assigned, common_pb2.SHARD_PHASE_RUNNING)
        await eventually(svc, lambda d: d.phase == RUNNING, what="svc running")

        holder.send(agent_pb2.AgentMessage(shard_status=agent_pb2.ShardStatus(
            deployment=assigned.deployment, replica=assigned.replica, shard=assigned.shard,
            generation=assigned.generation, phase=common_pb2.SHARD_PHASE_STOPPED, message="model server exited 0")))
        await other.next_set(lambda s: len(s.assignments) == 1, timeout=15)  # placed again, elsewhere
        await holder.next_set(lambda s: len(s.assignments) == 0, timeout=15)  # and taken from the holder
        dep = await svc()
        assert [p.node for p in dep.placements] == [other.info.node_id]
        assert [r.message for r in dep.reasons if r.code == "SHARD_FAILED"] == [
            f"replica 0 shard 0 failed on {holder.info.node_id}: stopped by its agent while still assigned: "
            "model server exited 0"]
        for agent in agents.values():
            await agent.close()


async def test_a_shard_its_agent_never_takes_up_fails_and_is_placed_again(migrated_db_url: str, tmp_path):
    """An agent that heartbeats but says nothing of a shard its set named (a bug, a hung loader)
    left the placement ASSIGNED for ever and the replica never ran: after --assignment-ack-timeout
    it is FAILED (after the stream's silence timeout, when that is longer: a heartbeat may answer),
    and placed again after its back-off on the node whose agent takes it up; that
    agent's LOADING keeps its own clock from running out."""
    # An ack timeout below the stream's silence timeout (the test controller's 2 s): the latter
    # counts, as the agent may answer in its next heartbeat.
    async with controller_with_rack(migrated_db_url, tmp_path, restart_backoff_s=0.2, assignment_ack_timeout_s=0.5) as (
            _, stubs):
        agents, svc, placed = await _two_agents_and_svc(stubs)
        mute = agents[placed.placements[0].node]  # says nothing of it
        other = next(agent for agent in agents.values() if agent is not mute)
        moved = await other.next_set(lambda s: len(s.assignments) == 1, timeout=15)  # placed again, elsewhere
        other.report(moved.assignments[0], common_pb2.SHARD_PHASE_LOADING)
        await mute.next_set(lambda s: len(s.assignments) == 0, timeout=15)  # and taken from the mute node
        dep = await svc()
        assert [r.message for r in dep.reasons if r.code == "SHARD_FAILED"] == [
            f"replica 0 shard 0 failed on {mute.info.node_id}: not taken up by its agent within 2s of the "
            "assignment set that named it (no LOADING, RUNNING or FAILED report of it)"]
        await asyncio.sleep(2.5)  # past the timeout again: the LOADING shard stays where it is
        dep = await svc()
        assert [(p.node, p.phase) for p in dep.placements] == [(other.info.node_id, common_pb2.SHARD_PHASE_LOADING)]
        for agent in agents.values():
            await agent.close()

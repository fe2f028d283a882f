"""Conversions between the agent's values and maia.v1 agent protocol messages."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.simnode.agent import DesiredShard, DesiredState, Phase, ShardKey, ShardReport
from maia.v1 import agent_pb2, common_pb2

_PHASES = {
    Phase.LOADING: common_pb2.SHARD_PHASE_LOADING,
    Phase.RUNNING: common_pb2.SHARD_PHASE_RUNNING,
    Phase.FAILED: common_pb2.SHARD_PHASE_FAILED,
    Phase.STOPPED: common_pb2.SHARD_PHASE_STOPPED,
}


@dataclass(frozen=True)
class NodeSpec:
    """What a simulated node is (its NodeInfo)."""

    node_id: str
    rack: str
    accelerators: int = 4
    accelerator_model: str = "maia-100"
    hbm_gib: float = 64.0
    cpu_milli: int = 96_000
    memory_mib: int = 786_432
    idle_power_w: float = 600.0
    agent_version: str = "maia-simnode/0.1.0"

    def to_proto(self) -> agent_pb2.NodeInfo:
        return agent_pb2.NodeInfo(
            node_id=self.node_id, hostname=self.node_id, rack=self.rack,
            accelerators=self.accelerators, accelerator_model=self.accelerator_model,
            hbm_gib=self.hbm_gib, cpu_milli=self.cpu_milli, memory_mib=self.memory_mib,
            idle_power_w=self.idle_power_w, labels={"maia.dev/simulated": "true"},
            agent_version=self.agent_version)


def desired_from_proto(message: agent_pb2.AssignmentSet) -> DesiredState:
    shards = tuple(
        DesiredShard(
            key=ShardKey(a.deployment, a.replica, a.shard, a.tenant), tenant=a.tenant,
            accelerator_indices=tuple(a.accelerator_indices), accelerator_milli=a.accelerator_milli,
            accelerators=a.spec.accelerators or len(a.accelerator_indices),
            power_w=a.spec.power_w, generation=a.generation, deployment_uid=a.deployment_uid)
        for a in message.assignments)
    return DesiredState(generation=message.generation, shards=shards)


def status_to_proto(report: ShardReport) -> agent_pb2.ShardStatus:
    return agent_pb2.ShardStatus(
        deployment=report.key.deployment, tenant=report.key.tenant, replica=report.key.replica,
        shard=report.key.shard,
        generation=report.generation, phase=_PHASES[report.phase], message=report.message,
        power_draw_w=report.power_draw_w, deployment_uid=report.deployment_uid)


def hello(node_id: str, session_id: str, heartbeat_interval_s: float) -> agent_pb2.AgentMessage:
    """The stream's first message, stating the heartbeat interval the agent follows (a controller
    that did not tell it, a new leader, judges the stream by it)."""
    return agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_id=node_id, session_id=session_id,
                                                        heartbeat_interval_ms=round(heartbeat_interval_s * 1000)))


def heartbeat(seq: int, power_draw_w: float, reports: list[ShardReport] | None,
              state_version: int = 0, failed: Mapping[int, str] | None = None) -> agent_pb2.AgentMessage:
    """A heartbeat with the node's full shard state (`reports`), or without it (None: unchanged since
    the stream's last heartbeat that carried it, under `state_version`), and the node's failed
    accelerators (`failed`: index -> why), in every one."""
    faults = [common_pb2.AcceleratorFault(index=i, reason=why) for i, why in sorted((failed or {}).items())]
    if reports is None:
        return agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(
            seq=seq, power_draw_w=power_draw_w, shard_state_version=state_version, shards_omitted=True,
            failed_accelerators=faults))
    return agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(
        seq=seq, power_draw_w=power_draw_w, shards=[status_to_proto(r) for r in reports],
        shard_state_version=state_version, failed_accelerators=faults))


def shard_status(report: ShardReport) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(shard_status=status_to_proto(report))

"""Protobuf <-> domain conversion, in one place.

Servicers call these and nothing else touches protobuf messages' fields. Enum values map to
the interchange words (`ISOLATION_DEDICATED_RACK` <-> "dedicated_rack"); proto3 "unset means
default" rules (min_replicas 0 -> 1, accelerator_milli 0 -> 1000, locality UNSPECIFIED -> rack)
are applied here, so use cases see complete values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from controller.errors import InvalidArgument
from controller.domain import values as d
from controller.usecases.paging import PageRequest
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2

_ISOLATION_TO_WORD = {
    common_pb2.ISOLATION_UNSPECIFIED: "shared",
    common_pb2.ISOLATION_SHARED: "shared",
    common_pb2.ISOLATION_DEDICATED_NODE: "dedicated_node",
    common_pb2.ISOLATION_DEDICATED_RACK: "dedicated_rack",
}
_ISOLATION_FROM_WORD = {
    "shared": common_pb2.ISOLATION_SHARED,
    "dedicated_node": common_pb2.ISOLATION_DEDICATED_NODE,
    "dedicated_rack": common_pb2.ISOLATION_DEDICATED_RACK,
}
_DOMAIN_TO_WORD = {
    common_pb2.DOMAIN_NODE: "node", common_pb2.DOMAIN_RACK: "rack", common_pb2.DOMAIN_ROW: "row",
    common_pb2.DOMAIN_ZONE: "zone", common_pb2.DOMAIN_NONE: "none",
}
_DOMAIN_FROM_WORD = {word: value for value, word in _DOMAIN_TO_WORD.items()}
_NODE_STATE = {"ready": common_pb2.NODE_STATE_READY, "cordoned": common_pb2.NODE_STATE_CORDONED,
               "down": common_pb2.NODE_STATE_DOWN, "suspect": common_pb2.NODE_STATE_SUSPECT}
_SHARD_PHASE_FROM_WORD = {
    "assigned": common_pb2.SHARD_PHASE_ASSIGNED, "loading": common_pb2.SHARD_PHASE_LOADING,
    "running": common_pb2.SHARD_PHASE_RUNNING, "failed": common_pb2.SHARD_PHASE_FAILED,
    "stopped": common_pb2.SHARD_PHASE_STOPPED, "unknown": common_pb2.SHARD_PHASE_UNKNOWN,
}
_SHARD_PHASE_TO_WORD = {value: word for word, value in _SHARD_PHASE_FROM_WORD.items()}
_DEPLOYMENT_PHASE = {
    "pending": deployments_pb2.DEPLOYMENT_PHASE_PENDING,
    "scheduled": deployments_pb2.DEPLOYMENT_PHASE_SCHEDULED,
    "running": deployments_pb2.DEPLOYMENT_PHASE_RUNNING,
    "degraded": deployments_pb2.DEPLOYMENT_PHASE_DEGRADED,
    "deleting": deployments_pb2.DEPLOYMENT_PHASE_DELETING,
    "quarantined": deployments_pb2.DEPLOYMENT_PHASE_QUARANTINED,
    "failed": deployments_pb2.DEPLOYMENT_PHASE_FAILED,
}
_EVENT_TYPE = {
    "added": deployments_pb2.DeploymentEvent.TYPE_ADDED,
    "modified": deployments_pb2.DeploymentEvent.TYPE_MODIFIED,
    "deleted": deployments_pb2.DeploymentEvent.TYPE_DELETED,
}


def _enum_word(table: dict[int, str], value: int, what: str, default: str | None = None) -> str:
    if value == 0 and default is not None:
        return default
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"{what}: unknown value {value}") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NAIVE_EPOCH = datetime(1970, 1, 1)  # a naive datetime is taken as UTC, as Timestamp.FromDatetime takes it


def timestamp(value: datetime | None) -> Timestamp | None:
    """`Timestamp.FromDatetime`'s value, worked out in integers (FromDatetime's Python took ~6 us
    of the ~20 us of a deployment's conversion, twice: every watch event has two)."""
    fields = _timestamp_fields(value)
    return None if fields is None else Timestamp(**fields)


def _timestamp_fields(value: datetime | None) -> dict[str, int] | None:
    """`timestamp`'s fields (None: the field is left unset)."""
    if value is None:
        return None
    since = value - (_NAIVE_EPOCH if value.tzinfo is None else _EPOCH)
    return {"seconds": since.days * 86400 + since.seconds, "nanos": since.microseconds * 1000}


def _opt(msg: object, name: str) -> float | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


def page_request(msg: object) -> PageRequest:
    """A list request's page_size and page_token."""
    return PageRequest(size=msg.page_size, token=msg.page_token)  # type: ignore[attr-defined]


# --- tenants ---------------------------------------------------------------------------------
def tenant_spec(msg: admin_pb2.Tenant) -> d.TenantSpec:
    return d.TenantSpec(
        id=msg.id, isolation=_enum_word(_ISOLATION_TO_WORD, msg.isolation, "isolation"),
        excludes=tuple(msg.excludes), zones=tuple(msg.zones),
        reserved_accelerators=_opt(msg, "reserved_accelerators"),
        max_accelerators=_opt(msg, "max_accelerators"), max_power_w=_opt(msg, "max_power_w"),
    )


def tenant_msg(view: d.TenantView) -> admin_pb2.Tenant:
    s = view.spec
    msg = admin_pb2.Tenant(
        id=s.id, isolation=_ISOLATION_FROM_WORD[s.isolation], excludes=list(s.excludes), zones=list(s.zones),
        used_accelerators=view.usage.accelerators, used_power_w=view.usage.power_w,
    )
    if s.reserved_accelerators is not None:
        msg.reserved_accelerators = s.reserved_accelerators
    if s.max_accelerators is not None:
        msg.max_accelerators = s.max_accelerators
    if s.max_power_w is not None:
        msg.max_power_w = s.max_power_w
    return msg


# --- topology --------------------------------------------------------------------------------
def topology_spec(msg: admin_pb2.Topology) -> d.TopologySpec:
    return d.TopologySpec(
        zones=tuple(d.ZoneSpec(z.id) for z in msg.zones),
        rows=tuple(d.RowSpec(r.id, r.zone, _opt(r, "power_budget_w")) for r in msg.rows),
        racks=tuple(d.RackSpec(k.id, k.row, _opt(k, "power_budget_w")) for k in msg.racks),
    )


def topology_msg(view: d.TopologyView) -> admin_pb2.Topology:
    msg = admin_pb2.Topology(zones=[admin_pb2.Zone(id=z.id) for z in view.zones])
    for r in view.rows:
        row = msg.rows.add(id=r.spec.id, zone=r.spec.zone, power_used_w=r.power_used_w)
        if r.spec.power_budget_w is not None:
            row.power_budget_w = r.spec.power_budget_w
    for k in view.racks:
        rack = msg.racks.add(id=k.spec.id, row=k.spec.row, power_used_w=k.power_used_w, nodes=k.nodes)
        if k.spec.power_budget_w is not None:
            rack.power_budget_w = k.spec.power_budget_w
    return msg


# --- nodes -----------------------------------------------------------------------------------
def node_msg(view: d.NodeView) -> admin_pb2.Node:
    i = view.info
    return admin_pb2.Node(
        id=i.node_id, hostname=i.hostname, rack=i.rack, row=view.row, zone=view.zone,
        state=_NODE_STATE[view.state], accelerators=i.accelerators, accelerator_model=i.accelerator_model,
        hbm_gib=i.hbm_gib or 0.0, cpu_milli=i.cpu_milli or 0, memory_mib=i.memory_mib or 0,
        idle_power_w=i.idle_power_w, labels=i.labels, connected=view.connected,
        last_heartbeat=timestamp(view.last_heartbeat), power_draw_w=view.power_draw_w,
        accelerators_used=view.accelerators_used, shards=view.shards, tenants=list(view.tenants),
        cordoned=view.cordoned, draining=view.draining, evicted=view.evicted,
        failed_accelerators=[{"index": f.index, "reason": f.reason} for f in view.failed_accelerators],
        nominated_for=view.nominated_for, nominated_at=timestamp(view.nominated_at),
    )


def event_msg(view: d.EventView) -> admin_pb2.EventRecord:
    return admin_pb2.EventRecord(id=view.id, at=timestamp(view.at), actor=view.actor, kind=view.kind,
                                 object_kind=view.object_kind, object_id=view.object_id, message=view.message)


def cluster_snapshot_msg(view: d.ClusterSnapshot) -> admin_pb2.ClusterSnapshot:
    return admin_pb2.ClusterSnapshot(problem_json=json.dumps(view.problem, separators=(",", ":")),
                                     generation=view.generation)


def cluster_summary_msg(view: d.ClusterSummary) -> admin_pb2.ClusterSummary:
    return admin_pb2.ClusterSummary(
        nodes_ready=view.nodes_ready, nodes_cordoned=view.nodes_cordoned, nodes_down=view.nodes_down,
        nodes_suspect=view.nodes_suspect, accelerators_total=view.accelerators_total, accelerators_used=view.accelerators_used,
        power_budget_w=view.power_budget_w, power_used_w=view.power_used_w,
        deployments_by_phase=view.deployments_by_phase, tenants=[tenant_msg(t) for t in view.tenants],
    )


# --- deployments -----------------------------------------------------------------------------
def shard_spec(msg: common_pb2.ShardSpec) -> d.ShardSpec:
    return d.ShardSpec(
        accelerators=msg.accelerators, accelerator_milli=msg.accelerator_milli or 1000, hbm_gib=msg.hbm_gib,
        cpu_milli=msg.cpu_milli, memory_mib=msg.memory_mib, power_w=msg.power_w,
        accelerator_models=tuple(msg.accelerator_models) or None,
    )


def deployment_spec(msg: deployments_pb2.DeploymentSpec) -> d.DeploymentSpec:
    spread = None
    if msg.HasField("spread"):
        spread = d.Spread(_enum_word(_DOMAIN_TO_WORD, msg.spread.domain, "spread.domain", default="none"),
                          msg.spread.max_per_domain)
    return d.DeploymentSpec(
        name=msg.name, tenant=msg.tenant, replicas=msg.replicas, min_replicas=msg.min_replicas or 1,
        shards_per_replica=msg.shards_per_replica, shard=shard_spec(msg.shard),
        locality=_enum_word(_DOMAIN_TO_WORD, msg.locality, "locality", default="rack"),
        spread=spread, priority=msg.priority, preemptible=msg.preemptible,
    )


def _shard_spec_fields(spec: d.ShardSpec) -> dict[str, object]:
    """A `common_pb2.ShardSpec`'s fields. The messages below are built from dicts of their fields:
    a field given as a dict is built in place, one given as a message is built and then copied in
    (a deployment's spec, its shard, each placement, each timestamp: most of a message's cost)."""
    return {"accelerators": spec.accelerators, "accelerator_milli": spec.accelerator_milli, "hbm_gib": spec.hbm_gib,
            "cpu_milli": spec.cpu_milli, "memory_mib": spec.memory_mib, "power_w": spec.power_w,
            "accelerator_models": spec.accelerator_models or ()}


def _deployment_spec_fields(spec: d.DeploymentSpec) -> dict[str, object]:
    fields: dict[str, object] = {
        "name": spec.name, "tenant": spec.tenant, "replicas": spec.replicas, "min_replicas": spec.min_replicas,
        "shards_per_replica": spec.shards_per_replica, "shard": _shard_spec_fields(spec.shard),
        "locality": _DOMAIN_FROM_WORD[spec.locality], "priority": spec.priority, "preemptible": spec.preemptible,
    }
    if spec.spread is not None:
        fields["spread"] = {"domain": _DOMAIN_FROM_WORD[spec.spread.domain],
                            "max_per_domain": spec.spread.max_per_domain}
    return fields


def _deployment_fields(view: d.DeploymentView) -> dict[str, object]:
    fields = {
        "spec": _deployment_spec_fields(view.spec), "phase": _DEPLOYMENT_PHASE[view.phase],
        "generation": view.generation, "placed_replicas": view.placed_replicas,
        "running_replicas": view.running_replicas,
        "placements": [
            {"replica": p.replica, "shard": p.shard, "node": p.node, "rack": p.rack,
             "accelerator_indices": p.accelerator_indices, "accelerator_milli": p.accelerator_milli,
             "phase": _SHARD_PHASE_FROM_WORD[p.phase], "message": p.message, "revision": p.revision,
             "outgoing": p.outgoing}
            for p in view.placements
        ],
        "reasons": [{"code": r.code, "message": r.message, "scope": r.scope} for r in view.reasons],
        "created_at": _timestamp_fields(view.created_at), "updated_at": _timestamp_fields(view.updated_at),
        "resource_version": view.resource_version, "revision": view.revision,
        "updated_replicas": view.updated_replicas, "outgoing_replicas": view.outgoing_replicas,
    }
    if view.nomination is not None:
        n = view.nomination
        fields["nomination"] = {"nodes": n.nodes, "nominated_at": _timestamp_fields(n.nominated_at),
                                "waiting_since": _timestamp_fields(n.waiting_since),
                                "missing_replicas": n.missing_replicas}
    return fields


def deployment_msg(view: d.DeploymentView) -> deployments_pb2.Deployment:
    return deployments_pb2.Deployment(**_deployment_fields(view))


def revisions_msg(views: Sequence[d.RevisionView]) -> deployments_pb2.ListDeploymentRevisionsResponse:
    return deployments_pb2.ListDeploymentRevisionsResponse(revisions=[
        {"revision": v.revision, "spec": _deployment_spec_fields(v.spec), "created_at": _timestamp_fields(v.created_at),
         "changes": v.changes, "current": v.current} for v in views])


def _deployment_event_fields(event: d.DeploymentEvent) -> dict[str, object]:
    return {"type": _EVENT_TYPE[event.type], "deployment": _deployment_fields(event.deployment)}


def deployment_event_msg(event: d.DeploymentEvent) -> deployments_pb2.DeploymentEvent:
    return deployments_pb2.DeploymentEvent(**_deployment_event_fields(event))


def deployment_event_batch_msg(events: Sequence[d.DeploymentEvent]) -> deployments_pb2.DeploymentEventBatch:
    """The events built in place in the batch (from their fields): built as messages, each was
    then copied into it, an eighth of a watch's conversion."""
    return deployments_pb2.DeploymentEventBatch(events=[_deployment_event_fields(e) for e in events])


# --- agents ----------------------------------------------------------------------------------
def node_info(msg: agent_pb2.NodeInfo) -> d.NodeInfo:
    # proto3 scalars cannot say "unset": a zero capacity is taken as "not declared" (not limited).
    return d.NodeInfo(
        node_id=msg.node_id, rack=msg.rack, accelerators=msg.accelerators, hostname=msg.hostname,
        accelerator_model=msg.accelerator_model, hbm_gib=msg.hbm_gib or None, cpu_milli=msg.cpu_milli or None,
        memory_mib=msg.memory_mib or None, idle_power_w=msg.idle_power_w, labels=dict(msg.labels),
        agent_version=msg.agent_version,
    )


def registration_msg(reg: d.Registration) -> agent_pb2.RegisterResponse:
    return agent_pb2.RegisterResponse(node_id=reg.node_id, session_id=reg.session_id,
                                      heartbeat_interval_ms=reg.heartbeat_interval_ms,
                                      node_credential=reg.node_credential)


def shard_report(msg: agent_pb2.ShardStatus) -> d.ShardReport:
    """An agent's ShardStatus, its phase as a word ("" for UNSPECIFIED, the number of a value this
    controller does not know): which phases an agent may report is `usecases.agents.validate_report`'s."""
    return d.ShardReport(
        deployment=msg.deployment, replica=msg.replica, shard=msg.shard, generation=msg.generation,
        phase=_SHARD_PHASE_TO_WORD.get(msg.phase) or ("" if msg.phase == common_pb2.SHARD_PHASE_UNSPECIFIED
                                                      else str(msg.phase)),
        message=msg.message, power_draw_w=msg.power_draw_w, tenant=msg.tenant, deployment_uid=msg.deployment_uid,
    )


def _fault_index(fault: d.AcceleratorFault) -> int:
    return fault.index


def heartbeat_report(msg: agent_pb2.Heartbeat) -> d.HeartbeatReport:
    return d.HeartbeatReport(seq=msg.seq, power_draw_w=msg.power_draw_w, shards=tuple(map(shard_report, msg.shards)),
                             shard_state_version=msg.shard_state_version, shards_omitted=msg.shards_omitted,
                             failed_accelerators=tuple(sorted(
                                 (d.AcceleratorFault(f.index, f.reason) for f in msg.failed_accelerators),
                                 key=_fault_index)))


def assignment_set_msg(view: d.AssignmentSet) -> agent_pb2.ControllerMessage:
    return agent_pb2.ControllerMessage(assignments={
        "generation": view.generation,
        "assignments": [
            {"deployment": a.deployment, "tenant": a.tenant, "replica": a.replica, "shard": a.shard,
             "shards_per_replica": a.shards_per_replica, "accelerator_indices": a.accelerator_indices,
             "accelerator_milli": a.accelerator_milli, "spec": _shard_spec_fields(a.spec), "generation": a.generation,
             "deployment_uid": a.deployment_uid}
            for a in view.assignments
        ],
    })


def usage_response_msg(report: d.UsageReport) -> deployments_pb2.GetUsageResponse:
    return deployments_pb2.GetUsageResponse(
        since=timestamp(report.since), until=timestamp(report.until),
        records=[deployments_pb2.UsageRecord(
            tenant=r.tenant, deployment=r.deployment, accelerator_model=r.accelerator_model, zone=r.zone,
            accelerator_seconds=r.accelerator_seconds, accelerator_hours=r.accelerator_seconds / 3600.0,
            energy_kwh=r.energy_kwh) for r in report.records],
    )


def optional_time(msg: Message, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, None when absent."""
    if not msg.HasField(name):
        return None
    try:
        return getattr(msg, name).ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError, OSError):  # seconds/nanos outside what a datetime can hold
        raise InvalidArgument(f"{name} is not a valid time (year 1 to 9999)") from None


def token_request(msg: admin_pb2.CreateTokenRequest) -> d.TokenRequest:
    return d.TokenRequest(role=msg.role, name=msg.name, tenant=msg.tenant,
                          ttl_s=float(msg.ttl_seconds) if msg.ttl_seconds else None, node=msg.node)


def token_msg(view: d.TokenView) -> admin_pb2.Token:
    return admin_pb2.Token(id=view.id, name=view.name, role=view.role, tenant=view.tenant, node=view.node,
                           created_by=view.created_by, created_at=timestamp(view.created_at),
                           expires_at=timestamp(view.expires_at), revoked_at=timestamp(view.revoked_at))

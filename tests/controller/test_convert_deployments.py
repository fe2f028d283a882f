"""Deployments and assignment sets to protobuf (`controller/api/convert.py`): every field of the
view lands in its field of the message, built from dicts of fields (`_deployment_fields`), as
the message built field by field, submessage by submessage, would hold it; an absent spread or
time stays absent (not an empty message)."""

from __future__ import annotations

from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from controller.api import convert
from controller.domain import values as d
from maia.v1 import agent_pb2, common_pb2, deployments_pb2

CREATED = datetime(2026, 12, 3, 1, 2, 3, 456789, tzinfo=timezone.utc)
UPDATED = datetime(2026, 12, 3, 1, 2, 4, 5)  # naive: taken as UTC
SHARD = d.ShardSpec(accelerators=2, accelerator_milli=1000, hbm_gib=40.5, cpu_milli=1500, memory_mib=2048,
                    power_w=350.0, accelerator_models=("h100", "h200"))


def _view(*, spread: d.Spread | None, times: bool) -> d.DeploymentView:
    spec = d.DeploymentSpec(name="web", tenant="t1", replicas=3, min_replicas=2, shards_per_replica=2, shard=SHARD,
                            locality="zone", spread=spread, priority=7, preemptible=True)
    placements = (
        d.ShardPlacementView(replica=0, shard=0, node="n1", rack="r1", accelerator_indices=(0, 1), accelerator_milli=0,
                             phase="running", message="", revision=2, outgoing=False),
        d.ShardPlacementView(replica=1, shard=1, node="n2", rack="", accelerator_indices=(3,), accelerator_milli=250,
                             phase="failed", message="oom", revision=1, outgoing=True),
    )
    return d.DeploymentView(spec=spec, phase="degraded", generation=4, placed_replicas=2, running_replicas=1,
                            placements=placements, reasons=(d.ReasonView("SHARD_FAILED", "oom on n2", "n2"),
                                                            d.ReasonView("X", "y", "")),
                            created_at=CREATED if times else None, updated_at=UPDATED if times else None,
                            resource_version=9, revision=2, updated_replicas=1, outgoing_replicas=1)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _field_by_field(view: d.DeploymentView) -> deployments_pb2.Deployment:
    msg = deployments_pb2.Deployment()
    s = view.spec
    msg.spec.name, msg.spec.tenant, msg.spec.replicas, msg.spec.min_replicas = s.name, s.tenant, s.replicas, s.min_replicas
    msg.spec.shards_per_replica, msg.spec.priority, msg.spec.preemptible = s.shards_per_replica, s.priority, s.preemptible
    msg.spec.locality = common_pb2.DOMAIN_ZONE
    shard = msg.spec.shard
    shard.accelerators, shard.accelerator_milli, shard.hbm_gib = SHARD.accelerators, SHARD.accelerator_milli, SHARD.hbm_gib
    shard.cpu_milli, shard.memory_mib, shard.power_w = SHARD.cpu_milli, SHARD.memory_mib, SHARD.power_w
    shard.accelerator_models.extend(SHARD.accelerator_models or ())
    if s.spread is not None:
        msg.spec.spread.domain = common_pb2.DOMAIN_RACK
        msg.spec.spread.max_per_domain = s.spread.max_per_domain
    msg.phase = deployments_pb2.DEPLOYMENT_PHASE_DEGRADED
    msg.generation, msg.placed_replicas, msg.running_replicas = 4, 2, 1
    for p, phase in zip(view.placements, (common_pb2.SHARD_PHASE_RUNNING, common_pb2.SHARD_PHASE_FAILED)):
        placed = msg.placements.add()
        placed.replica, placed.shard, placed.node, placed.rack = p.replica, p.shard, p.node, p.rack
        placed.accelerator_indices.extend(p.accelerator_indices)
        placed.accelerator_milli, placed.phase, placed.message = p.accelerator_milli, phase, p.message
        placed.revision, placed.outgoing = p.revision, p.outgoing
    for r in view.reasons:
        reason = msg.reasons.add()
        reason.code, reason.message, reason.scope = r.code, r.message, r.scope
    if view.created_at is not None:
        msg.created_at.CopyFrom(_timestamp(view.created_at))
    if view.updated_at is not None:
        msg.updated_at.CopyFrom(_timestamp(view.updated_at))
    msg.resource_version, msg.revision, msg.updated_replicas, msg.outgoing_replicas = 9, 2, 1, 1
    return msg


def test_every_field_of_a_deployment_is_in_its_message() -> None:
    view = _view(spread=d.Spread("rack", 1), times=True)
    got = convert.deployment_msg(view)
    assert got == _field_by_field(view)
    assert got.spec.HasField("spread") and got.HasField("created_at") and got.HasField("updated_at")


def test_no_spread_and_no_times_stay_absent() -> None:
    view = _view(spread=None, times=False)
    got = convert.deployment_msg(view)
    assert got == _field_by_field(view)
    assert not got.spec.HasField("spread")
    assert not got.HasField("created_at") and not got.HasField("updated_at")


def test_a_watch_event_carries_the_replys_deployment() -> None:
    view = _view(spread=d.Spread("rack", 1), times=True)
    event = convert.deployment_event_msg(d.DeploymentEvent("modified", view))
    assert event.type == deployments_pb2.DeploymentEvent.TYPE_MODIFIED
    assert event.deployment == convert.deployment_msg(view)


def test_a_batch_built_in_place_is_the_batch_of_the_events_messages_byte_for_byte() -> None:
    """WatchDeploymentBatches builds each event in the batch from its fields (no message built and
    copied in): the bytes on the wire are those of the batch of `deployment_event_msg`s."""
    events = [d.DeploymentEvent("modified", _view(spread=d.Spread("rack", 1), times=True)),
              d.DeploymentEvent("added", _view(spread=None, times=False)),
              d.DeploymentEvent("deleted", _view(spread=None, times=True))]
    got = convert.deployment_event_batch_msg(events)
    expected = deployments_pb2.DeploymentEventBatch(events=[convert.deployment_event_msg(e) for e in events])
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert got.SerializeToString() == expected.SerializeToString()
    assert convert.deployment_event_batch_msg([]) == deployments_pb2.DeploymentEventBatch()


def test_every_field_of_an_assignment_is_in_its_set() -> None:
    assignment = d.Assignment(deployment="web", tenant="t1", replica=1, shard=0, shards_per_replica=2,
                              accelerator_indices=(2, 3), accelerator_milli=500, spec=SHARD, generation=6)
    got = convert.assignment_set_msg(d.AssignmentSet(node_id="n1", generation=11, assignments=(assignment,)))
    expected = agent_pb2.ControllerMessage()
    expected.assignments.generation = 11
    a = expected.assignments.assignments.add()
    a.deployment, a.tenant, a.replica, a.shard, a.shards_per_replica = "web", "t1", 1, 0, 2
    a.accelerator_indices.extend((2, 3))
    a.accelerator_milli, a.generation = 500, 6
    a.spec.accelerators, a.spec.accelerator_milli, a.spec.hbm_gib = SHARD.accelerators, SHARD.accelerator_milli, SHARD.hbm_gib
    a.spec.cpu_milli, a.spec.memory_mib, a.spec.power_w = SHARD.cpu_milli, SHARD.memory_mib, SHARD.power_w
    a.spec.accelerator_models.extend(SHARD.accelerator_models or ())
    assert got == expected
    assert convert.assignment_set_msg(d.AssignmentSet(node_id="n1", generation=12, assignments=())).HasField("assignments")

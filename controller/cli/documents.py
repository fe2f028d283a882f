"""API objects as documents in the manifest vocabulary, for `-o json|yaml`.

`maiactl get deployment X -o yaml` prints what `maiactl apply -f` reads: `kind`, the spec's
fields at the top level in snake_case, lowercase enum words (`rack`, `dedicated_node`), numbers
as numbers (a whole float as an integer), defaults left out; what the server reports goes under
`status`, which `apply` ignores. Lists are `{kind: List, items: [...]}` (also appliable).
Answers with no manifest kind (summary, usage, audit) are in the same vocabulary
(`message_document`). The shape is stable for scripts (docs/cli.md).
"""
from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from controller.cli.vocab import (
    deployment_phase_word, domain_word, enum_word, isolation_word, node_state_word, shard_phase_word,
)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

Document = dict[str, Any]


def number(value: float) -> int | float:
    """48.0 -> 48, 2.5 -> 2.5."""
    return int(value) if float(value).is_integer() else float(value)


def message_document(message: Message) -> Any:
    """Any API message in the vocabulary above: the proto's snake_case names, every field (a zero
    one too: `nodes_cordoned: 0`; an unset optional or message field left out), lowercase enum
    words, numbers as numbers (an int64 too, which protobuf's own JSON prints as a string; a
    whole float as an integer), times as RFC 3339 strings. Every message `-o json|yaml` prints
    goes through here (`context.to_jsonable`)."""
    if message.DESCRIPTOR.full_name.startswith("google.protobuf."):  # Timestamp, Struct, Duration...
        return _numbers(json_format.MessageToDict(message))
    doc: Document = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            doc[f.name] = {key: _field_value(value_field, v) for key, v in sorted(value.items())}
        elif f.is_repeated:
            doc[f.name] = [_field_value(f, v) for v in value]
        elif not f.has_presence or message.HasField(f.name):
            doc[f.name] = _field_value(f, value)
    return doc


def _field_value(f: FieldDescriptor, value: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_document(value)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return enum_word(f.enum_type, value)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return _numbers(value)


def _numbers(value: Any) -> Any:
    """Whole floats as integers, in lists and dicts too (a Struct's numbers are all floats)."""
    if isinstance(value, float):
        return number(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def list_document(items: Iterable[Document]) -> Document:
    return {"kind": "List", "items": list(items)}


def shard_document(shard: common_pb2.ShardSpec) -> Document:
    doc: Document = {"accelerators": shard.accelerators}
    if shard.accelerator_milli and shard.accelerator_milli < 1000:
        doc["accelerator_milli"] = shard.accelerator_milli
    for key in ("hbm_gib", "power_w", "cpu_milli", "memory_mib"):
        if getattr(shard, key):
            doc[key] = number(getattr(shard, key))
    if shard.accelerator_models:
        doc["accelerator_models"] = list(shard.accelerator_models)
    return doc


def spec_document(spec: deployments_pb2.DeploymentSpec) -> Document:
    """The manifest of a deployment (what `apply` takes), defaults made explicit where a reader
    needs them (locality) and left out where they are noise (min_replicas 1, no spread)."""
    doc: Document = {"kind": "Deployment", "name": spec.name, "tenant": spec.tenant, "replicas": spec.replicas}
    if spec.min_replicas and spec.min_replicas != 1:
        doc["min_replicas"] = spec.min_replicas
    doc["shards_per_replica"] = spec.shards_per_replica
    doc["shard"] = shard_document(spec.shard)
    doc["locality"] = domain_word(spec.locality)
    if spec.HasField("spread") and spec.spread.max_per_domain:
        doc["spread"] = {"domain": domain_word(spec.spread.domain), "max_per_domain": spec.spread.max_per_domain}
    doc["priority"] = spec.priority
    doc["preemptible"] = spec.preemptible
    return doc


def reason_document(reason: common_pb2.Reason) -> Document:
    doc: Document = {"code": reason.code, "message": reason.message}
    if reason.scope:
        doc["scope"] = reason.scope
    return doc


def placement_document(p: deployments_pb2.ShardPlacement) -> Document:
    doc: Document = {"replica": p.replica, "shard": p.shard, "node": p.node, "rack": p.rack,
                     "accelerator_indices": list(p.accelerator_indices),
                     "accelerator_milli": p.accelerator_milli or 1000, "phase": shard_phase_word(p.phase),
                     "revision": p.revision}
    if p.outgoing:  # being replaced: an older revision's, or on a draining node
        doc["outgoing"] = True
    if p.message:
        doc["message"] = p.message
    return doc


def revision_document(r: deployments_pb2.DeploymentRevision) -> Document:
    """One kept revision of a deployment: its number, when, the changes that made it, and its spec
    as it was made (the current one's as it stands)."""
    return {"kind": "DeploymentRevision", "revision": r.revision, "current": r.current,
            "created_at": r.created_at.ToJsonString() if r.HasField("created_at") else None,
            "changes": list(r.changes), "spec": spec_document(r.spec)}


def deployment_document(dep: deployments_pb2.Deployment) -> Document:
    doc = spec_document(dep.spec)
    status: Document = {"phase": deployment_phase_word(dep.phase), "generation": dep.generation,
                        "resource_version": dep.resource_version, "revision": dep.revision,
                        "placed_replicas": dep.placed_replicas, "running_replicas": dep.running_replicas,
                        # a rolling update's (or a drain's): replicas running the current revision,
                        # and those being replaced
                        "updated_replicas": dep.updated_replicas, "outgoing_replicas": dep.outgoing_replicas,
                        "reasons": [reason_document(r) for r in dep.reasons],
                        "placements": [placement_document(p)
                                       for p in sorted(dep.placements, key=lambda p: (p.replica, p.shard))]}
    if dep.HasField("created_at"):
        status["created_at"] = dep.created_at.ToJsonString()
    if dep.HasField("updated_at"):
        status["updated_at"] = dep.updated_at.ToJsonString()
    if dep.HasField("nomination"):
        status["nomination"] = nomination_document(dep.nomination)
    doc["status"] = status
    return doc


def nomination_document(n: deployments_pb2.Nomination) -> Document:
    """The nodes kept for a deployment at the head of the line (`Deployment.nomination`)."""
    return {"nodes": list(n.nodes), "nominated_at": n.nominated_at.ToJsonString(),
            "waiting_since": n.waiting_since.ToJsonString(), "missing_replicas": n.missing_replicas}


def _optional(message: Any, key: str) -> int | float | None:
    return number(getattr(message, key)) if message.HasField(key) else None


def tenant_document(t: admin_pb2.Tenant) -> Document:
    doc: Document = {"kind": "Tenant", "id": t.id, "isolation": isolation_word(t.isolation)}
    if t.excludes:
        doc["excludes"] = list(t.excludes)
    if t.zones:
        doc["zones"] = list(t.zones)
    for key in ("reserved_accelerators", "max_accelerators", "max_power_w"):
        value = _optional(t, key)
        if value is not None:
            doc[key] = value
    doc["status"] = {"used_accelerators": number(t.used_accelerators), "used_power_w": number(t.used_power_w)}
    return doc


def _budgeted(item: Any, parent_key: str) -> Document:
    doc: Document = {"id": item.id, parent_key: getattr(item, parent_key)}
    budget = _optional(item, "power_budget_w")
    if budget is not None:
        doc["power_budget_w"] = budget
    return doc


def topology_document(topology: admin_pb2.Topology) -> Document:
    return {
        "kind": "Topology",
        "zones": [{"id": z.id} for z in topology.zones],
        "rows": [_budgeted(r, "zone") for r in topology.rows],
        "racks": [_budgeted(r, "row") for r in sorted(topology.racks, key=lambda r: r.id)],
        "status": {
            "rows": [{"id": r.id, "power_used_w": number(round(r.power_used_w, 1))} for r in topology.rows],
            "racks": [{"id": r.id, "nodes": r.nodes, "power_used_w": number(round(r.power_used_w, 1))}
                      for r in sorted(topology.racks, key=lambda r: r.id)],
        },
    }


def node_document(n: admin_pb2.Node) -> Document:
    """Nodes register themselves (no manifest kind to apply); same vocabulary all the same."""
    doc: Document = {
        "kind": "Node", "id": n.id, "hostname": n.hostname, "zone": n.zone, "row": n.row, "rack": n.rack,
        "accelerators": n.accelerators, "accelerator_model": n.accelerator_model, "hbm_gib": number(n.hbm_gib),
        "cpu_milli": n.cpu_milli, "memory_mib": n.memory_mib, "idle_power_w": number(n.idle_power_w),
        "labels": dict(sorted(n.labels.items())),
        "status": {"state": node_state_word(n.state), "cordoned": n.cordoned, "draining": n.draining,
                   "evicted": n.evicted, "connected": n.connected,
                   "accelerators_used": number(n.accelerators_used), "shards": n.shards,
                   "power_draw_w": number(round(n.power_draw_w, 1)), "tenants": list(n.tenants),
                   "failed_accelerators": [{"index": f.index, "reason": f.reason} for f in n.failed_accelerators]},
    }
    if n.HasField("last_heartbeat"):
        doc["status"]["last_heartbeat"] = n.last_heartbeat.ToJsonString()
    if n.nominated_for:
        doc["status"]["nominated_for"] = n.nominated_for
        if n.HasField("nominated_at"):
            doc["status"]["nominated_at"] = n.nominated_at.ToJsonString()
    return doc


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'shard': {'accelerators': 4}} -> {'shard.accelerators': 4}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# What a field left out of a document means (`spec_document` leaves min_replicas 1 out).
DEPLOYMENT_DEFAULTS: Mapping[str, Any] = {"min_replicas": 1}


def spec_differences(current: Document, wanted: Document, defaults: Mapping[str, Any] | None = None) -> list[str]:
    """'replicas: 2 -> 3' lines for every field that differs (status ignored); a field left out
    reads as its default where `defaults` has one ('min_replicas: 2 -> 1', not '-> (unset)')."""
    defaults = defaults or {}
    old = defaults | flatten({k: v for k, v in current.items() if k != "status"})
    new = defaults | flatten({k: v for k, v in wanted.items() if k != "status"})
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}")
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def event_document(e: admin_pb2.EventRecord) -> Document:
    return {"kind": "Event", "id": e.id, "at": e.at.ToJsonString() if e.HasField("at") else None,
            "event": e.kind, "object": f"{e.object_kind}/{e.object_id}", "actor": e.actor, "message": e.message}

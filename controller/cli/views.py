"""Readable renderings of API objects (deployments, nodes, tenants, topology, summary).

Pure functions from messages to text; the commands decide what to fetch and where to print.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from controller.cli.tables import (
    fmt_indices, fmt_list, fmt_number, fmt_used_of, render_kv, render_table,
)
from controller.cli.vocab import (
    deployment_phase_word, domain_word, isolation_word, node_state_word, shard_phase_word, title,
)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


def shard_request_text(shard: common_pb2.ShardSpec) -> str:
    """'1 acc', '1 acc x 500m', '2 acc', with hbm and power: '1 acc, 48 GiB, 700 W'."""
    parts = [f"{shard.accelerators} acc"]
    if shard.accelerator_milli and shard.accelerator_milli < 1000:
        parts[0] += f" x {shard.accelerator_milli}m"
    if shard.hbm_gib:
        parts.append(f"{fmt_number(shard.hbm_gib)} GiB")
    if shard.power_w:
        parts.append(f"{fmt_number(shard.power_w)} W")
    return ", ".join(parts)


def spread_text(spec: deployments_pb2.DeploymentSpec) -> str:
    if not spec.HasField("spread") or spec.spread.max_per_domain == 0:
        return "-"
    return f"<= {spec.spread.max_per_domain} per {domain_word(spec.spread.domain)}"


def reasons_text(reasons: Iterable[common_pb2.Reason], indent: str = "") -> str:
    lines = []
    for r in reasons:
        scope = f" [{r.scope}]" if r.scope else ""
        lines.append(f"{indent}{r.code}: {r.message}{scope}")
    return "\n".join(lines)


def phase_text(dep: deployments_pb2.Deployment) -> str:
    return title(deployment_phase_word(dep.phase))


def deployments_table(deployments: Sequence[deployments_pb2.Deployment], wide: bool = False) -> str:
    """One row per deployment; `wide` adds the racks its shards are on and the first reason's text."""
    rows = []
    for d in deployments:
        s = d.spec
        row: list[object] = [
            s.name, s.tenant, phase_text(d),
            f"{d.running_replicas}/{s.replicas}", f"{d.placed_replicas}/{s.replicas}",
            s.shards_per_replica, shard_request_text(s.shard), domain_word(s.locality),
            s.priority, "yes" if s.preemptible else "no",
            d.reasons[0].code if d.reasons else None,
        ]
        if wide:
            row += [fmt_list(sorted({p.rack for p in d.placements})), d.reasons[0].message if d.reasons else None]
        rows.append(row)
    headers = ["name", "tenant", "phase", "running", "placed", "shards", "shard", "locality",
               "priority", "preemptible", "reason"]
    return render_table(headers + (["racks", "message"] if wide else []), rows,  # type: ignore[arg-type]
                        empty="No deployments found.")


def time_text(stamp: Timestamp) -> str:
    """A time as the tables and `explain` show it: UTC, to the second."""
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def _made_text(r: deployments_pb2.DeploymentRevision) -> str | None:
    return time_text(r.created_at) if r.HasField("created_at") else None


def revisions_table(revisions: Sequence[deployments_pb2.DeploymentRevision]) -> str:
    """Newest first: each kept revision's template and the changes that made it."""
    rows = [[r.revision, "yes" if r.current else None, _made_text(r), r.spec.shards_per_replica,
             shard_request_text(r.spec.shard), domain_word(r.spec.locality), spread_text(r.spec),
             "; ".join(r.changes) or None] for r in revisions]
    return render_table(["revision", "current", "created", "shards", "shard", "locality", "spread", "changes"],
                        rows, empty="No revisions.")  # type: ignore[arg-type]


def revision_detail(r: deployments_pb2.DeploymentRevision) -> str:
    """One kept revision: when, why, and the spec it was made with."""
    pairs: list[tuple[str, object]] = [
        ("Revision", r.revision), ("Current", "yes" if r.current else "no"),
        ("Created", _made_text(r) or "unknown (before revisions were kept)"),
        ("Changes", "; ".join(r.changes) or "-"), ("Replicas", r.spec.replicas),
        ("Shards/replica", r.spec.shards_per_replica), ("Shard", shard_request_text(r.spec.shard)),
        ("Locality", domain_word(r.spec.locality)), ("Spread", spread_text(r.spec)),
        ("Priority", r.spec.priority), ("Preemptible", "yes" if r.spec.preemptible else "no")]
    return render_kv(pairs)  # type: ignore[arg-type]


def placements_table(placements: Sequence[deployments_pb2.ShardPlacement]) -> str:
    rows = [[p.replica, p.shard, p.node, p.rack, fmt_indices(p.accelerator_indices, p.accelerator_milli),
             title(shard_phase_word(p.phase)) + (" (being replaced)" if p.outgoing else ""), p.message or None]
            for p in sorted(placements, key=lambda p: (p.replica, p.shard))]
    return render_table(["replica", "shard", "node", "rack", "accelerators", "phase", "message"],
                        rows, empty="(no shards placed)")


def deployment_detail(dep: deployments_pb2.Deployment) -> str:
    s = dep.spec
    pairs: list[tuple[str, object]] = [
        ("Name", s.name), ("Tenant", s.tenant), ("Phase", phase_text(dep)),
        ("Generation", dep.generation),
        ("Version", f"resource version {dep.resource_version}, revision {dep.revision}"),
        ("Replicas", f"{s.replicas} asked (min {s.min_replicas or 1}), {dep.placed_replicas} placed, "
                     f"{dep.running_replicas} running"),
        ("Shards/replica", s.shards_per_replica),
        ("Shard", shard_request_text(s.shard)),
        ("Models", fmt_list(s.shard.accelerator_models)),
        ("Locality", domain_word(s.locality)),
        ("Spread", spread_text(s)),
        ("Priority", s.priority),
        ("Preemptible", "yes" if s.preemptible else "no"),
    ]
    if dep.outgoing_replicas:
        pairs.append(("Rollout", f"{dep.updated_replicas}/{s.replicas} replicas of revision {dep.revision} running, "
                                 f"{dep.outgoing_replicas} being replaced (maiactl rollout status {s.name})"))
    if dep.HasField("nomination"):
        pairs.append(("Nominated", f"{fmt_list(dep.nomination.nodes)} kept for it since "
                                   f"{dep.nomination.nominated_at.ToJsonString()} (maiactl explain deployment {s.name})"))
    if dep.HasField("created_at"):
        pairs.append(("Created", dep.created_at.ToJsonString()))
    text = render_kv(pairs)  # type: ignore[arg-type]
    if dep.reasons:
        text += "\n\nReasons:\n" + reasons_text(dep.reasons, indent="  ")
    text += "\n\nPlacements:\n" + placements_table(dep.placements)
    return text


def shard_rows(deployments: Sequence[deployments_pb2.Deployment], rack: str | None = None,
               ) -> list[tuple[deployments_pb2.Deployment, deployments_pb2.ShardPlacement]]:
    """(deployment, placement) of every shard, by deployment name then replica and shard; one rack only if given."""
    return [(d, p) for d in sorted(deployments, key=lambda d: d.spec.name)
            for p in sorted(d.placements, key=lambda p: (p.replica, p.shard)) if not rack or p.rack == rack]


def cluster_placements_table(deployments: Sequence[deployments_pb2.Deployment], rack: str | None = None) -> str:
    rows = [[d.spec.name, d.spec.tenant, p.replica, p.shard, p.node, p.rack,
             fmt_indices(p.accelerator_indices, p.accelerator_milli), title(shard_phase_word(p.phase))]
            for d, p in shard_rows(deployments, rack)]
    return render_table(["deployment", "tenant", "replica", "shard", "node", "rack", "accelerators",
                         "phase"], rows, empty="No shards placed.")


def _down(n: admin_pb2.Node) -> bool:
    """A down node's power reading is its last before it went silent: not a draw now (the metrics
    and rack power leave it out too)."""
    return n.state == common_pb2.NODE_STATE_DOWN


def node_flags(n: admin_pb2.Node) -> list[str]:
    """What its state word leaves out: a cordon on a node that is suspect or down (the word says
    cordoned of an up node only), a drain, an eviction (down, its work placed elsewhere)."""
    flags = ["cordoned"] if n.cordoned and n.state != common_pb2.NODE_STATE_CORDONED else []
    failed = [f"accelerator {f.index} failed" for f in n.failed_accelerators]
    nominated = [f"nominated for {n.nominated_for}"] if n.nominated_for else []
    return flags + ["draining"] * n.draining + ["evicted"] * n.evicted + failed + nominated


def nodes_table(nodes: Sequence[admin_pb2.Node], wide: bool = False) -> str:
    """One row per node; `wide` adds row, zone, accelerator model, labels and the state's flags."""
    rows = []
    for n in sorted(nodes, key=lambda n: n.id):
        row: list[object] = [n.id, n.rack, node_state_word(n.state), "yes" if n.connected else "no",
                             _accelerators_text(n), n.shards,
                             "-" if _down(n) else round(n.power_draw_w), fmt_list(n.tenants)]
        if wide:
            row += [n.row, n.zone, n.accelerator_model, fmt_list(f"{k}={v}" for k, v in sorted(n.labels.items())),
                    fmt_list(node_flags(n))]
        rows.append(row)
    headers = ["node", "rack", "state", "connected", "accelerators", "shards", "power_w", "tenants"]
    return render_table(headers + (["row", "zone", "model", "labels", "flags"] if wide else []), rows,  # type: ignore[arg-type]
                        empty="No nodes found.")


def _accelerators_text(n: admin_pb2.Node) -> str:
    """'1.5/4' used of installed, with the failed ones: '1/4 (1 failed)'."""
    failed = f" ({len(n.failed_accelerators)} failed)" if n.failed_accelerators else ""
    return f"{fmt_number(n.accelerators_used)}/{n.accelerators}{failed}"


def node_detail(n: admin_pb2.Node) -> str:
    flags = node_flags(n)
    pairs: list[tuple[str, object]] = [
        ("Node", n.id), ("Hostname", n.hostname or "-"), ("Zone/row/rack", f"{n.zone}/{n.row}/{n.rack}"),
        ("State", node_state_word(n.state) + (f" ({', '.join(flags)})" if flags else "")),
        ("Connected", "yes" if n.connected else "no"),
        ("Accelerators", f"{fmt_number(n.accelerators_used)}/{n.accelerators} used ({n.accelerator_model})"),
        *((f"Accelerator {f.index}", f"failed: {f.reason or 'no reason given'} (takes no shards)")
          for f in n.failed_accelerators),
        ("HBM/accelerator", f"{fmt_number(n.hbm_gib)} GiB"),
        ("CPU", f"{n.cpu_milli}m"), ("Memory", f"{n.memory_mib} MiB"),
        ("Power", (f"unknown: down (its last reading {fmt_number(round(n.power_draw_w))} W)" if _down(n) else
                   f"{fmt_number(round(n.power_draw_w))} W drawn") + f" (idle {fmt_number(n.idle_power_w)} W)"),
        ("Shards", n.shards), ("Tenants", fmt_list(n.tenants)),
    ]
    if n.nominated_for:
        since = f" since {n.nominated_at.ToJsonString()}" if n.HasField("nominated_at") else ""
        pairs.append(("Nominated", f"for {n.nominated_for}{since}, at the head of the line: it takes no new work "
                                   "of that deployment's priority or lower"))
    if n.HasField("last_heartbeat"):
        pairs.append(("Last heartbeat", n.last_heartbeat.ToJsonString()))
    if n.labels:
        pairs.append(("Labels", ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))))
    return render_kv(pairs)  # type: ignore[arg-type]


def _opt(msg: object, name: str) -> float | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


def tenants_table(tenants: Sequence[admin_pb2.Tenant]) -> str:
    rows = []
    for t in sorted(tenants, key=lambda t: t.id):
        max_acc = _opt(t, "max_accelerators")
        max_pw = _opt(t, "max_power_w")
        rows.append([t.id, isolation_word(t.isolation), fmt_list(t.excludes), fmt_list(t.zones),
                     _opt(t, "reserved_accelerators"),
                     fmt_used_of(t.used_accelerators, max_acc),
                     fmt_used_of(t.used_power_w, max_pw, "kW")])
    return render_table(["tenant", "isolation", "excludes", "zones", "reserved", "accelerators", "power"],
                        rows, empty="No tenants found.")


def topology_view(topology: admin_pb2.Topology) -> str:
    zones = ", ".join(z.id for z in topology.zones) or "-"
    rows_table = render_table(
        ["row", "zone", "power"],
        [[r.id, r.zone, fmt_used_of(r.power_used_w, _opt(r, "power_budget_w"), "kW")]
         for r in topology.rows], empty="(no rows)")
    racks_table = render_table(
        ["rack", "row", "nodes", "power"],
        [[r.id, r.row, r.nodes, fmt_used_of(r.power_used_w, _opt(r, "power_budget_w"), "kW")]
         for r in sorted(topology.racks, key=lambda r: r.id)], empty="(no racks)")
    return f"Zones: {zones}\n\nRows:\n{rows_table}\n\nRacks:\n{racks_table}"


def summary_view(s: admin_pb2.ClusterSummary) -> str:
    phases = ", ".join(f"{title(k.removeprefix('DEPLOYMENT_PHASE_').lower())} {v}"
                       for k, v in sorted(s.deployments_by_phase.items())) or "none"
    pairs: list[tuple[str, object]] = [
        ("Nodes", f"{s.nodes_ready} ready, {s.nodes_cordoned} cordoned, {s.nodes_suspect} suspect, "
                  f"{s.nodes_down} down"),
        ("Accelerators", fmt_used_of(s.accelerators_used, s.accelerators_total)
         + (f" ({s.accelerators_used / s.accelerators_total:.0%})" if s.accelerators_total else "")),
        ("Power", fmt_used_of(s.power_used_w, s.power_budget_w or None, "kW")),
        ("Deployments", phases),
    ]
    text = render_kv(pairs)  # type: ignore[arg-type]
    if s.tenants:
        text += "\n\nTenants:\n" + tenants_table(s.tenants)
    return text


def events_table(events: Sequence[admin_pb2.EventRecord], with_object: bool = True) -> str:
    """Oldest first: time (UTC), what happened, to what, by whom, and the message."""
    rows = []
    for e in events:
        at = time_text(e.at) if e.HasField("at") else None
        row: list[object] = [at, e.kind]
        if with_object:
            row.append(f"{e.object_kind}/{e.object_id}")
        rows.append(row + [e.actor, e.message or None])
    headers = ["time", "event"] + (["object"] if with_object else []) + ["actor", "message"]
    return render_table(headers, rows, empty="No events.")  # type: ignore[arg-type]

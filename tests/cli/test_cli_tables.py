"""Table and view rendering: alignment, formats, and what each view shows."""
from __future__ import annotations

from controller.cli.commands.apply import dry_run_text
from controller.cli.documents import node_document
from controller.cli.tables import fmt_indices, fmt_number, fmt_used_of, render_kv, render_table
from controller.cli.views import (
    cluster_placements_table, deployment_detail, deployments_table, node_detail, nodes_table, summary_view,
    topology_view,
)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2 as D


def test_columns_align_and_numbers_right_align() -> None:
    text = render_table(["name", "count"], [["a", 5], ["longer-name", 123]])
    assert text.splitlines() == [
        "NAME         COUNT",
        "a                5",
        "longer-name    123",
    ]


def test_columns_align_on_a_terminal_with_wide_characters() -> None:
    """A wide character takes two columns, a combining one none: `len` put every column after a
    model or label of them out of line (found in review)."""
    text = render_table(["model", "count", "labels"], [["加速器-X1", 4, "a=1"], ["cafe\u0301", 12, "b=2"]])
    assert text.splitlines() == [
        "MODEL      COUNT  LABELS",
        "加速器-X1      4  a=1",
        "cafe\u0301          12  b=2",
    ]


def test_empty_table_and_missing_cells() -> None:
    assert render_table(["a"], [], empty="No nodes found.") == "No nodes found."
    assert render_table(["a", "b"], [["x", None]]).splitlines()[1] == "x  -"


def test_number_formats() -> None:
    assert fmt_number(2.0) == "2"
    assert fmt_number(2.5) == "2.5"
    assert fmt_number(0.25) == "0.25"
    assert fmt_indices([0, 1]) == "0,1"
    assert fmt_indices([2], 500) == "2 (500m)"
    assert fmt_used_of(12400, 52000, "kW") == "12.4/52.0 kW (24%)"
    assert fmt_used_of(3, 8) == "3/8"
    assert fmt_used_of(12400, None, "kW") == "12.4 kW"


def test_key_values_align() -> None:
    assert render_kv([("Name", "x"), ("Priority", 5)]).splitlines() == ["Name:      x", "Priority:  5"]


def deployment(name: str = "claude", phase: int = D.DEPLOYMENT_PHASE_RUNNING) -> D.Deployment:
    dep = D.Deployment(
        spec=D.DeploymentSpec(name=name, tenant="anthropic", replicas=2, shards_per_replica=2,
                              shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=48, power_w=700),
                              locality=common_pb2.DOMAIN_RACK, priority=100),
        phase=phase, placed_replicas=1, running_replicas=1, generation=3)
    for s in range(2):
        dep.placements.add(replica=0, shard=s, node=f"rack-00-n0{s}", rack="rack-00",
                           accelerator_indices=[s], phase=common_pb2.SHARD_PHASE_RUNNING)
    dep.reasons.add(code="CAPACITY", message="0/64 nodes fit", scope="rack-01")
    return dep


def test_deployments_table_shows_phase_counts_and_first_reason() -> None:
    text = deployments_table([deployment()])
    header, row = text.splitlines()
    assert header.split()[:5] == ["NAME", "TENANT", "PHASE", "RUNNING", "PLACED"]
    assert row.split()[:5] == ["claude", "anthropic", "Running", "1/2", "1/2"]
    assert "CAPACITY" in row


def test_deployment_detail_has_spec_reasons_and_placements() -> None:
    text = deployment_detail(deployment())
    assert "Tenant:" in text and "anthropic" in text
    assert "Locality:" in text and "rack" in text
    assert "CAPACITY: 0/64 nodes fit [rack-01]" in text
    lines = text.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("REPLICA"))
    assert lines[header].split() == ["REPLICA", "SHARD", "NODE", "RACK", "ACCELERATORS", "PHASE", "MESSAGE"]
    assert lines[header + 1].split()[:6] == ["0", "0", "rack-00-n00", "rack-00", "0", "Running"]


def test_cluster_placements_table_has_one_row_per_shard_sorted() -> None:
    text = cluster_placements_table([deployment("zeta"), deployment("alpha")])
    rows = text.splitlines()[1:]
    assert len(rows) == 4
    assert [r.split()[0] for r in rows] == ["alpha", "alpha", "zeta", "zeta"]
    assert rows[0].split() == ["alpha", "anthropic", "0", "0", "rack-00-n00", "rack-00", "0", "Running"]


def test_nodes_and_topology_and_summary_views() -> None:
    node = admin_pb2.Node(id="rack-00-n00", rack="rack-00", state=common_pb2.NODE_STATE_READY, connected=True,
                          accelerators=4, accelerators_used=2.5, shards=3, power_draw_w=2350.4,
                          tenants=["a", "b"])
    row = nodes_table([node]).splitlines()[1].split()
    assert row == ["rack-00-n00", "rack-00", "ready", "yes", "2.5/4", "3", "2350", "a,b"]
    # A down node's reading is its last before it went silent: not shown as a draw.
    down = admin_pb2.Node(id="rack-00-n01", rack="rack-00", state=common_pb2.NODE_STATE_DOWN, accelerators=4,
                          power_draw_w=2000.0, idle_power_w=500.0)
    assert nodes_table([down]).splitlines()[1].split()[6] == "-"
    assert "unknown: down (its last reading 2000 W) (idle 500 W)" in node_detail(down)
    # A failed accelerator: counted in the table, its reason in the detail, a flag in -o wide.
    sick = admin_pb2.Node(id="rack-00-n02", rack="rack-00", state=common_pb2.NODE_STATE_READY, accelerators=4,
                          accelerators_used=1.0, failed_accelerators=[common_pb2.AcceleratorFault(
                              index=2, reason="uncorrectable ECC error")])
    assert nodes_table([sick]).splitlines()[1].split()[4:6] == ["1/4", "(1"]
    assert "1/4 (1 failed)" in nodes_table([sick])
    assert "Accelerator 2:" in node_detail(sick) and "failed: uncorrectable ECC error (takes no shards)" in node_detail(sick)
    assert "accelerator 2 failed" in nodes_table([sick], wide=True)
    # Kept at the head of the line: a flag in -o wide, the deployment and since when in the detail.
    kept = admin_pb2.Node(id="rack-00-n03", rack="rack-00", state=common_pb2.NODE_STATE_READY, accelerators=4,
                          nominated_for="acme/llama-70b")
    kept.nominated_at.FromJsonString("2026-12-06T21:00:00Z")
    assert "nominated for acme/llama-70b" in nodes_table([kept], wide=True)
    assert ("Nominated:        for acme/llama-70b since 2026-12-06T21:00:00Z, at the head of the line"
            in node_detail(kept)), node_detail(kept)
    assert node_document(kept)["status"]["nominated_for"] == "acme/llama-70b"
    assert "nominated_for" not in node_document(sick)["status"]

    topo = admin_pb2.Topology(zones=[admin_pb2.Zone(id="z1")],
                              rows=[admin_pb2.Row(id="row-a", zone="z1", power_budget_w=100000, power_used_w=20000)],
                              racks=[admin_pb2.Rack(id="rack-00", row="row-a", power_budget_w=56000,
                                                    power_used_w=9600, nodes=16)])
    text = topology_view(topo)
    assert "rack-00  row-a     16  9.6/56.0 kW (17%)" in text
    assert "Zones: z1" in text

    summary = admin_pb2.ClusterSummary(nodes_ready=64, accelerators_total=256, accelerators_used=64,
                                       power_budget_w=224000, power_used_w=60000,
                                       deployments_by_phase={"DEPLOYMENT_PHASE_RUNNING": 5})
    text = summary_view(summary)
    assert "64 ready, 0 cordoned, 0 suspect, 0 down" in text
    assert "64/256 (25%)" in text
    assert "Running 5" in text


def test_dry_run_text_shows_placements_or_reasons() -> None:
    placed = dry_run_text(deployment())
    assert placed.startswith("deployment/claude (dry run): would place 1/2 replicas")
    assert "rack-00-n01" in placed
    assert "CAPACITY: 0/64 nodes fit" in placed


def test_a_column_of_only_blanks_is_left_aligned() -> None:
    lines = render_table(["message", "n"], [[None, 1], [None, 22]]).splitlines()
    assert lines[1] == "-         1"


def test_wait_progress_bars_show_running_of_replicas_on_a_terminal() -> None:
    import io

    from controller.cli.commands.wait import ProgressBars
    from controller.cli.context import Context

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    bars = ProgressBars(["chat"], Context(stderr=err))
    bars.update("chat", D.Deployment(spec=D.DeploymentSpec(name="chat", replicas=4),
                                     phase=D.DEPLOYMENT_PHASE_SCHEDULED, running_replicas=3))
    bars.close()
    assert "chat: Scheduled" in err.getvalue() and "3/4" in err.getvalue()


def test_a_failed_deployment_shows_why_and_stops_a_wait_for_running() -> None:
    import io

    from controller.cli.commands.wait import _Tracker
    from controller.cli.context import Context

    failed = D.Deployment(spec=D.DeploymentSpec(name="chat", replicas=2), phase=D.DEPLOYMENT_PHASE_FAILED,
                          placed_replicas=2, running_replicas=1,
                          reasons=[common_pb2.Reason(code="SHARD_FAILED", scope="node n3",
                                                     message="failed 11 times in a row (last: replica 1 shard 0 "
                                                             "failed on n3: HBM ECC error); not placed again")])
    text = deployment_detail(failed)
    assert "Failed" in text and "HBM ECC error" in text
    tracker = _Tracker(["chat"], "running", Context(stderr=io.StringIO()))
    tracker.update("chat", failed)
    assert tracker.blocked() == ["chat"] and tracker.finished()
    # Quarantined (set aside, holding nothing, until submitted again): a wait ran to its timeout
    tracker = _Tracker(["chat"], "running", Context(stderr=io.StringIO()))
    tracker.update("chat", D.Deployment(spec=failed.spec, phase=D.DEPLOYMENT_PHASE_QUARANTINED))
    assert tracker.blocked() == ["chat"] and tracker.finished()

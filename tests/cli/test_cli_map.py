"""The rack map's text: rows and racks with power bars, nodes as cells of accelerators marked by
tenant letter, free, cordoned or down; colour only as rich markup when asked."""
from __future__ import annotations

from controller.cli.rackmap import power_bar, render_map
from maia.v1 import admin_pb2, common_pb2

READY, CORDONED, DOWN = common_pb2.NODE_STATE_READY, common_pb2.NODE_STATE_CORDONED, common_pb2.NODE_STATE_DOWN


def cluster() -> tuple[admin_pb2.Topology, list[admin_pb2.Node]]:
    topology = admin_pb2.Topology(
        rows=[admin_pb2.Row(id="row-a", zone="z1", power_budget_w=100000, power_used_w=25000)],
        racks=[admin_pb2.Rack(id="rack-00", row="row-a", power_budget_w=50000, power_used_w=25000, nodes=4)])
    nodes = [
        admin_pb2.Node(id="rack-00-n00", rack="rack-00", accelerators=4, accelerators_used=2, tenants=["zeta"],
                       state=READY),
        admin_pb2.Node(id="rack-00-n01", rack="rack-00", accelerators=4, accelerators_used=2.5,
                       tenants=["alpha", "zeta"], state=READY),
        admin_pb2.Node(id="rack-00-n02", rack="rack-00", accelerators=4, state=CORDONED),
        admin_pb2.Node(id="rack-00-n03", rack="rack-00", accelerators=4, state=DOWN),
    ]
    return topology, nodes


def test_plain_map_draws_each_accelerator() -> None:
    topology, nodes = cluster()
    lines = render_map(topology, nodes).splitlines()
    assert lines[0] == "row row-a (zone z1)  power [#####...............] 25.0/100.0 kW (25%)"
    assert lines[1] == "  rack rack-00  4 nodes, 3.5 accelerators free  power [##########..........] 25.0/50.0 kW (50%)"
    # zeta is B (alpha A): 2 of zeta; 2.5 used shared by alpha and zeta -> 3 marks in turn
    assert lines[2] == "    n00[BB··] n01[ABA·] n02[----] n03[xxxx]"
    assert "tenants: A alpha, B zeta" in lines
    # A suspect node's free accelerators are drawn as a cordoned one's: the legend said "cordoned".
    assert lines[-1].endswith("· free, ! failed, - takes nothing new (node cordoned or suspect), x node down")


def test_failed_accelerators_are_marked_and_not_free() -> None:
    """They take no shards: the map drew them free and counted them in the rack's free (found in review)."""
    topology, nodes = cluster()
    nodes[0].failed_accelerators.add(index=0, reason="ECC")  # zeta's 2 are on the others
    nodes[2].failed_accelerators.add(index=3, reason="")     # cordoned: marked failed too
    nodes.append(admin_pb2.Node(id="rack-00-n04", rack="rack-00", accelerators=4, state=READY,
                                failed_accelerators=[common_pb2.AcceleratorFault(index=1), common_pb2.AcceleratorFault(
                                    index=9)]))  # one it does not have: not counted
    lines = render_map(topology, nodes).splitlines()
    assert lines[1].startswith("  rack rack-00  5 nodes, 5.5 accelerators free  ")  # 1 + 1.5 + 3, of ready nodes
    assert lines[2] == "    n00[!BB·] n01[ABA·] n02[---!] n03[xxxx] n04[·!··]"


def test_a_node_named_after_another_rack_shows_its_whole_id() -> None:
    topology, nodes = cluster()
    nodes[3] = admin_pb2.Node(id="rack-01-n00", rack="rack-00", accelerators=4, state=READY)  # moved here
    nodes.append(admin_pb2.Node(id="gpu-host-7", rack="rack-00", accelerators=4, state=READY))
    assert render_map(topology, nodes).splitlines()[2] == \
        "    gpu-host-7[····] n00[BB··] n01[ABA·] n02[----] rack-01-n00[····]"


def test_colour_is_markup_only_when_asked() -> None:
    topology, nodes = cluster()
    coloured = render_map(topology, nodes, colour=True)
    assert "[cyan]A[/]" in coloured and "\\[" in coloured
    assert "[cyan]" not in render_map(topology, nodes)


def test_power_bar_without_a_budget() -> None:
    assert power_bar(1500, None) == "1.5 kW (no budget)"

"""`CapacityIndex` answers what a scan of every node would: the largest node, the most HBM, the
most power one node's shards could ever draw (its rack's or row's budget less its idle power), and
the largest rack, row and zone of the nodes of some accelerator models in some zones, ties to the
smallest id. The index folds each node in with inline comparisons (a rebuild loops over every
node); this compares it with the plain scan on random clusters, ties and nodes that do not say
their HBM included."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.usecases.capacity import LOCALITIES, CapacityIndex, NodeCapacity, PowerRoom

MODELS = ("maia-100", "maia-200")
ZONES = ("z0", "z1", "z2")

nodes_strategy = st.lists(
    st.builds(
        NodeCapacity,
        node_id=st.sampled_from([f"n{i:02d}" for i in range(30)]),
        rack=st.sampled_from(["r0", "r1", "r2", "r3"]),
        row=st.sampled_from(["w0", "w1"]),
        zone=st.sampled_from(ZONES),
        accelerator_model=st.sampled_from(MODELS),
        accelerators=st.sampled_from([0, 1, 2, 4, 4, 8]),  # repeats: ties between nodes
        hbm_gib=st.sampled_from([None, 32.0, 64.0, 64.0, 96.0]),
        idle_power_w=st.sampled_from([0.0, 400.0, 600.0]),
        rack_budget_w=st.sampled_from([None, 5000.0, 5200.0, 9000.0, 9000.0]),
        row_budget_w=st.sampled_from([None, 5000.0, 20000.0]),
    ),
    max_size=25,
    unique_by=lambda n: n.node_id,
)
selections = st.tuples(st.none() | st.sets(st.sampled_from(MODELS), min_size=1),
                       st.none() | st.sets(st.sampled_from(ZONES), min_size=1))


def _best(amounts: dict[str, Any]) -> tuple[Any, str]:
    """The largest amount, on a tie the smallest id, by sorting everything."""
    return sorted(((amount, name) for name, amount in amounts.items()), key=lambda x: (-x[0], x[1]))[0]


def _scanned(nodes: list[NodeCapacity], models: set[str] | None, zones: set[str] | None) -> dict[str, Any] | None:
    picked = [n for n in nodes if (models is None or n.accelerator_model in models) and (zones is None or n.zone in zones)]
    if not picked:
        return None
    answers: dict[str, Any] = {
        "node": _best({n.node_id: n.accelerators for n in picked}),
        "hbm": None if any(n.hbm_gib is None for n in picked) else _best({n.node_id: n.hbm_gib for n in picked}),
        "power": _most_power(picked),
    }
    for locality in LOCALITIES:
        held: dict[str, int] = {}
        for n in picked:
            domain = getattr(n, locality)
            held[domain] = held.get(domain, 0) + n.accelerators
        answers[locality] = _best(held)
    return answers


def _most_power(nodes: list[NodeCapacity]) -> tuple[float, str, str, str]:
    """(watts, node, code, domain) of the most any node's shards could draw; (inf, "", "", "") when
    some node's rack and row have no budget."""
    rooms = []
    for n in nodes:
        rack = math.inf if n.rack_budget_w is None else n.rack_budget_w
        row = math.inf if n.row_budget_w is None else n.row_budget_w
        if rack == row == math.inf:
            return (math.inf, "", "", "")
        binding = ("POWER_RACK", n.rack) if rack <= row else ("POWER_ROW", n.row)
        rooms.append((min(rack, row) - n.idle_power_w, n.node_id, *binding))
    return sorted(rooms, key=lambda r: (-r[0], r[1]))[0]


def _power(room: PowerRoom) -> tuple[float, str, str, str]:
    return (room.watts, room.node_id, room.code, room.domain)


def _indexed(index: CapacityIndex, models: set[str] | None, zones: set[str] | None) -> dict[str, Any] | None:
    view = index.select(models, zones)
    if view.empty():
        return None
    return {"node": view.largest_node(), "hbm": view.most_hbm(), "power": _power(view.most_power()),
            **{locality: view.largest_domain(locality) for locality in LOCALITIES}}


@settings(max_examples=300)
@given(nodes=nodes_strategy, selection=selections)
def test_the_index_answers_what_a_scan_of_every_node_would(nodes: list[NodeCapacity],
                                                           selection: tuple[set[str] | None, set[str] | None]) -> None:
    models, zones = selection
    index = CapacityIndex(nodes)
    assert index.empty() == (not nodes)
    assert _indexed(index, models, zones) == _scanned(nodes, models, zones)
    view = index.select(models, zones)
    if not view.empty():
        assert view.largest_domain("node") == view.largest_node()

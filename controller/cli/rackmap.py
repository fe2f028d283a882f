"""`maiactl map` rendering: rows and racks drawn as text, nodes as cells, one letter per tenant.

Each node is a cell of its accelerators: a tenant's letter for an accelerator in use (a node
shared by several tenants shows their letters in turn), `·` for a free one, `!` for one its
agent says failed (it takes no shards), `x` for a node that is down and `-` for the free
accelerators of one that takes nothing new (cordoned, or suspect: its agent silent or flapping).
Each rack and row shows its power used against its budget as a bar. Pure: returns text (with
rich markup for colour when asked), so it is tested without a terminal.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from string import ascii_uppercase

from controller.cli.tables import fmt_used_of
from controller.cli.vocab import node_state_word
from maia.v1 import admin_pb2

COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta",
           "bright_green", "bright_yellow", "bright_blue", "bright_red")
BAR_WIDTH = 20
CELLS_PER_LINE = 8
FREE, DOWN, CORDONED, FAILED = "·", "x", "-", "!"


def tenant_letters(nodes: Sequence[admin_pb2.Node]) -> dict[str, str]:
    """Each tenant seen on a node, in name order, gets A, B, C, ... (then a, b, c, ...)."""
    names = sorted({t for n in nodes for t in n.tenants})
    letters = ascii_uppercase + ascii_uppercase.lower()
    return {name: letters[i % len(letters)] for i, name in enumerate(names)}


def power_bar(used: float, budget: float | None) -> str:
    if not budget:
        return f"{fmt_used_of(used, None, 'kW')} (no budget)"
    filled = min(BAR_WIDTH, round(BAR_WIDTH * used / budget))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fmt_used_of(used, budget, 'kW')}"


def node_cell(node: admin_pb2.Node, letters: dict[str, str], colour: dict[str, str] | None) -> str:
    used = min(node.accelerators, math.ceil(node.accelerators_used - 1e-9)) if node.accelerators_used else 0
    state = node_state_word(node.state)
    owners = [letters[t] for t in node.tenants] or ["?"]
    failed = failed_indices(node)
    marks = []
    held = 0  # the accelerators drawn in use so far
    for i in range(node.accelerators):
        if state == "down":
            marks.append(DOWN)
        elif i in failed:  # in use or free, counted so: what is used is on the others
            marks.append(FAILED)
        elif held < used:
            letter = owners[held % len(owners)]
            marks.append(f"[{colour[letter]}]{letter}[/]" if colour else letter)
            held += 1
        else:
            marks.append(CORDONED if state in ("cordoned", "suspect") else FREE)
    bracket = "\\[" if colour else "["  # rich markup reads a bare '[' as a tag
    return f"{node_label(node)}{bracket}{''.join(marks)}]"


def failed_indices(node: admin_pb2.Node) -> set[int]:
    """The node's accelerators its agent says failed (those it has)."""
    return {f.index for f in node.failed_accelerators if f.index < node.accelerators}


def node_label(node: admin_pb2.Node) -> str:
    """A node's id without its rack's (`rack-00-n03` in rack-00: `n03`); whole when it does not
    start with it: a node named after another rack (moved, or registered into another one) would
    otherwise read as that rack's own node of that name."""
    short = node.id.removeprefix(f"{node.rack}-")
    return short if short != node.id and short else node.id


def render_map(topology: admin_pb2.Topology, nodes: Sequence[admin_pb2.Node], colour: bool = False) -> str:
    """The map as plain text, or as rich markup (`colour`) for a terminal."""
    from rich.markup import escape

    esc = escape if colour else (lambda text: text)
    letters = tenant_letters(nodes)
    palette = {letter: COLOURS[i % len(COLOURS)] for i, letter in enumerate(letters.values())} if colour else None
    by_rack: dict[str, list[admin_pb2.Node]] = defaultdict(list)
    for n in sorted(nodes, key=lambda n: n.id):
        by_rack[n.rack].append(n)
    racks_of_row: dict[str, list[admin_pb2.Rack]] = defaultdict(list)
    for rack in sorted(topology.racks, key=lambda r: r.id):
        racks_of_row[rack.row].append(rack)
    lines: list[str] = []
    for row in sorted(topology.rows, key=lambda r: r.id):
        budget = row.power_budget_w if row.HasField("power_budget_w") else None
        lines.append(esc(f"row {row.id} (zone {row.zone})  power {power_bar(row.power_used_w, budget)}"))
        for rack in racks_of_row.get(row.id, []):
            rack_nodes = by_rack.get(rack.id, [])
            free = sum(max(0.0, n.accelerators - len(failed_indices(n)) - n.accelerators_used)
                       for n in rack_nodes if node_state_word(n.state) == "ready")
            budget = rack.power_budget_w if rack.HasField("power_budget_w") else None
            lines.append(esc(f"  rack {rack.id}  {len(rack_nodes)} nodes, {free:g} accelerators free  "
                             f"power {power_bar(rack.power_used_w, budget)}"))
            cells = [node_cell(n, letters, palette) for n in rack_nodes]
            for start in range(0, len(cells), CELLS_PER_LINE):
                lines.append("    " + " ".join(cells[start:start + CELLS_PER_LINE]))
        lines.append("")
    if letters:
        legend = ", ".join(f"[{palette[l]}]{l}[/] {esc(t)}" if palette else f"{l} {t}" for t, l in letters.items())
        lines.append(f"tenants: {legend}")
    lines.append(f"cells: one mark per accelerator: a tenant's letter in use (a node shared by several tenants "
                 f"shows their letters in turn, not which accelerator is whose), {FREE} free, {FAILED} failed, "
                 f"{CORDONED} takes nothing new (node cordoned or suspect), {DOWN} node down")
    return "\n".join(lines)

"""Re-check a set of committed placements against the rules that keep tenants apart.

The solver never emits a placement that breaks these rules; this check exists for what the
solver did not write: a row edited by hand, a bug elsewhere, a restore from an old backup. The
controller's isolation watchdog runs it continuously over the stored placements.

Rules checked (each reported with the tenants and the place involved):
- ACCELERATOR: a whole-accelerator shard shares its accelerator, two tenants share one, or the
  fractions on one exceed 1000 milli;
- HBM, CPU, MEMORY: an accelerator's HBM or a node's CPU / memory is over-committed;
- NODE_SHARDS: a node holds more shards than its `max_shards` (an interchange extension: its
  agent could not list them all);
- ISOLATION: a dedicated_node (dedicated_rack) tenant shares its node (rack) with another tenant;
- EXCLUSION: two tenants that exclude each other share a rack;
- ZONE: a tenant's shard runs outside its allowed zones;
- REFERENCE: a placement names an unknown deployment or node, or an accelerator the node lacks
  (such a placement is reported and left out of the other checks).
Gangs, locality, spread, models, power budgets and quotas are the solver's business (a
violation there costs performance or money, not isolation) and are not re-checked here; the
plan applier's re-check (controller/store/recheck.py) also checks rack and row power budgets
(`find_power_violations`), and names the scopes a shard can be blamed in
(`PlacementScopes`).

One pass over the placements with dictionaries: linear in the number of placed shards.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.model import Deployment, Node, Problem

# Float sums (HBM) are compared with this slack.
EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str                   # ACCELERATOR, HBM, CPU, MEMORY, NODE_SHARDS, ISOLATION, EXCLUSION, ZONE, REFERENCE
    scope: str                  # where: "node n1", "node n1[2]", "rack r1"
    tenants: tuple[str, ...]    # the tenants involved, sorted
    message: str

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """What identifies one violation across checks (its message may carry changing numbers)."""
        return self.rule, self.scope, self.tenants


@dataclass(slots=True)
class _Use:
    tenant: str
    deployment: str
    whole: bool
    milli: int
    hbm: float


def find_violations(problem: Problem) -> list[Violation]:
    """Every rule broken by `problem.placements`, in a stable order (rule, scope)."""
    deployments = {d.id: d for d in problem.deployments}
    nodes = {n.id: n for n in problem.nodes}
    rack_row = {r.id: r.row for r in problem.racks}
    row_zone = {r.id: r.zone for r in problem.rows}
    tenants = {t.id: t for t in problem.tenants}

    first: dict[tuple[str, int], _Use] = {}          # the common case: one shard per accelerator
    shared: dict[tuple[str, int], list[_Use]] = {}   # accelerators with more than one shard
    cpu: dict[str, int] = defaultdict(int)
    memory: dict[str, int] = defaultdict(int)
    on_node: dict[str, set[str]] = defaultdict(set)
    on_rack: dict[str, set[str]] = defaultdict(set)
    found: list[Violation] = []
    for p in problem.placements:
        node, dep = nodes.get(p.node), deployments.get(p.deployment)
        if dep is None or node is None or any(not 0 <= i < node.accelerators for i in p.accelerator_indices):
            found.append(Violation("REFERENCE", f"node {p.node}", (dep.tenant if dep else "",),
                                   f"{p.deployment} replica {p.replica} shard {p.shard} names accelerators "
                                   f"{list(p.accelerator_indices)} of node {p.node}, which "
                                   f"{'has ' + str(node.accelerators) if node else 'does not exist'}"))
            continue
        tenant, shard = dep.tenant, dep.shard
        whole = not shard.fractional
        use = _Use(tenant, p.deployment, whole, 1000 if whole else (p.accelerator_milli or shard.accelerator_milli),
                   shard.hbm_gib)
        for index in p.accelerator_indices:
            key = (p.node, index)
            other = first.get(key)
            if other is None:
                first[key] = use
            elif key in shared:
                shared[key].append(use)
            else:
                shared[key] = [other, use]
        if p.accelerator_indices and node.hbm_gib is not None and shard.hbm_gib > node.hbm_gib + EPSILON:
            found.append(Violation("HBM", f"node {p.node}", (tenant,), f"{p.deployment} needs {shard.hbm_gib:g} GiB "
                                   f"HBM per accelerator on {p.node}, which has {node.hbm_gib:g}"))
        cpu[p.node] += shard.cpu_milli
        memory[p.node] += shard.memory_mib
        on_node[p.node].add(tenant)
        on_rack[node.rack].add(tenant)
        allowed = tenants[tenant].zones if tenant in tenants else None
        if allowed is not None:
            zone = row_zone.get(rack_row.get(node.rack, ""), "")
            if zone not in allowed:
                found.append(Violation("ZONE", f"node {p.node}", (tenant,),
                                       f"{p.deployment} replica {p.replica} shard {p.shard} runs on {p.node} in "
                                       f"zone {zone}; tenant {tenant} may run only in {', '.join(allowed) or 'no zone'}"))

    for (node_id, index), users in shared.items():
        scope = f"node {node_id}[{index}]"
        who = tuple(sorted({u.tenant for u in users}))
        if any(u.whole for u in users):
            found.append(Violation("ACCELERATOR", scope, who, f"accelerator {node_id}[{index}] is held by a "
                                   f"whole-accelerator shard and shared with others: "
                                   f"{', '.join(sorted(u.deployment for u in users))}"))
        elif len(who) > 1:
            found.append(Violation("ACCELERATOR", scope, who,
                                   f"accelerator {node_id}[{index}] is shared by tenants {', '.join(who)}"))
        elif sum(u.milli for u in users) > 1000:
            found.append(Violation("ACCELERATOR", scope, who, f"accelerator {node_id}[{index}] holds "
                                   f"{sum(u.milli for u in users)} milli > 1000"))
        hbm, have = sum(u.hbm for u in users), nodes[node_id].hbm_gib
        if have is not None and hbm > have + EPSILON:
            found.append(Violation("HBM", scope, who, f"accelerator {node_id}[{index}] needs {hbm:g} GiB HBM, "
                                   f"it has {have:g}"))
    for rule, used, capacity in (("CPU", cpu, "cpu_milli"), ("MEMORY", memory, "memory_mib")):
        for node_id, amount in used.items():
            limit = getattr(nodes[node_id], capacity)
            if limit is not None and amount > limit:
                found.append(Violation(rule, f"node {node_id}", tuple(sorted(on_node[node_id])),
                                       f"node {node_id}: {amount} {capacity} placed > {limit}"))

    capped = {n.id: n.max_shards for n in problem.nodes if n.max_shards is not None}
    held = Counter(p.node for p in problem.placements
                   if p.node in capped and p.deployment in deployments) if capped else Counter()
    for node_id, count in held.items():
        limit = capped[node_id]
        if count > limit:
            found.append(Violation("NODE_SHARDS", f"node {node_id}", tuple(sorted(on_node[node_id])),
                                   f"node {node_id}: {count} shards placed > {limit} max_shards"))

    words: dict[tuple[str, str], dict[str, set[str]]] = {}  # built once a violation needs its words

    def holding(level: str, where: str, who: set[str]) -> str:
        if not words:
            words.update(_held(problem, deployments, nodes))
        return _holding(words.get((level, where), {}), who)

    for level, holders in (("node", on_node), ("rack", on_rack)):
        for where, present in holders.items():
            if len(present) < 2:
                continue
            for tenant in sorted(present):
                isolation = tenants[tenant].isolation if tenant in tenants else "shared"
                if isolation == f"dedicated_{level}":
                    others = sorted(present - {tenant})
                    found.append(Violation("ISOLATION", f"{level} {where}", tuple(sorted(present)),
                                           f"{level} {where} holds tenant {tenant} ({isolation}) together with "
                                           f"{', '.join(others)} ({holding(level, where, present)})"))
    for rack, present in on_rack.items():
        for a in sorted(present):
            excluded = set(tenants[a].excludes) if a in tenants else set()
            for b in sorted(present):
                b_excludes = tenants[b].excludes if b in tenants else ()
                if a < b and (b in excluded or a in b_excludes):
                    found.append(Violation("EXCLUSION", f"rack {rack}", (a, b),
                                           f"rack {rack} holds tenants {a} and {b}, which exclude each other "
                                           f"({holding('rack', rack, {a, b})})"))
    return sorted(found, key=lambda v: (v.rule, v.scope, v.tenants))


HELD_NAMED = 3  # of each tenant's shards in a violation's words, the first few


def _held(problem: Problem, deployments: dict[str, Deployment], nodes: dict[str, Node]
          ) -> dict[tuple[str, str], dict[str, set[str]]]:
    """What each tenant has on each node and in each rack, in the words of a violation: which of
    its deployments (in a rack: on which nodes) an operator must look at."""
    held: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for p in problem.placements:
        node, dep = nodes.get(p.node), deployments.get(p.deployment)
        if node is not None and dep is not None:
            held[("node", p.node)][dep.tenant].add(p.deployment)
            held[("rack", node.rack)][dep.tenant].add(f"{p.deployment} on {p.node}")
    return held


def _holding(held: dict[str, set[str]], tenants: set[str]) -> str:
    """"a: web on n1; b: api on n2, api on n3 and 4 more": what each tenant has there."""
    parts = []
    for tenant in sorted(tenants):
        names = sorted(held.get(tenant, ()))
        more = f" and {len(names) - HELD_NAMED} more" if len(names) > HELD_NAMED else ""
        parts.append(f"{tenant}: {', '.join(names[:HELD_NAMED])}{more}")
    return "; ".join(parts)


def find_power_violations(problem: Problem) -> list[Violation]:
    """Racks and rows drawing more than their power budget, in a stable order (scope).

    What the solver counts (`scheduler.state`): the idle power of every node that is not down,
    plus, per accelerator a shard holds, `power_w` x the milli it takes / 1000."""
    deployments = {d.id: d for d in problem.deployments}
    nodes = {n.id: n for n in problem.nodes}
    rack_row = {r.id: r.row for r in problem.racks}
    draw: dict[str, float] = defaultdict(float)          # by "rack R" / "row W"
    present: dict[str, set[str]] = defaultdict(set)
    for n in problem.nodes:
        if n.state != "down":
            draw[f"rack {n.rack}"] += n.idle_power_w
            draw[f"row {rack_row.get(n.rack, '')}"] += n.idle_power_w
    for p in problem.placements:
        node, dep = nodes.get(p.node), deployments.get(p.deployment)
        if node is None or dep is None:
            continue  # a REFERENCE violation of find_violations
        milli = 1000 if not dep.shard.fractional else (p.accelerator_milli or dep.shard.accelerator_milli)
        watts = dep.shard.power_w * milli * len(p.accelerator_indices) / 1000.0
        for scope in (f"rack {node.rack}", f"row {rack_row.get(node.rack, '')}"):
            draw[scope] += watts
            present[scope].add(dep.tenant)
    found = []
    for scope, budget in ([(f"rack {r.id}", r.power_budget_w) for r in problem.racks]
                          + [(f"row {r.id}", r.power_budget_w) for r in problem.rows]):
        if budget is not None and draw[scope] > budget + EPSILON:
            found.append(Violation("POWER", scope, tuple(sorted(present[scope])),
                                   f"{scope} draws {draw[scope]:g} W, over its budget of {budget:g} W"))
    return sorted(found, key=lambda v: v.scope)


class PlacementScopes:
    """Every scope a violation involving one shard may name: its node, each accelerator it
    holds, its rack and its row (spelled as `find_violations` and `find_power_violations` do)."""

    def __init__(self, problem: Problem) -> None:
        rack_row = {r.id: r.row for r in problem.racks}
        self._place = {n.id: (n.rack, rack_row.get(n.rack, "")) for n in problem.nodes}

    def of(self, node_id: str, indices: Iterable[int]) -> set[str]:
        scopes = {f"node {node_id}", *(f"node {node_id}[{i}]" for i in indices)}
        if node_id in self._place:
            rack, row = self._place[node_id]
            scopes |= {f"rack {rack}", f"row {row}"}
        return scopes

"""Re-check a set of committed placements against the rules that keep tenants apart (and, for a
solve's check of what it keeps, against the solver's other hard rules).

The solver never emits a placement that breaks these rules; this check exists for what the
solver did not write: a row edited by hand, a bug elsewhere, a restore from an old backup. The
controller's isolation watchdog runs it continuously over the stored placements.

Rules `find_violations` checks (each reported with the tenants and the place involved):
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
violation there costs performance or money, not isolation) and are not re-checked by
`find_violations`, whose every rule lies within one node or one rack: the isolation watchdog
judges a node or a rack at a time (controller/store/isolation_view.py) and the plan applier's
re-check the racks a plan lands on. That re-check (controller/store/recheck.py) also checks
rack and row power budgets (`find_power_violations`) and tenant quotas (its own `Quotas`), and
names the scopes a shard can be blamed in (`PlacementScopes`).

`find_workload_violations` judges the rules whose scope is a replica, a deployment or a tenant
(GANG, LOCALITY, SPREAD, QUOTA_ACCELERATORS, QUOTA_POWER) and the accelerator model, as the
solver's filters count them; `solve(check_kept=True)` runs it over the replicas a plan keeps
(`emit.kept_violations`). `min_replicas` is no rule of it: a plan never runs fewer replicas of a
deployment than its minimum (`emit.enforce_min_replicas`), and pending ones break nothing.

One pass over the placements with dictionaries: linear in the number of placed shards.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.model import Deployment, Node, Placement, Problem, ShardSpec

# Float sums (HBM) are compared with this slack.
EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str                   # ACCELERATOR, HBM, CPU, MEMORY, NODE_SHARDS, ISOLATION, EXCLUSION, ZONE, REFERENCE;
                                # POWER; GANG, LOCALITY, SPREAD, ACCELERATOR_MODEL, QUOTA_ACCELERATORS, QUOTA_POWER
    scope: str                  # where: "node n1", "node n1[2]", "rack r1", "deployment web replica 0", "tenant a"
    tenants: tuple[str, ...]    # the tenants involved, sorted
    message: str

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """What identifies one violation across checks (its message may carry changing numbers)."""
        return self.rule, self.scope, self.tenants


def _milli(p: Placement, shard: ShardSpec) -> int:
    """The milli a placement holds of each accelerator it names: all of it for a whole shard, a
    fraction's own (its placement's, or its shard's when the placement leaves it out)."""
    return (p.accelerator_milli or shard.accelerator_milli) if shard.fractional else 1000


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
        use = _Use(tenant, p.deployment, not shard.fractional, _milli(p, shard), shard.hbm_gib)
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
        watts = dep.shard.power_w * _milli(p, dep.shard) * len(p.accelerator_indices) / 1000.0
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


def find_workload_violations(problem: Problem) -> list[Violation]:
    """Every rule over a replica, a deployment or a tenant's total that `problem.placements`
    break, and every shard on a node of a model its deployment does not take, in a stable order
    (rule, scope). Counted as the solver's filters count them:
    - GANG: a replica holds some of its shards, not all (scope `deployment D replica R`);
    - LOCALITY: a replica's shards sit in more than one domain of its `locality` (the same scope);
    - SPREAD: more replicas of a deployment in one domain of its `spread` than `max_per_domain`,
      a replica counted in every domain one of its shards touches (`state.spread_count`; a
      `spread_group`'s other replicas do not count: the group's is a preference, not a rule);
    - ACCELERATOR_MODEL: a deployment's shards on a node whose model its `accelerator_models` leave
      out (one a node and deployment, naming the first shard and how many more);
    - QUOTA_ACCELERATORS, QUOTA_POWER: a tenant holding more than its `max_accelerators` (milli per
      accelerator held / 1000) or drawing more than its `max_power_w` (per accelerator held,
      power_w x that milli / 1000), scope `tenant T`, as `filters.TENANT_CAPS` count them.
    Placements naming an unknown deployment or node are left out (REFERENCE, `find_violations`)."""
    deployments = {d.id: d for d in problem.deployments}
    nodes = {n.id: n for n in problem.nodes}
    rack_row = {r.id: r.row for r in problem.racks}
    row_zone = {r.id: r.zone for r in problem.rows}

    def domain(node: Node, level: str) -> str:
        """The id of the node's `level` domain (node, rack, row or zone)."""
        if level in ("node", "rack"):
            return node.id if level == "node" else node.rack
        row = rack_row.get(node.rack, "")
        return row if level == "row" else row_zone.get(row, "")

    found: list[Violation] = []
    replicas: dict[tuple[str, int], list[tuple[Placement, Node]]] = defaultdict(list)
    milli: dict[str, int] = defaultdict(int)          # by tenant, as the solver's tenant_milli
    watts: dict[str, float] = defaultdict(float)      # by tenant, as its tenant_power
    wrong_model: dict[tuple[str, str], list[Placement]] = defaultdict(list)  # (node, deployment) -> its shards there
    for p in problem.placements:
        node, dep = nodes.get(p.node), deployments.get(p.deployment)
        if dep is None or node is None:
            continue
        replicas[(p.deployment, p.replica)].append((p, node))
        models = dep.shard.accelerator_models
        if models is not None and node.accelerator_model not in models:
            wrong_model[(p.node, p.deployment)].append(p)
        held = _milli(p, dep.shard) * len(p.accelerator_indices)
        milli[dep.tenant] += held
        watts[dep.tenant] += dep.shard.power_w * held / 1000.0

    for (node_id, dep_id), shards in wrong_model.items():  # one a deployment a node (a node re-modelled: not one a shard)
        node, dep = nodes[node_id], deployments[dep_id]
        model = f"model {node.accelerator_model}" if node.accelerator_model else "no declared model"
        first = shards[0]
        more = f" and {len(shards) - 1} more of its shards run" if len(shards) > 1 else " runs"
        needs = "|".join(dep.shard.accelerator_models or ()) or "no model (an empty list)"
        found.append(Violation("ACCELERATOR_MODEL", f"node {node_id}", (dep.tenant,),
                               f"{dep_id} replica {first.replica} shard {first.shard}{more} on {node_id} "
                               f"({model}); it needs {needs}"))

    spread: Counter[tuple[str, str]] = Counter()  # (deployment, "rack r1") -> replicas touching it
    max_per_domain: dict[str, int] = {}
    for (dep_id, replica), shards in replicas.items():
        dep = deployments[dep_id]
        scope, who = f"deployment {dep_id} replica {replica}", (dep.tenant,)
        have = sorted({p.shard for p, _ in shards})
        if len(have) < dep.shards_per_replica:
            found.append(Violation("GANG", scope, who,
                                   f"{dep_id} replica {replica} runs shards {', '.join(map(str, have))} of its "
                                   f"{dep.shards_per_replica}: a replica runs all its shards or none"))
        if dep.locality != "none":
            places = sorted({domain(node, dep.locality) for _, node in shards})
            if len(places) > 1:
                found.append(Violation("LOCALITY", scope, who,
                                       f"{dep_id} replica {replica} runs in {dep.locality}s {', '.join(places)}; "
                                       f"its locality keeps it in one {dep.locality}"))
        if dep.spread is not None and dep.spread.domain != "none":
            level, max_per_domain[dep_id] = dep.spread.domain, dep.spread.max_per_domain
            spread.update((dep_id, f"{level} {place}") for place in {domain(node, level) for _, node in shards})
    for (dep_id, scope), count in spread.items():
        if count > max_per_domain[dep_id]:
            found.append(Violation("SPREAD", scope, (deployments[dep_id].tenant,),
                                   f"{scope} holds {count} replicas of {dep_id} > {max_per_domain[dep_id]}, "
                                   f"its spread's max_per_domain"))

    for tenant in problem.tenants:
        cap = tenant.max_accelerators
        if cap is not None and milli[tenant.id] > cap * 1000 + EPSILON:
            found.append(Violation("QUOTA_ACCELERATORS", f"tenant {tenant.id}", (tenant.id,),
                                   f"tenant {tenant.id} holds {milli[tenant.id] / 1000:g} accelerators > "
                                   f"{cap:g} max_accelerators"))
        cap = tenant.max_power_w
        if cap is not None and watts[tenant.id] > cap + EPSILON:
            found.append(Violation("QUOTA_POWER", f"tenant {tenant.id}", (tenant.id,),
                                   f"tenant {tenant.id} draws {watts[tenant.id]:g} W > {cap:g} W max_power_w"))
    return sorted(found, key=lambda v: (v.rule, v.scope, v.tenants))


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

"""The plan applier's check: does each replica a plan lands still fit the committed state?

A plan is solved from a snapshot, without a lock; by the time it commits, other commits may
have landed (another controller's plan, a node gone down, a cordon, a tenant's new contract).
Before anything is written, every replica the plan places or moves is checked against the
state it lands on, with the scheduler's own rules (`scheduler.violations`: accelerators, HBM,
CPU and memory, isolation, exclusions, zones, references, rack and row power) plus those the
solver applies as filters: new shards go only to ready nodes, and a tenant stays within its
quotas. A replica that no longer fits
is not written and goes back to the queue; the rest of the plan commits.

Blame: a violation the plan's replicas did not create or worsen (present, with the same
numbers, in the committed state without them) blames nobody. A new one is pinned on the
landing replicas with a new shard in its scope (node, accelerator, rack or row) that break a
rule there on their own; if none does alone, on all of them (they break it together). The
check repeats without the blamed replicas until nothing new is found: a replica that lands
beside one that was just turned away is judged without it. Only the racks the landing replicas
touch are judged in full (every rule's scope but a row's power budget and a tenant's quota
lies within one rack), and only the nodes they land on when no rule of a rack's scope can be
broken there (`rack_rules_apply`: no rack power budget there, no tenant dedicated to racks or
excluding another; every other rule lies within one node), so a small plan costs little on a
large cluster; row power budgets are judged over the whole row (`RowPower`), tenant quotas
(max_accelerators, max_power_w, as the solver's QUOTA_* filters count them) over all the shards
of a landing replica's tenant (`Quotas`). A scoped commit passes what it did not read as totals
(`Unread`).

Pure (no database; `plans.check._recheck` runs a small one on the event loop, a large one in a worker
thread: `plans.check.RECHECK_ON_LOOP_MAX`). `plans.commit_plan` calls it with shard keys
whose deployment part names the spec the shard runs (a deployment's revision, see
`plans.check._spec_doc`), so outgoing replicas of a rolling update are judged by their own spec.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler import problem_from_dict
from scheduler.model import Placement, Problem
from scheduler.violations import EPSILON, PlacementScopes, Violation, find_power_violations, find_violations

from controller.store.snapshot import ShardKey, Where

ReplicaKey = tuple[str, int]  # (deployment, replica)


def recheck(
    doc: Mapping[str, Any], committed: Mapping[ShardKey, Where], landing: Mapping[ReplicaKey, Mapping[int, Where]],
    unread: Unread | None = None,
) -> dict[ReplicaKey, tuple[str, ...]]:
    """The landing replicas that no longer fit, each with why ("RULE: message" of each violation).

    `doc`: the committed problem document (its placements are ignored; all the nodes of the
    rows the landing replicas touch, or the nodes they touch alone when no rule of a rack's
    scope applies there and no row there has a power budget); `committed`: the committed shards
    once the plan's accepted removals are applied: every one, or (a scoped commit) at least
    those on the racks the landing replicas touch (on the nodes they land on, when no rule of a
    rack's scope applies there, no row there has a power budget and no landing tenant a quota:
    `judged_nodes`) and those of the landing replicas' deployments, with `unread` the totals of
    the others that the rules need; `landing`: each replica the plan places or moves, with all
    its shards as the plan wants them.
    """
    nodes = {n["id"]: n for n in doc["nodes"]}
    rejected: dict[ReplicaKey, tuple[str, ...]] = {}
    fresh: dict[ReplicaKey, dict[int, Where]] = {}  # per replica: only the shards that move or are new
    for (name, replica), shards in landing.items():
        fresh[(name, replica)] = {s: w for s, w in shards.items() if committed.get((name, replica, s)) != w}
        for where in fresh[(name, replica)].values():
            state = nodes[where[0]].get("state", "ready") if where[0] in nodes else "gone"
            if state != "ready":
                rejected[(name, replica)] = (f"node {where[0]} is {state}: it takes no new shards",)
                break
            failed = sorted(set(where[1]) & set(nodes[where[0]].get("unhealthy_accelerators", ())))
            if failed:  # failed since the plan's snapshot (usecases/faults.py)
                rejected[(name, replica)] = (f"accelerators {failed} of node {where[0]} failed: they take no shards",)
                break
    candidates = {rk: shards for rk, shards in landing.items() if rk not in rejected}
    if not candidates:
        return rejected

    unread = unread or Unread()
    scope_nodes = {w[0] for rk in candidates for w in fresh[rk].values()}
    problem = _neighbourhood(doc, scope_nodes, committed, {name for name, _ in candidates})
    quotas = Quotas(doc, committed, unread.tenants, {name for name, _ in candidates})
    rows = RowPower(doc, committed, unread.rows, problem)
    scopes_of = PlacementScopes(problem)
    scopes = {rk: set().union(*(scopes_of.of(w[0], w[1]) for w in fresh[rk].values()), quotas.scopes(rk[0]))
              for rk in candidates}
    local = {n.id for n in problem.nodes}

    def violations(landing: Mapping[ReplicaKey, Mapping[int, Where]]) -> list[Violation]:
        placements = _placements(committed, landing, local)
        return _violations(problem, placements) + rows.violations(placements) + quotas.violations(landing)

    baseline: set[Violation] | None = None
    while candidates:
        found = violations(candidates)
        if not found:
            break
        if baseline is None:
            baseline = set(violations({}))
        new = [v for v in found if v not in baseline]
        suspects = {rk for rk in candidates if any(v.scope in scopes[rk] for v in new)}
        if not suspects:
            break
        blamed: dict[ReplicaKey, list[str]] = {}
        for rk in sorted(suspects):  # each on its own first: a replica that adds nothing is not to blame
            alone = violations({rk: candidates[rk]})
            why = [f"{v.rule}: {v.message}" for v in alone if v not in baseline and v.scope in scopes[rk]]
            if why:
                blamed[rk] = why
        if not blamed:  # they break a rule only together: all of them
            blamed = {rk: [f"{v.rule}: {v.message}" for v in new if v.scope in scopes[rk]] for rk in suspects}
        for rk, why in blamed.items():
            rejected[rk] = tuple(why)
            del candidates[rk]
    return rejected


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """What a tenant's shards hold against its quotas: accelerators in milli, power under load."""

    milli: float = 0.0
    power_w: float = 0.0

    def __add__(self, other: TenantUsage) -> TenantUsage:
        return TenantUsage(self.milli + other.milli, self.power_w + other.power_w)

    def __sub__(self, other: TenantUsage) -> TenantUsage:
        return TenantUsage(self.milli - other.milli, self.power_w - other.power_w)


def shard_usage(shard: Mapping[str, Any], where: Where) -> TenantUsage:
    """What one placed shard (its interchange `shard` spec) holds, as the solver counts it
    (`scheduler.state`): milli per accelerator it holds, power_w x that milli / 1000 each."""
    accelerators, spec_milli = shard.get("accelerators", 1), shard.get("accelerator_milli", 1000)
    milli = (where[2] or spec_milli) if accelerators == 1 and spec_milli < 1000 else 1000
    held = milli * len(where[1])
    return TenantUsage(held, shard.get("power_w", 0.0) * held / 1000.0)


@dataclass(frozen=True)
class Unread:
    """What a scoped commit did not read, as the totals the rules need: per tenant with a quota,
    what its other shards hold; per row the landing replicas touch (its other racks), what the
    shards there draw under load, per tenant."""

    tenants: Mapping[str, TenantUsage] = field(default_factory=dict)
    rows: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class RowPower:
    """The power budgets of the rows around the judged nodes: the one rule of a wider scope than
    the racks judged but a quota's. A row draws the idle power of its nodes that are not down
    plus the load of every shard on it, the way `find_power_violations` counts: the shards on
    the judged nodes (the placements judged), the other committed ones (`committed`) and what
    was not read (`unread`)."""

    def __init__(self, doc: Mapping[str, Any], committed: Mapping[ShardKey, Where],
                 unread: Mapping[str, Mapping[str, float]], problem: Problem) -> None:
        judged = {n.id for n in problem.nodes}
        rows = {r.row for r in problem.racks}
        self._budgets = {r["id"]: float(r["power_budget_w"]) for r in doc.get("rows", ())
                         if r["id"] in rows and r.get("power_budget_w") is not None}
        rack_row = {r["id"]: r["row"] for r in doc.get("racks", ()) if r["row"] in self._budgets}
        node_row = {n["id"]: rack_row[n["rack"]] for n in doc["nodes"] if n["rack"] in rack_row}
        specs = {d["id"]: d for d in doc.get("deployments", ())}
        self._draw = {row: 0.0 for row in self._budgets}
        self._present: dict[str, set[str]] = {row: set() for row in self._budgets}
        for n in doc["nodes"]:
            if n["id"] in node_row and n.get("state", "ready") != "down":
                self._draw[node_row[n["id"]]] += n.get("idle_power_w", 0.0)
        outside = {n["id"] for n in doc["nodes"] if n["id"] in node_row and n["id"] not in judged}
        for key, where in committed.items():
            if where[0] in outside and key[0] in specs:
                row = node_row[where[0]]
                self._draw[row] += shard_usage(specs[key[0]]["shard"], where).power_w
                self._present[row].add(specs[key[0]]["tenant"])
        for row, by_tenant in unread.items():
            if row in self._draw:
                self._draw[row] += sum(by_tenant.values())
                self._present[row].update(by_tenant)
        self._node_row = {n.id: node_row[n.id] for n in problem.nodes if n.id in node_row}
        self._deployments = {d.id: d for d in problem.deployments}

    def violations(self, placements: tuple[Placement, ...]) -> list[Violation]:
        """The rows over budget with `placements` (on the judged racks) added."""
        if not self._budgets:
            return []
        draw, present = dict(self._draw), {row: set(tenants) for row, tenants in self._present.items()}
        for p in placements:
            row, dep = self._node_row.get(p.node), self._deployments.get(p.deployment)
            if row is None or dep is None:
                continue
            milli = 1000 if not dep.shard.fractional else (p.accelerator_milli or dep.shard.accelerator_milli)
            draw[row] += dep.shard.power_w * milli * len(p.accelerator_indices) / 1000.0
            present[row].add(dep.tenant)
        return [Violation("POWER", f"row {row}", tuple(sorted(present[row])),
                          f"row {row} draws {draw[row]:g} W, over its budget of {budget:g} W")
                for row, budget in sorted(self._budgets.items()) if draw[row] > budget + EPSILON]


def capped(tenant: Mapping[str, Any]) -> bool:
    """Whether a tenant (its document) has a quota the re-check judges (`Quotas`)."""
    return tenant.get("max_accelerators") is not None or tenant.get("max_power_w") is not None


class Quotas:
    """The tenant quotas (max_accelerators, max_power_w) of the landing replicas' tenants: the
    only rules whose scope, a tenant, is not within one row. What the tenant holds is summed
    over every shard `committed` names plus `elsewhere` (its shards a scoped commit did not read)."""

    def __init__(self, doc: Mapping[str, Any], committed: Mapping[ShardKey, Where],
                 elsewhere: Mapping[str, TenantUsage], landing: set[str]) -> None:
        self._specs = {d["id"]: d for d in doc.get("deployments", ())}
        self._caps = {t["id"]: t for t in doc.get("tenants", ()) if capped(t)}
        watched = {self.tenant(name) for name in landing} & set(self._caps)
        self._held = {t: elsewhere.get(t, TenantUsage()) for t in watched}
        self._replicas: dict[ReplicaKey, TenantUsage] = defaultdict(TenantUsage)  # what each replica holds
        for key, where in committed.items():
            tenant = self.tenant(key[0])
            if tenant in self._held:
                usage = shard_usage(self._specs[key[0]]["shard"], where)
                self._held[tenant] += usage
                self._replicas[key[:2]] += usage

    def tenant(self, spec_id: str) -> str | None:
        spec = self._specs.get(spec_id)
        return spec["tenant"] if spec is not None else None

    def scopes(self, spec_id: str) -> set[str]:
        tenant = self.tenant(spec_id)
        return {f"tenant {tenant}"} if tenant in self._held else set()

    def violations(self, landing: Mapping[ReplicaKey, Mapping[int, Where]]) -> list[Violation]:
        """Quotas broken once `landing` replaces what its replicas hold in `committed`."""
        held = dict(self._held)
        for (name, replica), shards in landing.items():
            tenant = self.tenant(name)
            if tenant not in held:
                continue
            held[tenant] -= self._replicas.get((name, replica), TenantUsage())
            for where in shards.values():
                held[tenant] += shard_usage(self._specs[name]["shard"], where)
        found = []
        for tenant, usage in sorted(held.items()):
            cap = self._caps[tenant]
            limit = cap.get("max_accelerators")
            if limit is not None and usage.milli > limit * 1000 + EPSILON:
                found.append(Violation("QUOTA_ACCELERATORS", f"tenant {tenant}", (tenant,),
                                       f"tenant {tenant} holds {usage.milli / 1000:g} accelerators > "
                                       f"{limit:g} max_accelerators"))
            limit = cap.get("max_power_w")
            if limit is not None and usage.power_w > limit + EPSILON:
                found.append(Violation("QUOTA_POWER", f"tenant {tenant}", (tenant,),
                                       f"tenant {tenant} draws {usage.power_w:g} W > {limit:g} W max_power_w"))
        return found


def _violations(problem: Problem, placements: tuple[Placement, ...]) -> list[Violation]:
    state = replace(problem, placements=placements)
    return find_violations(state) + find_power_violations(state)


def _placements(committed: Mapping[ShardKey, Where], landing: Mapping[ReplicaKey, Mapping[int, Where]],
                local: set[str]) -> tuple[Placement, ...]:
    """The committed shards with the landing replicas' shards put where the plan wants them,
    on the `local` nodes."""
    shards = {key: where for key, where in committed.items() if key[:2] not in landing}
    for (name, replica), wanted in landing.items():
        shards.update(((name, replica, s), w) for s, w in wanted.items())
    return tuple(Placement(k[0], k[1], k[2], w[0], w[1], w[2]) for k, w in shards.items() if w[0] in local)


def rack_rules_apply(racks: Iterable[Mapping[str, Any]], tenants: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a rule of a rack's scope may be broken on the racks `racks` (their documents):
    one has a power budget, or a tenant (of `tenants`: every one) is dedicated to racks
    (ISOLATION) or excludes another (EXCLUSION). When none may, every rule the re-check judges
    within a rack lies within one node: the replicas landing there are judged on the nodes they
    land on (`judged_nodes`)."""
    return (any(r.get("power_budget_w") is not None for r in racks)
            or any(t.get("isolation") == "dedicated_rack" or t.get("excludes") for t in tenants))


def judged_nodes(doc: Mapping[str, Any], touched: Collection[str]) -> list[dict[str, Any]]:
    """The nodes of `doc` (in its order) whose shards the re-check of replicas landing on the
    `touched` nodes judges in full: every node of the racks holding them, or the `touched` ones
    alone when no rule of those racks' scope applies (`rack_rules_apply`)."""
    node_rack = {n["id"]: n["rack"] for n in doc["nodes"] if n["id"] in touched}
    in_racks = set(node_rack.values())
    if rack_rules_apply((r for r in doc.get("racks", ()) if r["id"] in in_racks), doc.get("tenants", ())):
        return [n for n in doc["nodes"] if n["rack"] in in_racks]
    return [n for n in doc["nodes"] if n["id"] in node_rack]


def _neighbourhood(doc: Mapping[str, Any], touched: set[str], committed: Mapping[ShardKey, Where],
                   landing: set[str]) -> Problem:
    """The committed problem cut down to the nodes judged around the `touched` ones
    (`judged_nodes`), their racks, their rows without power budgets (`RowPower` judges those),
    the deployments with shards there or `landing` there (no placements) and their tenants
    (every tenant when one excludes another: it names others): what is converted is what is
    judged."""
    nodes = judged_nodes(doc, touched)
    local = {n["id"] for n in nodes}
    in_racks = {n["rack"] for n in nodes}
    racks = [r for r in doc.get("racks", ()) if r["id"] in in_racks]
    rows = {r["row"] for r in racks}
    used = landing | {key[0] for key, where in committed.items() if where[0] in local}
    deployments = [d for d in doc.get("deployments", ()) if d["id"] in used]
    tenants = doc.get("tenants", ())
    if not any(t.get("excludes") for t in tenants):
        present = {d["tenant"] for d in deployments}
        tenants = [t for t in tenants if t["id"] in present]
    part = {
        # Nominations are where new work is placed, not a rule a commit is judged by (they may
        # name nodes outside the part, which a problem may not).
        **{k: v for k, v in doc.items() if k not in ("placements", "options", "nominations")},
        "rows": [{k: v for k, v in r.items() if k != "power_budget_w"} for r in doc.get("rows", ()) if r["id"] in rows],
        "racks": racks,
        "nodes": nodes,
        "tenants": list(tenants),
        "deployments": deployments,
        "placements": [],
    }
    return problem_from_dict(part, validate=False)

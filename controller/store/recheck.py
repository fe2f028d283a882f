"""The plan applier's check: does each replica a plan lands still fit the committed state?

A plan is solved from a snapshot, without a lock; by the time it commits, other commits may
have landed (another controller's plan, a node gone down, a cordon, a tenant's new contract).
Before anything is written, every replica the plan places or moves is checked against the
state it lands on, with the scheduler's own rules (`scheduler.violations`: accelerators, HBM,
CPU and memory, isolation, exclusions, zones, references, rack and row power) plus one the
solver applies as a filter: new shards go only to ready nodes. A replica that no longer fits
is not written and goes back to the queue; the rest of the plan commits.

Blame: a violation the plan's replicas did not create or worsen (present, with the same
numbers, in the committed state without them) blames nobody. A new one is pinned on the
landing replicas with a new shard in its scope (node, accelerator, rack or row) that break a
rule there on their own; if none does alone, on all of them (they break it together). The
check repeats without the blamed replicas until nothing new is found: a replica that lands
beside one that was just turned away is judged without it. Only the rows the landing replicas touch are read
(every rule's scope lies within one row), so a small plan costs little on a large cluster.

Pure (no database, run it in a worker thread). `plans.commit_plan` calls it with shard keys
whose deployment part names the spec the shard runs (a deployment's revision, see
`plans._spec_doc`), so outgoing replicas of a rolling update are judged by their own spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from scheduler import problem_from_dict
from scheduler.model import Placement, Problem
from scheduler.violations import PlacementScopes, Violation, find_power_violations, find_violations

from controller.store.snapshot import ShardKey, Where

ReplicaKey = tuple[str, int]  # (deployment, replica)


def recheck(
    doc: Mapping[str, Any], committed: Mapping[ShardKey, Where], landing: Mapping[ReplicaKey, Mapping[int, Where]],
) -> dict[ReplicaKey, tuple[str, ...]]:
    """The landing replicas that no longer fit, each with why ("RULE: message" of each violation).

    `doc`: the committed problem document (its placements are ignored); `committed`: every
    committed shard once the plan's accepted removals are applied; `landing`: each replica the
    plan places or moves, with all its shards as the plan wants them.
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
    candidates = {rk: shards for rk, shards in landing.items() if rk not in rejected}
    if not candidates:
        return rejected

    scope_nodes = {w[0] for rk in candidates for w in fresh[rk].values()}
    problem = _neighbourhood(doc, scope_nodes, committed, {name for name, _ in candidates})
    scopes_of = PlacementScopes(problem)
    scopes = {rk: set().union(*(scopes_of.of(w[0], w[1]) for w in fresh[rk].values())) for rk in candidates}
    local = {n.id for n in problem.nodes}
    baseline: set[Violation] | None = None
    while candidates:
        found = _violations(problem, _placements(committed, candidates, local))
        if not found:
            break
        if baseline is None:
            baseline = set(_violations(problem, _placements(committed, {}, local)))
        new = [v for v in found if v not in baseline]
        suspects = {rk for rk in candidates if any(v.scope in scopes[rk] for v in new)}
        if not suspects:
            break
        blamed: dict[ReplicaKey, list[str]] = {}
        for rk in sorted(suspects):  # each on its own first: a replica that adds nothing is not to blame
            alone = _violations(problem, _placements(committed, {rk: candidates[rk]}, local))
            why = [f"{v.rule}: {v.message}" for v in alone if v not in baseline and v.scope in scopes[rk]]
            if why:
                blamed[rk] = why
        if not blamed:  # they break a rule only together: all of them
            blamed = {rk: [f"{v.rule}: {v.message}" for v in new if v.scope in scopes[rk]] for rk in suspects}
        for rk, why in blamed.items():
            rejected[rk] = tuple(why)
            del candidates[rk]
    return rejected


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


def _neighbourhood(doc: Mapping[str, Any], touched: set[str], committed: Mapping[ShardKey, Where],
                   landing: set[str]) -> Problem:
    """The committed problem cut down to the rows holding `touched` nodes and to the deployments
    with shards there or `landing` there (no placements): what is converted is what is judged."""
    rack_row = {r["id"]: r["row"] for r in doc.get("racks", ())}
    node_rack = {n["id"]: n["rack"] for n in doc["nodes"]}
    rows = {rack_row.get(node_rack[n]) for n in touched if n in node_rack}
    racks = [r for r in doc.get("racks", ()) if r["row"] in rows]
    in_racks = {r["id"] for r in racks}
    nodes = [n for n in doc["nodes"] if n["rack"] in in_racks]
    local = {n["id"] for n in nodes}
    used = landing | {key[0] for key, where in committed.items() if where[0] in local}
    part = {
        **{k: v for k, v in doc.items() if k not in ("placements", "options")},
        "rows": [r for r in doc.get("rows", ()) if r["id"] in rows],
        "racks": racks,
        "nodes": nodes,
        "deployments": [d for d in doc.get("deployments", ()) if d["id"] in used],
        "placements": [],
    }
    return problem_from_dict(part, validate=False)

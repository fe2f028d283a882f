"""The controller's seam to the solver and to the cluster snapshot.

Both the reconciler and dry runs do the same three things: read a snapshot of the cluster as an
interchange problem document, adjust it (options; a would-be deployment), and solve it in a
worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from controller.errors import InvalidArgument
from controller.store.snapshot import load_snapshot  # noqa: F401  (the snapshot half of this seam)
from controller.domain.values import DeploymentSpec, split_deployment_key
from scheduler import Deployment, Plan, Problem, ProblemError, deployment_to_dict, problem_from_dict
from scheduler.interchange import deployment_from_dict


def deployment_doc(spec: DeploymentSpec) -> dict[str, Any]:
    """A deployment in the interchange format (its id is its key, `TENANT/NAME`)."""
    return deployment_to_dict(Deployment(
        spec.key, spec.tenant, spec.replicas, spec.shards_per_replica, spec.shard,
        min_replicas=spec.min_replicas, locality=spec.locality, spread=spec.spread,
        priority=spec.priority, preemptible=spec.preemptible))


def spec_of_doc(doc: dict[str, Any]) -> DeploymentSpec:
    """The inverse of `deployment_doc`: an interchange deployment as the use cases' spec, read by
    the solver's own parser (the controller and the solver never read one document two ways)."""
    dep = deployment_from_dict(doc)
    return DeploymentSpec(
        name=split_deployment_key(dep.id)[1], tenant=dep.tenant, replicas=dep.replicas,
        shards_per_replica=dep.shards_per_replica, shard=dep.shard, min_replicas=dep.min_replicas,
        locality=dep.locality, spread=dep.spread, priority=dep.priority, preemptible=dep.preemptible)


def with_only(problem: dict[str, Any], key: str) -> dict[str, Any]:
    """The problem with one deployment (and its placements) left: to solve it on its own."""
    doc = dict(problem)
    doc["deployments"] = [d for d in problem.get("deployments", ()) if d["id"] == key]
    doc["placements"] = [p for p in problem.get("placements", ()) if p["deployment"] == key]
    return doc


def with_options(problem: dict[str, Any], *, time_limit_ms: int, mode: str = "batch",
                 allow_preemption: bool = False) -> dict[str, Any]:
    doc = dict(problem)
    doc["options"] = {**(problem.get("options") or {}), "mode": mode, "time_limit_ms": time_limit_ms}
    if allow_preemption:
        doc["options"]["allow_preemption"] = True
    return doc


# The reasons' word for a node a solve keeps new shards off (`with_cordoned`): it is ready, and
# "(cordoned)" sent operators looking for a cordon nobody made.
AVOIDED_CONDITION = "avoided: a replica failed there lately"


def with_cordoned(problem: dict[str, Any], nodes: Iterable[str]) -> dict[str, Any]:
    """The problem with the ready ones of `nodes` cordoned (they keep their shards, take no new
    ones), their `condition` saying why: replicas that failed there are placed elsewhere first."""
    avoid = set(nodes)
    if not avoid:
        return problem
    doc = dict(problem)
    doc["nodes"] = [avoided(n) if n["id"] in avoid and n.get("state", "ready") == "ready" else n
                    for n in problem.get("nodes", ())]
    return doc


def avoided(node: dict[str, Any]) -> dict[str, Any]:
    """A ready node's document as a solve that keeps new shards off it reads it."""
    return dict(node, state="cordoned", condition=AVOIDED_CONDITION)


def with_deployment(problem: dict[str, Any], spec: DeploymentSpec, *, replace: bool = False) -> dict[str, Any]:
    """The problem with `spec` added; with `replace`, instead of the deployment of that key. As
    an update would leave it: a change that does not roll (the replica count, min_replicas,
    priority, preemptible, or none) keeps the placements of the replicas it keeps, which go on
    running; one that rolls leaves the problem with all of them (its shards released first). A
    new document with new lists where they change; `problem`'s lists are not changed, and the
    documents in them are shared, not copied (the dry run's snapshot is its own: a deep copy of
    one of 4,096 nodes and 10,000 deployments held the API server's event loop 156-237 ms a dry
    run, measured)."""
    doc = dict(problem)
    deployments = list(problem.get("deployments", []))
    if replace:
        stored = next((d for d in deployments if d.get("id") == spec.key), None)
        kept = 0 if stored is None or spec.rolls_from(spec_of_doc(stored)) else spec.replicas
        deployments = [d for d in deployments if d.get("id") != spec.key]
        doc["placements"] = [p for p in problem.get("placements", [])
                             if p.get("deployment") != spec.key or p.get("replica", kept) < kept]
    doc["deployments"] = [*deployments, deployment_doc(spec)]
    return doc


def _parse(problem: dict[str, Any]) -> Problem:
    try:
        return problem_from_dict(problem)
    except ProblemError as exc:
        raise InvalidArgument(f"not a valid placement problem: {exc}") from exc


# `solve` is imported by the worker threads below, on a process's first solve, not with this
# module: the solver (OR-Tools, pandas) is most of a process's start, and a serving controller
# decides arrivals in its decide process (`controller.scheduling.decider`). Its own solves are
# dry runs and the reconciler's full passes; a full pass with no deployments (the first one of a
# new cluster's controller) needs no solver at all (`nothing_to_place`).

def nothing_to_place(problem: Problem) -> Plan:
    """The plan `solve` gives in online mode for a problem without deployments (so without
    placements): nothing placed, moved or preempted (tests/controller/test_planning_empty.py
    compares the two)."""
    return Plan(status="optimal", placements=(), stats={
        "pending_replicas": 0, "objective": 0, "nodes": len(problem.nodes), "time_limit_hit": False})


def _solve_sync(problem: dict[str, Any], time_limit_ms: int) -> Plan:
    from scheduler import solve

    return solve(_parse(problem), time_limit_ms=time_limit_ms)


def _solve_online_first_sync(problem: dict[str, Any], time_limit_ms: int) -> Plan:
    parsed = _parse(problem)
    if not parsed.deployments:
        return nothing_to_place(parsed)
    from scheduler import solve

    if parsed.options.mode != "batch":
        return solve(parsed, time_limit_ms=time_limit_ms)
    online = solve(replace(parsed, options=replace(parsed.options, mode="online")), time_limit_ms=time_limit_ms)
    if not online.unplaced:
        return online
    return solve(parsed, time_limit_ms=time_limit_ms)


async def solve_in_thread(problem: dict[str, Any], *, time_limit_ms: int) -> Plan:
    """Solve off the event loop; returns the scheduler's `Plan`."""
    return await asyncio.to_thread(_solve_sync, problem, time_limit_ms)


async def solve_online_first(problem: dict[str, Any], *, time_limit_ms: int) -> Plan:
    """What the reconciler solves with, off the event loop: a batch problem is first decided
    online (arrivals in order, each on the state the earlier ones left: milliseconds, the mode
    of the FGD numbers in docs/benchmarks.md); only when that leaves work unplaced is it solved
    again as asked (greedy, then CP-SAT within the time limit). A pass with everything placed
    never spends its time limit improving a plan that already places it all. A problem without
    deployments is not solved (`nothing_to_place`)."""
    return await asyncio.to_thread(_solve_online_first_sync, problem, time_limit_ms)

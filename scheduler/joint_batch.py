"""An online batch decided jointly: the batch's fractional shards paired onto accelerators by
one exact CP-SAT assignment.

Trying orders (`online_batch.batch_orders`) still decides each shard alone, on the state the
earlier ones left. Here the whole shards of the batch are placed first (greedy, biggest first),
then every fractional single-shard replica of the batch is assigned at once:

    data         items (pending fractional replicas) and candidate accelerators: per
                 deployment, the placer's best `CANDIDATE_NODES` nodes (`Placer.rank_nodes`):
                 their used accelerators with room, and `EMPTY_PER_NODE` empty ones
    variables    x[i, g]: item i on accelerator g (g on one of its deployment's best
                 `ITEM_NODES` nodes)
    constraints  an item at most once; per accelerator its free milli; per node CPU, memory,
                 the deployment's slots (`node_fit`) and the shards its `max_shards` leaves
    objective    most priority-weighted milli placed; then least cost: the FGD delta of each
                 item's node (its ranking's cost) + `PAIRING_WEIGHT` x the pairing value lost
                 on each accelerator, exact for several items sharing one
                 (room_value[free] - room_value[free left] - net values placed, `pairing.py`)

The answer is decoded shard by shard through the state (every per-node rule is checked again;
an item the check refuses, and any item CP-SAT left out, goes through the greedy placer after).
The search is deterministic (one worker, fixed seed, a deterministic-time budget; the
wall-clock limit is only a ceiling), and `online_batch.place_batch` keeps this result only when
it beats every order it tried by the same score, so a joint batch never places less.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ortools.sat.python import cp_model

from scheduler.cpsat import stopped_by_clock
from scheduler.filters import node_fit, quota_room
from scheduler.greedy import Placer
from scheduler.pairing import FULL
from scheduler.scoring import PAIRING_WEIGHT
from scheduler.state import ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

CANDIDATE_NODES = 6  # per deployment: best nodes whose accelerators enter the model
EMPTY_PER_NODE = 2  # empty accelerators of a candidate node in the model (they are alike)
ITEM_NODES = 12  # per item: nodes (of the candidates) it may take, its best by its ranking
DETERMINISTIC_BUDGET_S = 0.1  # CP-SAT deterministic time per batch (what ends a search)
WALL_CEILING_S = 10.0  # a ceiling only a very loaded machine reaches (or the deadline)
SEED = 1
BATCH_MAX_ITEMS = 256  # fractional replicas beyond which batch mode does not pair them again


@dataclass(frozen=True)
class _Item:
    d: int
    r: int
    milli: int
    value: int  # objective weight of the replica (`Solver.replica_value`)


def jointly_placeable(solver: Solver, d: int) -> bool:
    """A replica the joint assignment can place: one fractional shard, no spread rule and
    nothing that ties replicas together (min_replicas <= 1)."""
    dep = solver.state.deps[d]
    return (dep.shard.fractional and dep.shards_per_replica == 1 and dep.min_replicas <= 1
            and dep.spread is None)


def place_jointly(solver: Solver, placer: Placer, ds: list[int]) -> None:
    """Place these deployments on the solver's state: the rest greedily, then the
    fractional single-shard replicas by one CP-SAT assignment, then whatever is left
    greedily."""
    joint = [d for d in ds if jointly_placeable(solver, d)]
    place_rest(solver, placer, [d for d in ds if d not in joint])
    if joint:
        _assign(solver, placer, joint)
    place_rest(solver, placer, joint)


def place_rest(solver: Solver, placer: Placer, ds: list[int]) -> None:
    """What these deployments still lack, placed greedily in batch order (biggest first):
    the replicas this solve may place (`Solver.placeable`)."""
    for d in solver.batch_order(ds):
        todo = solver.placeable(d)
        if todo:
            placer.place_deployment(d, todo)


def pair_again(solver: Solver, wanted: list[int]) -> None:
    """Batch-mode stage: the fractional single-shard replicas this solve placed (or left
    pending) assigned again by the exact pairing, on the answer the solve has so far.

    The greedy decides one fraction at a time and CP-SAT over node classes sums a class's
    fraction capacity, so neither sees that two 500s share one accelerator where a 700 and a
    500 do not (`builders.hbm_bound_pairing`). Here the solve's new fractional replicas are
    taken out and placed again by `_assign` (whole shards stay where the solve put them),
    then greedily what is left; the result is kept only if it places more (term 1), so the
    stage never loses. Replicas the problem gave (running or repaired) stay where they are.
    Runs only when such a replica is still pending (otherwise it cannot place more), and not
    beyond `BATCH_MAX_ITEMS` replicas (the model grows with items x accelerators)."""
    joint = [d for d in wanted if jointly_placeable(solver, d)]
    waiting = sum(len(solver.placeable(d)) for d in joint)
    if not waiting:
        return  # every such replica is placed: re-pairing them cannot place more
    state = solver.state
    new = [(d, r) for d in joint for r in state.by_dep.get(d, ()) if (d, r) not in solver.given]
    if len(new) + waiting > BATCH_MAX_ITEMS:
        return
    if time.perf_counter() >= solver.deadline:
        _cut_by_clock(solver)  # not run: on a faster machine it would have
        return
    kept, value = state, solver.objective(state)
    trial = state.copy()
    for d, r in new:
        trial.remove_replica(d, r)
    solver.adopt(trial)
    _assign(solver, solver.placer, joint)
    place_rest(solver, solver.placer, joint)
    better = solver.objective(trial) > value
    solver.stats["batch_pairing"] = "kept" if better else "no gain"
    if not better:
        solver.adopt(kept)
        return
    for d in joint:
        solver.why.pop(d, None)  # said of the state before: explained again if still pending


def _assign(solver: Solver, placer: Placer, ds: list[int]) -> None:
    """The CP-SAT assignment (module doc); commits what it decides and the checks allow."""
    state = solver.state
    values = placer.scores.pairing_values()
    items: list[_Item] = []
    rankings = {}
    for d in ds:
        slots = node_fit(state, d).slots
        ranking = placer.rank_nodes(d, slots, full=True)
        if ranking is None or ranking.cost is None or ranking.pick is None:
            continue
        rankings[d] = (ranking, slots)
        for r in solver.pending(d):
            items.append(_Item(d, r, state.deps[d].shard.accelerator_milli,
                               solver.replica_value(d)))
    if not items:
        return
    # Candidate accelerators: on each deployment's best nodes, every used accelerator with
    # room for the smallest item and the first `EMPTY_PER_NODE` empty ones.
    smallest = min(it.milli for it in items)
    accs: dict[tuple[int, int], None] = {}
    for ranking, _ in rankings.values():
        for node in ranking.nodes[:CANDIDATE_NODES].tolist():
            if any(n == node for n, _ in accs):
                continue
            room = state.acc_exists[node] & (state.acc_free[node] >= smallest)
            empty = room & (state.acc_free[node] >= FULL)
            keep = (room & ~empty) | (empty & (np.cumsum(empty) <= EMPTY_PER_NODE))
            accs.update(((node, int(a)), None) for a in np.flatnonzero(keep))
    model = cp_model.CpModel()
    x: dict[tuple[int, int], object] = {}
    cost: dict[tuple[int, int], int] = {}
    acc_list = list(accs)
    for i, it in enumerate(items):
        ranking, slots = rankings[it.d]
        near = ranking.nodes[:ITEM_NODES]
        where = {int(n): k for k, n in enumerate(near.tolist())}
        hbm = state.deps[it.d].shard.hbm_gib
        t = int(state.dep_tenant[it.d])
        for g, (node, a) in enumerate(acc_list):
            k = where.get(node)
            if k is None or slots[node] <= 0 or state.acc_free[node, a] < it.milli or \
                    state.acc_hbm[node, a] < hbm or state.acc_owner[node, a] not in (-1, t):
                continue
            x[(i, g)] = model.new_bool_var(f"x_{i}_{g}")
            cost[(i, g)] = int(round(float(ranking.cost[k])))
    if not x:
        return
    # An item at most once.
    for i in range(len(items)):
        model.add_at_most_one(v for (j, _), v in x.items() if j == i)
    by_acc: dict[int, list[tuple[int, object]]] = {}
    for (i, g), v in x.items():
        by_acc.setdefault(g, []).append((i, v))
    # Per accelerator: its free milli; the room left is priced by the pairing values.
    unit = math.gcd(FULL, *[it.milli for it in items],
                    *[int(state.acc_free[acc_list[g]]) for g in by_acc])
    kept_value = []
    loads = {}
    for g, members in by_acc.items():
        free = int(state.acc_free[acc_list[g]])
        load = loads[g] = sum(items[i].milli * v for i, v in members)
        model.add(load <= free)
        if values is not None and unit >= 5:
            left = model.new_int_var(0, free // unit, f"left_{g}")
            model.add(unit * left == free - load)
            table = [int(round(float(values.room_value[level * unit])))
                     for level in range(free // unit + 1)]
            worth = model.new_int_var(0, max(table), f"worth_{g}")
            model.add_element(left, table, worth)
            kept_value.append(worth)
    # Empty accelerators of one node are alike: the first carries the most (no symmetric
    # answers for the search to prove equal).
    empty_on: dict[int, list[int]] = {}
    for g in by_acc:
        node, a = acc_list[g]
        if state.acc_free[node, a] >= FULL and state.acc_owner[node, a] == -1:
            empty_on.setdefault(node, []).append(g)
    for gs in empty_on.values():
        for g1, g2 in zip(gs, gs[1:]):
            model.add(loads[g1] >= loads[g2])
    # Per node: CPU, memory, each deployment's slots and its room under `max_shards`.
    by_node: dict[int, list[tuple[int, object]]] = {}
    for (i, g), v in x.items():
        by_node.setdefault(acc_list[g][0], []).append((i, v))
    room = None
    if state.topo.shards_capped:
        room = dict(zip(by_node, state.shard_room(np.array(list(by_node), dtype=np.int64)).tolist()))
    for node, members in by_node.items():
        specs = [state.deps[items[i].d].shard for i, _ in members]
        model.add(sum(s.cpu_milli * v for s, (_, v) in zip(specs, members))
                  <= int(state.cpu_free[node]))
        model.add(sum(s.memory_mib * v for s, (_, v) in zip(specs, members))
                  <= int(min(state.mem_free[node], 2**53)))
        for d in {items[i].d for i, _ in members}:
            model.add(sum(v for i, v in members if items[i].d == d)
                      <= int(rankings[d][1][node]))
        if room is not None and len({i for i, _ in members}) > room[node]:  # `max_shards`, where it could bind
            model.add(sum(v for _, v in members) <= room[node])
    # Objective: placed value first, then least cost (FGD + pairing value lost).
    net = [0.0 if values is None else values.net(it.milli) for it in items]
    pairing_w = PAIRING_WEIGHT if kept_value else 0.0
    secondary_max = sum(abs(c) for c in cost.values()) + \
        pairing_w * (FULL * len(kept_value) + sum(net)) + 1
    big = int(secondary_max) + 1
    model.maximize(
        sum((big * items[i].value - cost[(i, g)] + int(round(pairing_w * net[i]))) * v
            for (i, g), v in x.items())
        + sum(int(round(pairing_w)) * w for w in kept_value))
    for (i, g), v in x.items():  # hint: each item where it would go alone
        ranking = rankings[items[i].d][0]
        model.add_hint(v, acc_list[g] == (int(ranking.nodes[0]), int(ranking.pick[0])))
    solver_cp = cp_model.CpSolver()
    params = solver_cp.parameters
    params.catch_sigint_signal = False  # keep the process's SIGINT handler (`cpsat.configure`)
    params.num_workers = 1
    params.random_seed = SEED
    params.max_deterministic_time = DETERMINISTIC_BUDGET_S
    params.max_time_in_seconds = max(0.01, min(WALL_CEILING_S,
                                               solver.deadline - time.perf_counter()))
    status = solver_cp.solve(model)
    if status != cp_model.OPTIMAL and stopped_by_clock(solver_cp):
        _cut_by_clock(solver)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return
    chosen = sorted((i, g) for (i, g), v in x.items() if solver_cp.boolean_value(v))
    for i, g in chosen:
        _commit(solver, items[i], *acc_list[g])
    placer.scores.forget()  # the state changed under the placer's cached scores


def _cut_by_clock(solver: Solver) -> None:
    """The wall clock, not the deterministic budget, decided a joint assignment (stopped its
    search, or left no time to run it): the plan may differ on a faster or less loaded machine.
    `stats.joint_clock_cut` counts them (the golden plans do not fail such a plan)."""
    cuts = solver.stats.get("joint_clock_cut", 0)
    solver.stats["joint_clock_cut"] = (cuts if isinstance(cuts, int) else 0) + 1


def _commit(solver: Solver, it: _Item, node: int, a: int) -> bool:
    """Place one item where the assignment put it, if every rule still allows it now."""
    state = solver.state
    spec = state.deps[it.d].shard
    t = int(state.dep_tenant[it.d])
    if node_fit(state, it.d).slots[node] <= 0 or quota_room(state, it.d)[0] < 1 or \
            state.acc_free[node, a] < it.milli or state.acc_hbm[node, a] < spec.hbm_gib or \
            state.acc_owner[node, a] not in (-1, t):
        return False
    state.add_replica(it.d, it.r, {0: ShardAt(node, (a,), it.milli)})
    return True

"""An online batch decided jointly: the batch's fractional shards paired onto accelerators by
one exact CP-SAT assignment that maximises what the batch is judged by (`batch_quality.py`).

Trying orders (`online_batch.batch_orders`) still decides each shard alone, on the state the
earlier ones left. Here the whole shards of the batch are placed first (in an online batch:
where the best order put them), then every fractional single-shard replica of the batch at once:

    data         items (pending fractional replicas) and candidate accelerators: per
                 deployment, the placer's best `CANDIDATE_NODES` nodes (`Placer.rank_nodes`):
                 their used accelerators with room, and `EMPTY_PER_NODE` empty ones; and the
                 accelerators of the hint (in an online batch the best order's places)
    variables    x[i, g]: item i on accelerator g (g on one of its deployment's best
                 `ITEM_NODES` nodes, or its hinted one); room[g, l]: g keeps l milli free
    constraints  an item at most once; per accelerator its free milli; per node CPU, memory
                 and the deployment's slots (`node_fit`); a node's empty accelerators filled
                 in order (they are alike)
    objective    most priority-weighted milli placed; then the batch's quality
                 (`batch_quality`): per accelerator a table over the room it keeps (the
                 quality of its node with that accelerator at that room: FGD and pairing
                 value, exact for several items sharing one accelerator), per item its net
                 pairing value and what its CPU and memory cost its node. Exact where a batch
                 changes one accelerator of a node; changes to several accelerators of one
                 node and to its host resources are added up (the selection then measures
                 the real thing).

The answer is decoded shard by shard through the state (every per-node rule is checked again;
an item the check refuses, and any item CP-SAT left out, goes through the greedy placer after).
The search is deterministic: one worker, fixed seed, `DETERMINISTIC_BUDGET_S` deterministic
time per assignment (its own budget: every batch of a long online solve gets the same); the
wall clock is only a ceiling (`WALL_CEILING_S` per online batch, whatever the solve has
left; in batch mode also the solve's deadline). `online_batch.place_batch` keeps this result only when it beats every order
it tried by the same score, so a joint batch never places less.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from ortools.sat.python import cp_model

from scheduler.batch_quality import row_quality, usable_free
from scheduler.filters import node_fit, quota_room
from scheduler.greedy import PAIRING_WEIGHT, Placer
from scheduler.pairing import FULL, PairingValues
from scheduler.state import ShardAt

if TYPE_CHECKING:
    from scheduler.solve import Solver

CANDIDATE_NODES = 6  # per deployment: best nodes whose accelerators enter the model
EMPTY_PER_NODE = 2  # empty accelerators of a candidate node in the model (they are alike)
ITEM_NODES = 12  # per item: nodes (of the candidates) it may take, its best by its ranking
DETERMINISTIC_BUDGET_S = 0.1  # CP-SAT deterministic time per batch (what ends a search)
WALL_CEILING_S = 10.0  # per assignment: a ceiling only a very loaded machine reaches
SEED = 1
BATCH_MAX_ITEMS = 256  # fractional replicas beyond which batch mode does not pair them again

Hint = dict[tuple[int, int], tuple[int, int]]  # (deployment, replica) -> (node, accelerator)


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


def place_jointly(solver: Solver, placer: Placer, ds: list[int], hint: Hint | None = None,
                  wall_s: float | None = None) -> None:
    """Place these deployments on the solver's state: the rest greedily, then the
    fractional single-shard replicas by one CP-SAT assignment (started from `hint`; the wall
    clock stops it after `wall_s`, by default the solve's deadline), then whatever is left
    greedily."""
    joint = [d for d in ds if jointly_placeable(solver, d)]
    place_rest(solver, placer, [d for d in ds if d not in joint])
    if joint:
        _assign(solver, placer, joint, hint, wall_s)
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
    if len(new) + waiting > BATCH_MAX_ITEMS or time.perf_counter() >= solver.deadline:
        return
    kept, value = state, solver.objective(state)
    trial = state.copy()
    for d, r in new:
        trial.remove_replica(d, r)
    solver.adopt(trial)
    _assign(solver, solver.placer, joint, None, None)
    place_rest(solver, solver.placer, joint)
    better = solver.objective(trial) > value
    solver.stats["batch_pairing"] = "kept" if better else "no gain"
    if not better:
        solver.adopt(kept)
        return
    for d in joint:
        solver.why.pop(d, None)  # said of the state before: explained again if still pending


@dataclass
class _Data:
    """What the model is built from: the items, the nodes each may take, the accelerators."""

    items: list[_Item]
    near: list[list[int]]  # per item: the nodes it may take
    slots: dict[int, np.ndarray]  # per deployment: its slots per node (`node_fit`)
    alone: dict[int, tuple[int, int]]  # per deployment: where one shard would go alone
    accs: list[tuple[int, int]]  # candidate (node, accelerator), by node then accelerator
    on_node: dict[int, list[int]] = field(default_factory=dict)  # node -> indices in accs


def _assign(solver: Solver, placer: Placer, ds: list[int], hint: Hint | None,
            wall_s: float | None) -> None:
    """The CP-SAT assignment (module doc); commits what it decides and the checks allow."""
    data = _gather(solver, placer, ds, hint or {})
    if data is None:
        return
    built = _build(solver, placer.pairing_values(), data, hint or {})
    if built is None:
        return
    model, x = built
    dump = os.environ.get("MAIA_DUMP_JOINT_MODEL")
    if dump:
        model.export_to_file(dump)
    cp = cp_model.CpSolver()
    params = cp.parameters
    params.num_workers = 1
    params.random_seed = SEED
    params.max_deterministic_time = DETERMINISTIC_BUDGET_S
    ceiling = solver.deadline - time.perf_counter() if wall_s is None else wall_s
    params.max_time_in_seconds = max(0.01, min(WALL_CEILING_S, ceiling))
    status = cp.solve(model)
    counts = solver.stats.setdefault("joint_status", {})
    counts[cp.status_name(status)] = counts.get(cp.status_name(status), 0) + 1  # type: ignore
    if status != cp_model.OPTIMAL and cp.deterministic_time < DETERMINISTIC_BUDGET_S:
        solver.stats["joint_clock_cut"] = int(solver.stats.get("joint_clock_cut", 0)) + 1  # type: ignore
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return
    for i, g in sorted(key for key, v in x.items() if cp.boolean_value(v)):
        _commit(solver, data.items[i], *data.accs[g])
    placer.forget_scores()  # the state changed under the placer's cached scores


def _gather(solver: Solver, placer: Placer, ds: list[int], hint: Hint) -> _Data | None:
    """The items (pending replicas of these deployments), the nodes each may take (its
    deployment's best `ITEM_NODES` by the placer's ranking, and its hinted one) and the
    candidate accelerators (module doc); None when there is nothing to assign."""
    state = solver.state
    data = _Data([], [], {}, {}, [])
    candidates: dict[int, None] = {}
    for d in ds:
        slots = node_fit(state, d).slots
        ranking = placer.rank_nodes(d, slots, full=True)
        if ranking is None or ranking.pick is None:
            continue
        data.slots[d] = slots
        data.alone[d] = (int(ranking.nodes[0]), int(ranking.pick[0]))
        best = ranking.nodes[:ITEM_NODES].tolist()
        candidates.update((n, None) for n in best[:CANDIDATE_NODES])
        for r in solver.pending(d):
            at = hint.get((d, r))
            data.items.append(_Item(d, r, state.deps[d].shard.accelerator_milli,
                                    solver.replica_value(d)))
            data.near.append(best if at is None or at[0] in best else [*best, at[0]])
    if not data.items:
        return None
    smallest = min(it.milli for it in data.items)
    accs: dict[tuple[int, int], None] = {}
    for node in candidates:
        room = state.acc_exists[node] & (state.acc_free[node] >= smallest)
        empty = room & (state.acc_free[node] >= FULL)
        keep = (room & ~empty) | (empty & (np.cumsum(empty) <= EMPTY_PER_NODE))
        accs.update(((node, int(a)), None) for a in np.flatnonzero(keep))
    accs.update((at, None) for at in hint.values())
    data.accs = sorted(accs)  # a node's empty accelerators in order (symmetry below)
    for g, (node, _) in enumerate(data.accs):
        data.on_node.setdefault(node, []).append(g)
    return data


def _build(solver: Solver, values: PairingValues | None, data: _Data, hint: Hint
           ) -> tuple[cp_model.CpModel, dict[tuple[int, int], cp_model.IntVar]] | None:
    """The model (module doc) and its x[i, g]; None when no item fits anywhere."""
    state, items, accs = solver.state, data.items, data.accs
    model = cp_model.CpModel()
    # ---- variables: x[i, g], item i on accelerator g
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for i, it in enumerate(items):
        hbm = state.deps[it.d].shard.hbm_gib
        t = int(state.dep_tenant[it.d])
        for node in data.near[i]:
            if data.slots[it.d][node] <= 0:
                continue
            for g in data.on_node.get(node, ()):
                a = accs[g][1]
                if state.acc_free[node, a] >= it.milli and state.acc_hbm[node, a] >= hbm \
                        and state.acc_owner[node, a] in (-1, t):
                    x[(i, g)] = model.new_bool_var(f"x_{i}_{g}")
    if not x:
        return None
    by_acc: dict[int, list[tuple[int, cp_model.IntVar]]] = {}
    by_node: dict[int, list[tuple[int, cp_model.IntVar]]] = {}
    for (i, g), v in x.items():
        by_acc.setdefault(g, []).append((i, v))
        by_node.setdefault(accs[g][0], []).append((i, v))

    # ---- constraints
    # An item at most once.
    for i in range(len(items)):
        model.add_at_most_one(v for (j, _), v in x.items() if j == i)
    # Per accelerator: exactly one room it keeps, of those its items can leave; its quality.
    levels = {g: _reachable_room(int(state.acc_free[accs[g]]),
                                 [items[i].milli for i, _ in members])
              for g, members in by_acc.items()}
    tables = _room_tables(solver, values, {accs[g]: lv for g, lv in levels.items()})
    loads: dict[int, cp_model.LinearExpr] = {}
    worth: list[cp_model.LinearExpr] = []
    spread = 0  # how far the quality terms can move the objective (kept below one milli)
    for g, members in by_acc.items():
        free = int(state.acc_free[accs[g]])
        loads[g] = sum(items[i].milli * v for i, v in members)
        room = {lv: model.new_bool_var(f"room_{g}_{lv}") for lv in levels[g]}
        model.add_exactly_one(room.values())
        model.add(sum((free - lv) * b for lv, b in room.items()) == loads[g])
        table = tables[accs[g]]
        worth.append(sum(table[lv] * b for lv, b in room.items()))
        spread += max(table.values()) - min(table.values())
    # A node's empty accelerators are alike: the first carries the most.
    empties: dict[int, list[int]] = {}
    for g in by_acc:
        node, a = accs[g]
        if state.acc_free[node, a] >= FULL and state.acc_owner[node, a] == -1:
            empties.setdefault(node, []).append(g)
    for gs in empties.values():
        for g1, g2 in zip(gs, gs[1:]):
            model.add(loads[g1] >= loads[g2])
    # Per node: CPU, memory and each deployment's slots.
    for node, members in by_node.items():
        specs = [state.deps[items[i].d].shard for i, _ in members]
        model.add(sum(s.cpu_milli * v for s, (_, v) in zip(specs, members))
                  <= int(state.cpu_free[node]))
        model.add(sum(s.memory_mib * v for s, (_, v) in zip(specs, members))
                  <= int(min(state.mem_free[node], 2**53)))
        for d in {items[i].d for i, _ in members}:
            model.add(sum(v for i, v in members if items[i].d == d)
                      <= int(data.slots[d][node]))

    # ---- objective: placed value first, then the batch's quality
    host = _host_costs(solver, values, {(accs[g][0], items[i].d) for i, g in x})
    gain = {}
    for (i, g), v in x.items():
        net = 0.0 if values is None else PAIRING_WEIGHT * values.net(items[i].milli)
        gain[(i, g)] = int(round(net)) + host[(accs[g][0], items[i].d)]
        spread += abs(gain[(i, g)])
    big = spread + 1
    model.maximize(sum((big * items[i].value + gain[(i, g)]) * v for (i, g), v in x.items())
                   + sum(worth))
    # Hint: the best order's answer (or, without one, each item where it would go alone).
    index = {at: g for g, at in enumerate(accs)}
    at_hint = _hinted(items, hint, index, empties) if hint else \
        {i: index[data.alone[it.d]] for i, it in enumerate(items) if data.alone[it.d] in index}
    for (i, g), v in x.items():
        model.add_hint(v, at_hint.get(i) == g)
    return model, x


def _reachable_room(free: int, sizes: list[int]) -> list[int]:
    """The room an accelerator with `free` milli can keep, some of these items put on it."""
    mask = (1 << (free + 1)) - 1
    reach = 1  # bit l: a load of l milli is reachable
    for m in sizes:
        reach |= (reach << m) & mask
    return [free - load for load in range(free + 1) if reach >> load & 1]


def _room_tables(solver: Solver, values: PairingValues | None,
                 levels: dict[tuple[int, int], list[int]]) -> dict[tuple[int, int], dict[int, int]]:
    """Per accelerator and room it may keep: how much better its node is (`row_quality`) with
    that accelerator at that room, the rest of the node as it is, rounded."""
    state = solver.state
    free = usable_free(state)
    rows, nodes = [], []
    for (node, a), lv in levels.items():
        block = np.repeat(free[node][None, :], len(lv) + 1, axis=0)
        block[1:, a] = lv  # row 0: the node as it is
        rows.append(block)
        nodes.extend([node] * (len(lv) + 1))
    node_ix = np.array(nodes, dtype=np.int64)
    quality = row_quality(solver.workload, values, np.concatenate(rows),
                          state.cpu_free[node_ix], state.mem_free[node_ix], node_ix)
    out: dict[tuple[int, int], dict[int, int]] = {}
    k = 0
    for key, lv in levels.items():
        out[key] = {level: int(round(float(q - quality[k])))
                    for level, q in zip(lv, quality[k + 1:k + 1 + len(lv)])}
        k += len(lv) + 1
    return out


def _host_costs(solver: Solver, values: PairingValues | None,
                pairs: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """Per (node, deployment): how much better the node is with one shard's CPU and memory
    taken (its accelerators as they are), rounded: what the room tables leave out."""
    state = solver.state
    keys = sorted(pairs)
    node_ix = np.array([n for n, _ in keys], dtype=np.int64)
    cpu = np.array([state.deps[d].shard.cpu_milli for _, d in keys], dtype=np.int64)
    mem = np.array([state.deps[d].shard.memory_mib for _, d in keys], dtype=np.int64)
    free = usable_free(state)[node_ix]
    cpu_free, mem_free = state.cpu_free[node_ix], state.mem_free[node_ix]
    both = row_quality(solver.workload, values, np.concatenate([free, free]),
                       np.concatenate([cpu_free - cpu, cpu_free]),
                       np.concatenate([mem_free - mem, mem_free]),
                       np.concatenate([node_ix, node_ix]))
    n = len(keys)
    return {key: int(round(float(both[k] - both[n + k]))) for k, key in enumerate(keys)}


def _hinted(items: list[_Item], hint: Hint, index: dict[tuple[int, int], int],
            empties: dict[int, list[int]]) -> dict[int, int]:
    """Per item, the accelerator (index into the candidates) the hint puts it on; a node's
    empty accelerators renumbered so the most loaded comes first (the model's order)."""
    at: dict[int, int] = {}
    for i, it in enumerate(items):
        place = hint.get((it.d, it.r))
        if place is not None and place in index:
            at[i] = index[place]
    for gs in empties.values():
        groups = [[i for i, g in at.items() if g == g0] for g0 in gs]
        groups.sort(key=lambda members: -sum(items[i].milli for i in members))
        for g0, members in zip(gs, groups):
            for i in members:
                at[i] = g0
    return at


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

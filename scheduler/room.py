"""Making room for one replica: which running replicas to take out (preemption) or to move
elsewhere (rebalance), fewest first.

A trial works on a copy of the state: per locality domain (the most loaded first), remove
candidate replicas in two orders (cheapest work first, biggest holes first) until the new
replica fits; keep the trial with the fewest removed (then moved) replicas. Preemption then
puts back the victims the new work did not need; rebalance must land every removed replica
elsewhere within its move budget.

A domain where the replica would not fit even with every candidate there removed
(`_domain_can_fit`: one copy and one filter pass) cannot succeed in any order, since taking
work out only frees room: its trials are counted as spent without running them, so the
search gives the same answer as running them, for a fraction of the cost (on a 1,024-node
rebalance problem 240 of 256 trials were such, each ~20 filter passes).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from scheduler.filters import (NODE_FILTERS, fits_within, gang_capacity, node_fit, quota_room, spread_mask,
                               tenant_masks)
from scheduler.greedy import Placer
from scheduler.state import ClusterState, ShardAt
from scheduler.topology import UNLIMITED

if TYPE_CHECKING:
    from scheduler.solve import Solver

MAX_PREEMPTION_DOMAINS = 64  # domains tried when looking for the fewest victims
SINGLE_VICTIM_TRIALS = 8  # per domain, victims also tried alone (see make_room)

Replica = tuple[int, int]  # (deployment, replica)
# A trial that made room: its cost (replicas removed, shards moved, the removed replicas'
# priorities summed: of equally many, the lower-priority work goes; then the accelerators taken
# from tenants it leaves below their reservation: of equal cost, burst work goes before work a
# tenant is owed), its state, removed, moved.
Outcome = tuple[tuple[int, int, int, int], ClusterState, list[Replica], int]


class TrialBudget:
    """How many trials a search may still run. A count, not a clock: where it ends the
    search, the answer is the same on a fast machine and a loaded one (the deadline stays
    as a ceiling)."""

    def __init__(self, trials: int) -> None:
        self.total = self.left = trials

    def spend(self) -> bool:
        """Take one trial; False once none is left."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def make_room(solver: Solver, d: int, eligible: list[Replica], relocate: bool, budget: int,
              trials: TrialBudget, deadline: float | None = None, below_min: bool = False
              ) -> tuple[ClusterState, list[Replica], int] | None:
    """Trial per locality domain: fewest replicas removed (or moved) to fit one replica, of
    equally many the lowest priorities (the objective weighs what is placed by priority).
    `below_min`: the trial may leave d short of min_replicas (its caller gathers the rest in
    other domains, and judges the minimum at the end: `preemption.preempt_for`).

    Returns (trial state with the replica placed, replicas removed, shards moved).
    Stops trying when `trials` runs out or at the deadline, and returns the best found so
    far."""
    state, topo = solver.state, solver.topo
    dom = topo.domain_of(search_level(state, d))
    by_domain: dict[int, list[Replica]] = defaultdict(list)
    for v in eligible:
        for dm in {int(dom[at.node]) for at in state.replicas[v].values()}:
            by_domain[dm].append(v)
    ranked = sorted(by_domain, key=lambda dm: -sum(
        len(state.replicas[v]) * state.deps[v[0]].shard.milli for v in by_domain[dm]))
    if not relocate and len(ranked) < MAX_PREEMPTION_DOMAINS:
        # Then the domains with room but no power, each with its power scopes' victims.
        powered = _power_bound_domains(state, d, eligible, dom, set(by_domain))
        by_domain.update(powered)
        ranked += sorted(powered)
    best = None
    own = own_running(solver, d)
    r = next((x for x in solver.placeable(d) if x not in own), solver.placeable(d)[0])
    size = {v: len(state.replicas[v]) * max(state.deps[v[0]].shard.milli, 1) for v in eligible}
    # Of equal cost, the deployment running the most replicas loses one first: the index order
    # alone put nearly every eviction of a churning cluster on one deployment (94 against the
    # next one's 26 in an exploratory run).
    running = {dv: len(state.by_dep.get(dv, ())) for dv in {v[0] for v in eligible}}
    orders = (lambda v: (state.deps[v[0]].priority, -size[v], -running[v[0]], v),  # cheapest work first
              lambda v: (-size[v], state.deps[v[0]].priority, -running[v[0]], v))  # biggest holes first
    claimant = int(state.dep_tenant[d])
    lowest = min((state.deps[v[0]].priority for v in eligible), default=0)
    least_owed = 0 if relocate else min((_owed_alone(state, v, claimant) for v in eligible), default=0)

    def least_cost(victims: int) -> tuple[int, int, int, int]:
        """No trial taking out this many victims costs less: each of the lowest priority there
        is, moved nowhere, one alone taking the least owed work one can. A domain that cannot beat
        the best found so is skipped, and once the best costs what one victim can, the search
        ends: their trials are left for the next replica."""
        return victims, 0, victims * lowest, least_owed if victims == 1 else 0
    for dm in ranked[:MAX_PREEMPTION_DOMAINS]:
        if deadline is not None and time.perf_counter() >= deadline:
            break
        allowed = dom == dm
        if best is not None and best[0] <= least_cost(_fewest_victims(state, d, by_domain[dm], allowed)):
            continue  # from its capacity alone, it cannot beat the best found: no trial spent on it
        tries = [sorted(by_domain[dm], key=order) for order in orders]
        doomed = not _domain_can_fit(state, d, by_domain[dm], allowed)
        here = None
        last: tuple[list[Replica], Outcome | None] | None = None  # removals run, outcome
        for victims in tries:
            if not trials.spend():
                break
            if doomed:
                continue  # spent as if run: the same search as running it
            if last is not None and victims[:len(last[0])] == last[0]:
                found = last[1]  # the same removals in the same order: the same trial
            else:
                found, used = _trial(solver, d, r, victims, allowed, relocate, budget, own, below_min)
                last = (victims[:used], found)
            if found is not None and (here is None or found[0] < here[0]):
                here = found
        if here is not None and here[0][0] > 1:
            # One victim alone can be enough where the orders took several (its removal
            # clears an exclusion, say): try the first few singly.
            for v in tries[0][:SINGLE_VICTIM_TRIALS]:
                if not _alone_may_fit(state, d, v, allowed):
                    continue  # taken out alone, it frees too little: no trial spent on it
                if not trials.spend():
                    break
                found, _ = _trial(solver, d, r, [v], allowed, relocate, budget, own, below_min)
                if found is not None and found[0] < here[0]:
                    here = found
        if here is not None and (best is None or here[0] < best[0]):
            best = here
        if trials.left <= 0 or (best is not None and best[0] <= least_cost(1)):
            break
    if best is None:
        return None
    return best[1], best[2], best[3]


_POWER_FILTERS = np.array([i for i, f in enumerate(NODE_FILTERS) if f.code.startswith("POWER_")])


def _power_bound_domains(state: ClusterState, d: int, eligible: list[Replica], dom: np.ndarray,
                         searched: set[int]) -> dict[int, list[Replica]]:
    """Domains (other than `searched`) with room for a replica of d on their nodes, each with the
    victims running under the same rack or row power budget: where power binds, a victim
    anywhere under that budget frees it (one 700 W single taken out of a full node let a
    replica onto the empty node beside it, where the victims of the replica's own domain were
    the whole full node: four evicted for one)."""
    topo = state.topo
    if state.deps[d].shard.shard_power_w <= 0 or not eligible:
        return {}
    rack_capped = topo.rack_budget < UNLIMITED
    row_capped = topo.row_budget < UNLIMITED
    if not (rack_capped.any() or row_capped.any()):
        return {}
    spec = state.deps[d].shard
    if spec.accelerators == 0:
        return {}
    # Shards each node's free accelerators hold, power aside (`node_fit` counts its headroom too),
    # on the nodes whose every other filter lets d in (a cordoned node, another zone, model or
    # tenant's node took trials and the domain limit from the real ones).
    if spec.fractional:
        slots = (state.acc_free // spec.accelerator_milli).sum(axis=1)
    else:
        slots = (state.acc_free >= 1000).sum(axis=1) // spec.accelerators
    codes = node_fit(state, d, explain=True).codes
    assert codes is not None
    slots = np.where((codes < 0) | np.isin(codes, _POWER_FILTERS), slots, 0)
    if topo.shards_capped:  # of the nodes with slots only: a room per node is O(tenants)
        open_ = np.flatnonzero(slots > 0)
        slots[open_] = np.minimum(slots[open_], state.shard_room(open_))
    room = np.bincount(dom, weights=slots, minlength=int(dom.max(initial=-1)) + 1)
    need = state.deps[d].shards_per_replica
    candidates = [int(dm) for dm in np.flatnonzero(room >= need) if int(dm) not in searched]
    if not candidates:
        return {}
    drawn = need * spec.shard_power_w  # what the replica draws, under each budget it lands beneath
    rack_short = rack_capped & (state.rack_headroom() < drawn)
    row_short = row_capped & (state.row_headroom() < drawn)
    under: dict[tuple[str, int], list[Replica]] = defaultdict(list)  # a budget short of it -> victims under it
    for v in eligible:
        nodes = [at.node for at in state.replicas[v].values()]
        for scope in {*(("rack", int(k)) for k in topo.node_rack[nodes] if rack_short[k]),
                      *(("row", int(w)) for w in topo.node_row[nodes] if row_short[w])}:
            under[scope].append(v)
    if not under:
        return {}
    found: dict[int, list[Replica]] = {}
    for dm in candidates[:MAX_PREEMPTION_DOMAINS]:
        here = dom == dm
        scopes = [*(("rack", int(k)) for k in np.unique(topo.node_rack[here])),
                  *(("row", int(w)) for w in np.unique(topo.node_row[here]))]
        victims = list(dict.fromkeys(v for scope in scopes for v in under.get(scope, ())))
        if victims:
            found[dm] = victims
    return found


def search_level(state: ClusterState, d: int) -> str:
    """Where a trial looks for victims together: the deployment's locality domain, widened to the
    rack where a rack-wide rule may bind it (its tenant dedicated_rack or excluding or excluded
    by another, or a dedicated_rack tenant in the cluster): the work that shuts a node to it may
    run on any node of that rack, so no one node's victims clear the rule. The replica still
    lands as its locality says (a trial places it whole, anywhere in the domain)."""
    level = state.deps[d].locality
    if level != "node":
        return level
    t = int(state.dep_tenant[d])
    if state.dedicated_rack.any() or state.topo.tenant_excludes[t].any():
        return "rack"
    return level


def could_fit_anywhere(state: ClusterState, d: int, victims: list[Replica]) -> bool:
    """Could one replica of d fit somewhere with every one of `victims` taken out? When not, no
    search over them, however long, makes room (`_domain_can_fit` over the whole cluster)."""
    return _domain_can_fit(state, d, victims, np.ones(state.topo.n_nodes, dtype=bool))


def _domain_can_fit(state: ClusterState, d: int, victims: list[Replica],
                    allowed: np.ndarray) -> bool:
    """Could one replica of d fit in `allowed` with all these victims taken out? (The
    tenant's caps, the per-node filters and the domain's gang capacity within power, as
    `Placer.place_gang` asks them.) Removing work only frees room, so when this says no,
    no trial over a subset of the victims fits either."""
    dep = state.deps[d]
    count = dep.shards_per_replica
    trial = state.copy()
    cascade(trial, victims)
    if quota_room(trial, d)[0] < count:
        return False
    slots = np.where(allowed, node_fit(trial, d).slots, 0)
    if slots.sum() < count:
        return False
    if count == 1 and dep.locality in ("node", "none"):
        return True  # one shard: any node with a slot (place_gang asks nothing more)
    return bool(gang_capacity(trial, d, slots, dep.locality).max(initial=0) >= count)


def _fewest_victims(state: ClusterState, d: int, victims: list[Replica], allowed: np.ndarray) -> int:
    """A lower bound of the victims a replica of d needs taken out of `allowed`: the fewest whose
    whole accelerators there, with those free, add up to the replica's (taking work out frees
    no more than it holds). 1 for a fractional shard, or none (left to the trials); more than
    there are when even all of them are too few."""
    dep = state.deps[d]
    spec = dep.shard
    if spec.accelerators == 0 or spec.fractional:
        return 1
    short = dep.shards_per_replica * spec.accelerators - int((state.acc_free[allowed] >= 1000).sum())
    sizes = sorted((sum(len(at.indices) for at in state.replicas[v].values() if allowed[at.node]) for v in victims),
                   reverse=True)
    for k, size in enumerate(sizes, 1):
        short -= size
        if short <= 0:
            return k
    return max(1, len(sizes) + 1) if short > 0 else 1


def _alone_may_fit(state: ClusterState, d: int, v: Replica, allowed: np.ndarray) -> bool:
    """A necessary condition for one replica of d in `allowed` with `v` alone taken out: the
    whole accelerators free there and those `v` holds there are enough (a fractional shard, or
    none, is left to the trial). A replica of 4 accelerators on nodes of two 2-accelerator
    victims spent a domain's eight single-victim trials on what could never fit."""
    spec = state.deps[d].shard
    if spec.accelerators == 0 or spec.fractional:
        return True
    free = int((state.acc_free[allowed] >= 1000).sum())
    held = sum(len(at.indices) for at in state.replicas[v].values() if allowed[at.node])
    return free + held >= state.deps[d].shards_per_replica * spec.accelerators


def _may_fit(state: ClusterState, d: int, allowed: np.ndarray) -> bool:
    """A necessary condition for one replica of d in `allowed`, from totals only: room on
    the domain's accelerators, its CPU and memory summed, and the power headroom of the
    racks it touches. A few array sums where `node_fit` runs every filter over every node;
    when this holds, the filters decide."""
    dep = state.deps[d]
    spec, count = dep.shard, dep.shards_per_replica
    if spec.accelerators > 0:
        free = state.acc_free[allowed]
        if spec.fractional:
            room = int((free // spec.accelerator_milli).sum())
        else:
            room = int((free >= 1000).sum()) // spec.accelerators
        if room < count:
            return False
    if spec.cpu_milli > 0 and state.cpu_free[allowed].sum() < count * spec.cpu_milli:
        return False
    if spec.memory_mib > 0 and state.mem_free[allowed].sum() < count * spec.memory_mib:
        return False
    power = spec.shard_power_w
    if power > 0:
        racks = np.unique(state.topo.node_rack[allowed])
        if fits_within(np.maximum(state.rack_headroom()[racks], 0).sum(), power) < count:
            return False
    return True


def own_running(solver: Solver, d: int) -> dict[int, dict[int, ShardAt]]:
    """Replicas of d that ran before this solve, whole, and are out of the state now: min_replicas
    took them away when d could not reach it (`Placer.place_deployment`). A trial puts them back
    where they ran before placing more: placed anywhere else they would be moves, which only
    rebalance makes (online, a short deployment's running replica was moved to make room). Only
    those still existing: a warm session's `loaded` keeps what it loaded, and a replica released
    since (failed, its node taken by others) blocked every trial."""
    return {x: solver.loaded[(d, x)] for x in solver.placeable(d)
            if (d, x) in solver.existing_replicas
            and len(solver.loaded.get((d, x), ())) == solver.state.deps[d].shards_per_replica}


def _trial(solver: Solver, d: int, r: int, victims: list[Replica], allowed: np.ndarray,
           relocate: bool, budget: int, own: dict[int, dict[int, ShardAt]],
           below_min: bool = False) -> tuple[Outcome | None, int]:
    """Remove victims in order until replica r of d fits in `allowed`, d's own running replicas
    (`own_running`) back where they ran first: the outcome (cost, trial state, removed, moved) or
    None, and how many of the victims it took out (a trial taking out the same first ones in the
    same order would end the same way)."""
    state = solver.state
    dep = state.deps[d]
    trial = state.copy()
    for x, shards in own.items():
        if not restore(trial, (d, x), shards) and not relocate:
            return None, 0  # it would have to move: no victims make that right
    placer = Placer(trial, scorer="bestfit")
    removed: list[Replica] = []
    used = 0
    for v in victims:
        used += 1
        if v in trial.replicas:
            removed += cascade(trial, [v])
        if _may_fit(trial, d, allowed) and \
                node_fit(trial, d).slots[allowed].sum() >= dep.shards_per_replica and \
                placer.place_gang(d, r, list(range(dep.shards_per_replica)), allowed):
            return _finish(solver, d, trial, placer, removed, relocate, budget, below_min), used
    return None, used


def _finish(solver: Solver, d: int, trial: ClusterState, placer: Placer,
            removed: list[Replica], relocate: bool, budget: int, below_min: bool = False) -> Outcome | None:
    """After the new replica fitted in a trial: the rest of d (min_replicas, unless `below_min`),
    then the victims spared (preemption) or landed again within the move budget (rebalance)."""
    state = solver.state
    dep = state.deps[d]
    # min_replicas: the rest of the deployment must reach it in the same trial.
    gone = set(solver.preempted)  # not placed again: see Solver.placeable
    rest = [x for x in range(dep.replicas)
            if (d, x) not in trial.replicas and (d, x) not in gone]
    placer.place_deployment(d, rest, reach_min=not below_min)
    if not trial.placed_replicas(d):
        return None
    if not relocate:
        removed = _spare_victims(state, trial, removed)
    moved = 0
    if relocate:  # every removed replica must land again elsewhere
        back = Placer(trial, scorer="bestfit")
        # Those that can go back exactly where they were first: a replica re-placed on
        # its own node must keep its accelerator indices, or it silently changes.
        later = [v for v in removed if not restore(trial, v, state.replicas[v])]
        for v in later:
            vd, vr = v
            if not back.place_gang(vd, vr, list(range(state.deps[vd].shards_per_replica))):
                return None
            old = state.replicas[v]
            # Another node, or other accelerators on the same node: both are moves.
            moved += sum(1 for s, at in trial.replicas[v].items()
                         if old[s].node != at.node or
                         sorted(old[s].indices) != sorted(at.indices))
        if moved > budget:
            return None
    owed = 0 if relocate else _owed_taken(state, trial, removed, int(state.dep_tenant[d]))
    cost = (len(removed), moved, sum(state.deps[vd].priority for vd, _ in removed), owed)
    return cost, trial, removed, moved


def _owed_alone(state: ClusterState, v: Replica, claimant: int) -> int:
    """What `_owed_taken` says of taking `v` out alone."""
    t = int(state.dep_tenant[v[0]])
    reserved = state.topo.tenant_reserved_milli[t]
    if t == claimant or reserved <= 0:
        return 0
    held = state.tenant_milli[t]
    after = held - sum(at.milli * len(at.indices) for at in state.replicas[v].values())
    return max(0, int(min(held, reserved) - after)) if after < reserved else 0


def _owed_taken(state: ClusterState, trial: ClusterState, removed: list[Replica], claimant: int) -> int:
    """Milli-accelerators the removals take from other tenants they leave below their reservation
    (a move takes nothing; the claimant's own are its business)."""
    reserved = state.topo.tenant_reserved_milli
    taken = 0
    for t in {int(state.dep_tenant[vd]) for vd, _ in removed} - {claimant}:
        if reserved[t] > 0 and trial.tenant_milli[t] < reserved[t]:
            taken += max(0, int(min(state.tenant_milli[t], reserved[t]) - trial.tenant_milli[t]))
    return taken


def cascade(state: ClusterState, victims: list[Replica]) -> list[Replica]:
    """Remove victims; a deployment falling below min_replicas loses all its replicas."""
    removed = []
    for v in victims:
        if v in state.replicas:
            state.remove_replica(*v)
            removed.append(v)
    return removed + below_min_replicas(state, {v[0] for v in removed})


def below_min_replicas(state: ClusterState, ds: set[int]) -> list[Replica]:
    """Remove every replica of these deployments that fell below min_replicas."""
    out = []
    for vd in sorted(ds):
        left = state.placed_replicas(vd)
        if left and len(left) < state.deps[vd].min_replicas:
            for r in left:
                state.remove_replica(vd, r)
                out.append((vd, r))
    return out


def _spare_victims(before: ClusterState, trial: ClusterState, removed: list[Replica]
                   ) -> list[Replica]:
    """Victims the new work did not need after all: put each back where it ran if it
    still fits (latest removed first), then re-apply min_replicas to the victims'
    deployments. Returns the replicas that stay removed."""
    gone = [v for v in reversed(removed) if not restore(trial, v, before.replicas[v])]
    gone.reverse()
    return gone + below_min_replicas(trial, {v[0] for v in gone})


def restore(state: ClusterState, v: Replica, shards: dict[int, ShardAt]) -> bool:
    """Put a removed replica back on exactly its old nodes and indices if every per-node
    rule still allows it (its node may be cordoned: a node keeps what it has)."""
    d, _ = v
    topo = state.topo
    spec = state.deps[d].shard
    t = int(state.dep_tenant[d])
    excl_ok, iso_ok = tenant_masks(state, t)
    spread_ok = spread_mask(state, d)
    need: dict[tuple[int, int], int] = defaultdict(int)
    host: dict[int, int] = defaultdict(int)
    for at in shards.values():
        n = at.node
        if not (topo.node_alive[n] and excl_ok[n] and iso_ok[n]) or \
                (spread_ok is not None and not spread_ok[n]):
            return False
        host[n] += 1
        for idx in at.indices:
            need[(n, idx)] += at.milli
    for (n, idx), milli in need.items():
        owner = state.acc_owner[n, idx]
        if state.acc_free[n, idx] < milli or owner not in (-1, t) or \
                state.acc_hbm[n, idx] < spec.hbm_gib * (milli / max(spec.accelerator_milli, 1)
                                                        if spec.fractional else 1):
            return False
    for n, count in host.items():
        if state.cpu_free[n] < count * spec.cpu_milli or \
                state.mem_free[n] < count * spec.memory_mib:
            return False
    if topo.shards_capped:  # room under each node's `max_shards`
        nodes = np.array(list(host), dtype=np.int64)
        if (state.shard_room(nodes) < np.array(list(host.values()))).any():
            return False
    power = sum(spec.power_w * at.milli * len(at.indices) / 1000.0 for at in shards.values())
    if power > 0:
        racks = {int(topo.node_rack[at.node]) for at in shards.values()}
        rows = {int(topo.node_row[at.node]) for at in shards.values()}
        if len(racks) > 1 or len(rows) > 1:
            return False  # per-domain split of the power: leave it to the placer
        if state.rack_headroom()[racks.pop()] < power or \
                state.row_headroom()[rows.pop()] < power:
            return False
    room, _ = quota_room(state, d)
    if room < len(shards):
        return False
    state.add_replica(d, v[1], dict(shards))
    return True

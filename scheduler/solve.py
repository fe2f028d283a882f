"""`solve(problem) -> plan`: the modes (batch, online, rebalance), preemption and the plan.

Pipeline: build the index view (`topology`) and the occupancy (`state`) from the existing
placements; repair replicas that lost shards on down nodes; then per mode
  * batch     - greedy over all pending replicas (priority first, big gangs first), then CP-SAT
                over node classes to improve on it within the time limit (`cpsat`);
  * online    - deployments one at a time in listed order (or `batch_size` at a time), each
                decided on the state the previous ones left, never revisited;
  * rebalance - batch, then existing replicas may move (at most `max_moves` shards) to make
                room for what did not fit;
then preemption (fewest victims) for what still does not fit, reasons for the rest, and the plan.

Objective weight (documented for term 1 of the spec's objective): a replica is worth
shards x accelerator milli (1 for host-only shards) x (priority - lowest priority + 1), so
weights are positive and monotone in priority.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from scheduler.explain import explain
from scheduler.filters import node_fit, quota_room, spread_mask, tenant_masks
from scheduler.greedy import Placer
from scheduler.fragmentation import Workload, node_fragmentation
from scheduler.model import (Move, Placement, Plan, Preemption, Problem, Reason, Unplaced)
from scheduler.state import ClusterState, ShardAt
from scheduler.topology import build_topology

DEFAULT_TIME_LIMIT_MS = 2000
GREEDY_GUARD_SHARE = 0.5  # of the time limit, for the greedy pipeline that guards CP-SAT's
BATCH_SHUFFLES = 4  # random orders tried per online batch, besides arrival and size order
MAX_PREEMPTION_DOMAINS = 64  # domains tried when looking for the fewest victims
SINGLE_VICTIM_TRIALS = 8  # per domain, victims also tried alone (see _make_room)
PREEMPTION_HINTS = 3  # unplaced deployments per solve tried for "fits after preempting"
HINT_BUDGET_S = 0.1  # time those trials may take (and never past the solve's deadline)
# Reasons preempting work cannot change; a hint goes on the first reason of another code.
NOT_FREED = ("NODE_STATE", "ZONE", "ACCELERATOR_MODEL", "TIME_LIMIT")


def replica_value(state: ClusterState, d: int, min_priority: int) -> int:
    dep = state.deps[d]
    return dep.shards_per_replica * max(dep.shard.milli, 1) * (dep.priority - min_priority + 1)


class Solver:
    """One solve: owns the state, the placer and the bookkeeping for the plan."""

    def __init__(self, problem: Problem, time_limit_ms: int | None, *, use_cpsat: bool = True,
                 deadline: float | None = None) -> None:
        self.t0 = time.perf_counter()
        self.problem = problem
        limit = time_limit_ms or problem.options.time_limit_ms or DEFAULT_TIME_LIMIT_MS
        self.limit_ms = limit
        self.deadline = self.t0 + limit / 1000.0 if deadline is None else deadline
        self.use_cpsat = use_cpsat
        self.topo = build_topology(problem)
        self.state = ClusterState(self.topo)
        self.workload = Workload()
        self.workload.bind_models(self.topo.node_model)
        self.placer = Placer(self.state, scorer=os.environ.get("MAIA_SCORER", "fgd"),  # type: ignore[arg-type]
                             workload=self.workload)
        self.min_priority = min((d.priority for d in problem.deployments), default=0)
        # Existing replica -> {shard: placement as given} (down nodes included), and the
        # shards loaded from it (live nodes only): the plan re-emits an unchanged replica's
        # placements as given without looking at each shard.
        self.given: dict[tuple[int, int], dict[int, Placement]] = {}
        self.loaded: dict[tuple[int, int], dict[int, ShardAt]] = {}
        self.odd_milli: set[tuple[int, int]] = set()
        self.existing_replicas: set[tuple[int, int]] = set()
        self.preempted: list[tuple[int, int]] = []
        self.why: dict[int, tuple[Reason, ...]] = {}
        self.stats: dict[str, object] = {}
        self.proved_optimal = False
        # Deployments whose search the deadline cut short (CP-SAT unproved or skipped, a
        # preemption or rebalance loop stopped): TIME_LIMIT if they end up unplaced.
        self.time_cut: set[int] = set()
        self._load_existing()

    # ---- setup ----------------------------------------------------------------------------

    def _load_existing(self) -> None:
        topo, state = self.topo, self.state
        groups: dict[tuple[int, int], dict[int, ShardAt]] = {}
        given = self.given
        lost: dict[tuple[int, int], list[int]] = defaultdict(list)
        alive = topo.node_alive.tolist()
        dep_index, node_index = topo.deployment_index, topo.node_index
        make = tuple.__new__  # ShardAt without the keyword-handling constructor
        fractional = [dep.shard.fractional for dep in state.deps]
        odd = self.odd_milli
        for p in self.problem.placements:
            d = dep_index[p.deployment]
            key = (d, p.replica)
            n = node_index[p.node]
            g = given.get(key)
            if g is None:
                g = given[key] = {}
            g[p.shard] = p
            if (p.accelerator_milli is not None) != fractional[d]:
                odd.add(key)  # milli given where none belongs (or missing): re-emit
            if not alive[n]:
                lost[key].append(p.shard)
                continue
            sh = groups.get(key)
            if sh is None:
                sh = groups[key] = {}
            milli = p.accelerator_milli
            sh[p.shard] = make(ShardAt, (n, p.accelerator_indices,
                                         1000 if milli is None else milli))
        state.load(groups, copy=False)
        self.loaded = groups  # the state never mutates a replica's dict in place
        self.existing_replicas.update(groups)
        self.lost = lost
        # A replica missing shards without any on a down node (partial input): complete it too.
        for (d, r), shards in groups.items():
            if len(shards) == state.deps[d].shards_per_replica:
                continue
            missing = [s for s in range(state.deps[d].shards_per_replica)
                       if s not in shards and s not in lost.get((d, r), [])]
            if missing:
                lost[(d, r)].extend(missing)

    def pending(self, d: int) -> list[int]:
        placed = self.state.by_dep.get(d, ())
        wanted = self.state.deps[d].replicas
        if len(placed) == wanted:
            return []
        return [r for r in range(wanted) if r not in placed]

    # ---- repair ---------------------------------------------------------------------------

    def repair(self) -> None:
        """Shards on down nodes: re-place them beside their replica, else the whole replica."""
        state, topo = self.state, self.topo
        for (d, r), shards in sorted(self.lost.items()):
            dep = state.deps[d]
            survivors = state.replicas.get((d, r), {})
            allowed = None
            if survivors and dep.locality != "none":
                dom = topo.domain_of(dep.locality)
                allowed = dom == dom[next(iter(survivors.values())).node]
            if survivors and self.placer.place_gang(d, r, sorted(shards), allowed):
                continue
            state.remove_replica(d, r)  # the gang is broken: place it again as a whole
            self.existing_replicas.discard((d, r))

    # ---- modes ----------------------------------------------------------------------------

    def batch_order(self, ds: list[int]) -> list[int]:
        deps = self.state.deps
        return sorted(ds, key=lambda d: (-deps[d].priority,
                                         -deps[d].shards_per_replica * max(deps[d].shard.milli, 1),
                                         d))

    def place_group(self, ds: list[int], preempt: bool = True) -> None:
        for d in ds:
            self.workload.observe(self.state.deps[d].shard, self.state.deps[d].replicas)
        for d in self.batch_order(ds):
            self.place_one(d, preempt)

    def batch_orders(self, ds: list[int], seed: int) -> list[list[int]]:
        """Candidate orders for one online batch, all priority first (ties: see place_batch)."""
        deps = self.state.deps
        prio = {d: -deps[d].priority for d in ds}
        orders = [sorted(ds, key=lambda d: (prio[d], d)),            # as they arrived
                  self.batch_order(ds)]                              # biggest first
        rng = np.random.default_rng(seed)
        for _ in range(BATCH_SHUFFLES):
            noise = dict(zip(ds, rng.permutation(len(ds)).tolist()))
            orders.append(sorted(ds, key=lambda d: (prio[d], noise[d])))
        unique: list[list[int]] = []
        for order in orders:
            if order not in unique:
                unique.append(order)
        return unique

    def place_batch(self, ds: list[int], seed: int) -> None:
        """k online arrivals decided jointly: several orders (`batch_orders`) are played out
        on the state and undone; the one placing most (priority-weighted), then leaving the
        least fragmentation (`node_fragmentation` summed over ready nodes), is kept."""
        state = self.state
        for d in ds:
            self.workload.observe(state.deps[d].shard, state.deps[d].replicas)
        if self.workload.stale():
            self.workload.refresh()  # one snapshot for every candidate, so scores compare
        before = self._replicas_of(ds)
        best: tuple[tuple[float, float], dict[int, dict]] | None = None
        for order in self.batch_orders(ds, seed):
            placer = Placer(state, scorer=self.placer.scorer, workload=self.workload)
            for d in order:
                todo = self.pending(d)
                if todo:
                    placer.place_deployment(d, todo)
            result = self._replicas_of(ds)
            value = sum(len(rs) * replica_value(state, d, self.min_priority)
                        for d, rs in result.items())
            score = (float(value), -self.fragmentation_total(state))
            if best is None or score > best[0]:
                best = (score, result)
            self._set_replicas(ds, before)
        assert best is not None
        self._set_replicas(ds, best[1])
        self.placer = Placer(state, scorer=self.placer.scorer, workload=self.workload)
        for d in ds:
            if self.pending(d):
                self.why[d] = explain(state, d)

    def _replicas_of(self, ds: list[int]) -> dict[int, dict]:
        """These deployments' replicas as they stand (copies: what `_set_replicas` restores)."""
        state = self.state
        return {d: {r: dict(state.replicas[(d, r)]) for r in state.by_dep.get(d, ())}
                for d in ds}

    def _set_replicas(self, ds: list[int], replicas: dict[int, dict]) -> None:
        """Make these deployments hold exactly the given replicas (undo/redo of a trial)."""
        state = self.state
        for d in ds:
            for r in list(state.by_dep.get(d, ())):
                state.remove_replica(d, r)
            for r, shards in replicas[d].items():
                state.add_replica(d, r, shards)

    def fragmentation_total(self, state: ClusterState) -> float:
        free = np.where(state.acc_exists & state.topo.node_ready[:, None], state.acc_free, 0)
        return float(node_fragmentation(free, state.cpu_free, state.mem_free,
                                        self.workload).sum())

    def place_one(self, d: int, preempt: bool = True) -> None:
        todo = self.pending(d)
        if not todo:
            return
        placed = self.placer.place_deployment(d, todo)
        if len(placed) < len(todo):
            self.why[d] = explain(self.state, d)
            if preempt and self.problem.options.allow_preemption:
                self.preempt_for(d)

    def run(self) -> Plan:
        opts = self.problem.options
        self.repair()
        deps = self.state.deps
        wanted = [d for d in range(len(deps)) if self.pending(d)]
        self.stats["pending_replicas"] = sum(len(self.pending(d)) for d in wanted)
        if opts.mode == "online":
            k = opts.batch_size or 1
            for i in range(0, len(wanted), k):
                group = wanted[i:i + k]
                if k == 1:
                    self.workload.observe(deps[group[0]].shard, deps[group[0]].replicas)
                    self.place_one(group[0])
                elif opts.allow_preemption:
                    self.place_group(group)
                else:
                    self.place_batch(group, i // k)
        elif wanted:
            base = self.state.copy()
            self.place_group(wanted, preempt=False)
            if self.use_cpsat and (any(self.pending(d) for d in wanted) or len(wanted) > 1):
                self.improve_with_cpsat(base, wanted)
            if opts.mode == "rebalance":
                self.rebalance()  # moves before preemption: tier 2 preempts least first
            for d in self.batch_order([d for d in wanted if self.pending(d)]):
                self.why.setdefault(d, explain(self.state, d))
                if opts.allow_preemption:
                    self.preempt_for(d)
        return self.plan()

    # ---- CP-SAT ---------------------------------------------------------------------------

    def improve_with_cpsat(self, base: ClusterState, wanted: list[int]) -> None:
        from scheduler.cpsat import improve
        improve(self, base, wanted)

    # ---- preemption and moves -------------------------------------------------------------

    def _victim_ok(self, d: int, victim: int) -> bool:
        deps, state = self.state.deps, self.state
        dep, vdep = deps[d], deps[victim]
        if victim == d or not vdep.preemptible:
            return False
        if vdep.priority < dep.priority:
            return True
        t = int(state.dep_tenant[d])
        below = state.tenant_milli[t] < self.topo.tenant_reserved_milli[t]
        return (not dep.preemptible and below and int(state.dep_tenant[victim]) != t)

    def _cascade(self, state: ClusterState, victims: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Remove victims; a deployment falling below min_replicas loses all its replicas."""
        removed = []
        for v in victims:
            if v in state.replicas:
                state.remove_replica(*v)
                removed.append(v)
        return removed + self._below_min_replicas(state, {v[0] for v in removed})

    @staticmethod
    def _below_min_replicas(state: ClusterState, ds: set[int]) -> list[tuple[int, int]]:
        """Remove every replica of these deployments that fell below min_replicas."""
        out = []
        for vd in sorted(ds):
            left = state.placed_replicas(vd)
            if left and len(left) < state.deps[vd].min_replicas:
                for r in left:
                    state.remove_replica(vd, r)
                    out.append((vd, r))
        return out

    def _make_room(self, d: int, eligible: list[tuple[int, int]], relocate: bool,
                   budget: int, deadline: float | None = None
                   ) -> tuple[ClusterState, list[tuple[int, int]], int] | None:
        """Trial per locality domain: fewest replicas removed (or moved) to fit one replica.

        Returns (trial state with the replica placed, replicas removed, shards moved).
        With a deadline, stops trying domains at it and returns the best found so far."""
        state, topo = self.state, self.topo
        dep = state.deps[d]
        level = dep.locality
        dom = topo.domain_of(level)
        by_domain: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for v in eligible:
            for dm in {int(dom[at.node]) for at in state.replicas[v].values()}:
                by_domain[dm].append(v)
        ranked = sorted(by_domain, key=lambda dm: -sum(
            len(state.replicas[v]) * state.deps[v[0]].shard.milli for v in by_domain[dm]))
        best = None
        r = self.pending(d)[0]
        size = {v: len(state.replicas[v]) * max(state.deps[v[0]].shard.milli, 1)
                for v in eligible}
        orders = (lambda v: (state.deps[v[0]].priority, -size[v], v),  # cheapest work first
                  lambda v: (-size[v], state.deps[v[0]].priority, v))  # biggest holes first
        for dm in ranked[:MAX_PREEMPTION_DOMAINS]:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            allowed = dom == dm
            tries = [sorted(by_domain[dm], key=order) for order in orders]
            here = None
            for victims in tries:
                found = self._trial(d, r, victims, allowed, relocate, budget)
                if found is not None and (here is None or found[0] < here[0]):
                    here = found
            if here is not None and here[0][0] > 1:
                # One victim alone can be enough where the orders took several (its removal
                # clears an exclusion, say): try the first few singly.
                for v in tries[0][:SINGLE_VICTIM_TRIALS]:
                    found = self._trial(d, r, [v], allowed, relocate, budget)
                    if found is not None and found[0] < here[0]:
                        here = found
            if here is not None and (best is None or here[0] < best[0]):
                best = here
        if best is None:
            return None
        return best[1], best[2], best[3]

    def _trial(self, d: int, r: int, victims: list[tuple[int, int]], allowed: np.ndarray,
               relocate: bool, budget: int
               ) -> tuple[tuple[int, int], ClusterState, list[tuple[int, int]], int] | None:
        """Remove victims in order until replica r of d fits in `allowed`; cost or None."""
        state = self.state
        dep = state.deps[d]
        trial = state.copy()
        placer = Placer(trial, scorer="bestfit")
        removed: list[tuple[int, int]] = []
        fitted = False
        for v in victims:
            if v in trial.replicas:
                removed += self._cascade(trial, [v])
            if node_fit(trial, d).slots[allowed].sum() >= dep.shards_per_replica and \
                    placer.place_gang(d, r, list(range(dep.shards_per_replica)), allowed):
                fitted = True
                break
        if not fitted:
            return None
        # min_replicas: the rest of the deployment must reach it in the same trial.
        rest = [x for x in range(dep.replicas) if (d, x) not in trial.replicas]
        placer.place_deployment(d, rest)
        if not trial.placed_replicas(d):
            return None
        if not relocate:
            removed = self._spare_victims(trial, removed)
        moved = 0
        if relocate:  # every removed replica must land again elsewhere
            back = Placer(trial, scorer="bestfit")
            # Those that can go back exactly where they were first: a replica re-placed on
            # its own node must keep its accelerator indices, or it silently changes.
            later = [v for v in removed if not self._restore(trial, v, state.replicas[v])]
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
        return (len(removed), moved), trial, removed, moved

    def _spare_victims(self, trial: ClusterState, removed: list[tuple[int, int]]
                       ) -> list[tuple[int, int]]:
        """Victims the new work did not need after all: put each back where it ran if it
        still fits (latest removed first), then re-apply min_replicas to the victims'
        deployments. Returns the replicas that stay removed."""
        state = self.state
        gone = [v for v in reversed(removed) if not self._restore(trial, v, state.replicas[v])]
        gone.reverse()
        return gone + self._below_min_replicas(trial, {v[0] for v in gone})

    def _restore(self, state: ClusterState, v: tuple[int, int],
                 shards: dict[int, ShardAt]) -> bool:
        """Put a removed replica back on exactly its old nodes and indices if every per-node
        rule still allows it (its node may be cordoned: a node keeps what it has)."""
        d, _ = v
        spec = state.deps[d].shard
        t = int(state.dep_tenant[d])
        excl_ok, iso_ok = tenant_masks(state, t)
        spread_ok = spread_mask(state, d)
        need: dict[tuple[int, int], int] = defaultdict(int)
        host: dict[int, int] = defaultdict(int)
        for at in shards.values():
            n = at.node
            if not (self.topo.node_alive[n] and excl_ok[n] and iso_ok[n]) or \
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
        power = sum(spec.power_w * at.milli * len(at.indices) / 1000.0 for at in shards.values())
        if power > 0:
            racks = {int(self.topo.node_rack[at.node]) for at in shards.values()}
            rows = {int(self.topo.node_row[at.node]) for at in shards.values()}
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

    def _eligible_victims(self, d: int) -> list[tuple[int, int]]:
        # Online decisions are final: only work running before this solve may be evicted.
        online = self.problem.options.mode == "online"
        return [v for v in self.state.replicas if self._victim_ok(d, v[0])
                and (not online or v in self.existing_replicas)]

    def preempt_for(self, d: int) -> None:
        while self.pending(d):
            if time.perf_counter() >= self.deadline:
                self.time_cut.add(d)
                return
            eligible = self._eligible_victims(d)
            if not eligible:
                return
            found = self._make_room(d, eligible, relocate=False, budget=0,
                                    deadline=self.deadline)
            if found is None:
                if time.perf_counter() >= self.deadline:
                    self.time_cut.add(d)
                return
            trial, removed, _ = found
            self._adopt(trial)
            self.preempted += [v for v in removed if v in self.existing_replicas]
            # The rest of the deployment may fit now; min_replicas still applies.
            rest = self.pending(d)
            if rest:
                self.placer.place_deployment(d, rest)
            if not self.pending(d):
                self.why.pop(d, None)

    def preemption_hints(self) -> dict[int, str]:
        """With allow_preemption off: for a few unplaced deployments, the fewest running
        replicas whose preemption would let one more replica fit (a trial on a copy)."""
        if self.problem.options.allow_preemption:
            return {}
        state = self.state
        unplaced = [d for d in range(len(state.deps)) if self.pending(d)]
        if not unplaced:
            return {}  # the common no-op re-read: no scan of every running replica
        running = [v for v in state.replicas
                   if state.deps[v[0]].preemptible and v in self.existing_replicas]
        if not running:
            return {}
        stop = min(self.deadline, time.perf_counter() + HINT_BUDGET_S)
        hints: dict[int, str] = {}
        tried = 0
        for d in self.batch_order(unplaced):
            if tried >= PREEMPTION_HINTS or time.perf_counter() >= stop:
                break
            eligible = [v for v in running if self._victim_ok(d, v[0])]
            if not eligible:
                continue
            tried += 1
            found = self._make_room(d, eligible, relocate=False, budget=0, deadline=stop)
            if found is None:
                continue
            trial, removed, _ = found
            more = len(trial.placed_replicas(d)) - len(state.placed_replicas(d))
            per_dep: dict[str, int] = defaultdict(int)
            for vd, _ in removed:
                per_dep[state.deps[vd].id] += 1
            victims = ", ".join(f"{n} replica{'s' if n > 1 else ''} of {name}" for name, n in
                                sorted(per_dep.items(), key=lambda kv: (-kv[1], kv[0])))
            hints[d] = (f"{more} more replica{'s fit' if more > 1 else ' fits'} after "
                        f"preempting {victims} (allow_preemption is off)")
        return hints

    @staticmethod
    def _with_hint(reasons: tuple[Reason, ...], hint: str) -> tuple[Reason, ...]:
        """Add the hint to the first reason preempting can change (else a CAPACITY one)."""
        for i, r in enumerate(reasons):
            if r.code not in NOT_FREED:
                return reasons[:i] + (Reason(r.code, f"{r.message}; {hint}", r.scope),) + \
                    reasons[i + 1:]
        return reasons + (Reason("CAPACITY", hint),)

    def rebalance(self) -> None:
        """Move existing replicas (within max_moves shards) to fit what did not fit."""
        limit = self.problem.options.max_moves
        budget = limit if limit is not None else 1 << 30
        self.moves_used = 0
        for d in self.batch_order([d for d in range(len(self.state.deps)) if self.pending(d)]):
            while self.pending(d) and budget - self.moves_used > 0:
                if time.perf_counter() >= self.deadline:
                    self.time_cut.add(d)
                    break
                eligible = [v for v in self.state.replicas if v[0] != d]
                found = self._make_room(d, eligible, relocate=True,
                                        budget=budget - self.moves_used,
                                        deadline=self.deadline)
                if found is None:
                    if time.perf_counter() >= self.deadline:
                        self.time_cut.add(d)
                    break
                trial, _, moved = found
                self._adopt(trial)
                self.moves_used += moved
            if not self.pending(d):
                self.why.pop(d, None)

    def _adopt(self, trial: ClusterState) -> None:
        """Make a trial state the real one (the placer follows it)."""
        self.state = trial
        self.placer = Placer(trial, scorer=self.placer.scorer, workload=self.workload)

    # ---- plan -----------------------------------------------------------------------------

    def objective(self, state: ClusterState) -> int:
        """Term 1 of the objective over everything placed (see the module docstring)."""
        return sum(len(rs) * replica_value(state, d, self.min_priority)
                   for d, rs in state.by_dep.items())

    def enforce_min_replicas(self) -> None:
        """Safety net: a deployment below min_replicas runs nothing."""
        for d, dep in enumerate(self.state.deps):
            have = self.state.placed_replicas(d)
            if have and len(have) < dep.min_replicas:
                for r in have:
                    self.state.remove_replica(d, r)

    def plan(self) -> Plan:
        self.enforce_min_replicas()
        state, topo = self.state, self.topo
        deps = state.deps
        placements: list[Placement] = []
        moved: list[Move] = []
        node_index = topo.node_index
        for d, r in sorted(state.replicas):
            shards = state.replicas[(d, r)]
            dep = deps[d]
            given_r = self.given.get((d, r), {})
            loaded = self.loaded.get((d, r))
            if (shards is loaded or shards == loaded) and len(given_r) == len(shards) and \
                    (d, r) not in self.odd_milli:
                # Unchanged since loaded (same nodes, indices, milli): the input's own values.
                placements.extend(given_r[s] for s in sorted(given_r))
                continue
            for s, at in sorted(shards.items()):
                given = given_r.get(s)
                was = node_index[given.node] if given is not None else None
                if given is not None and was == at.node and \
                        tuple(given.accelerator_indices) == tuple(at.indices) and \
                        (given.accelerator_milli is not None) == dep.shard.fractional:
                    placements.append(given)  # unchanged: the input's own value
                    continue
                placements.append(Placement(
                    dep.id, r, s, topo.node_ids[at.node], tuple(at.indices),
                    at.milli if dep.shard.fractional else None))
                if was is not None and (was != at.node or (
                        sorted(given.accelerator_indices) != sorted(at.indices))):  # type: ignore[union-attr]
                    moved.append(Move(dep.id, r, s, topo.node_ids[was], topo.node_ids[at.node]))
        preempted = sorted(set(v for v in self.preempted if v not in state.replicas))
        hints = self.preemption_hints()
        unplaced = []
        new_placed = 0
        time_limited = False
        for d, dep in enumerate(deps):
            missing = len(self.pending(d))
            if missing == 0:
                continue
            reasons = self.why.get(d) or explain(state, d)
            if d in hints:
                reasons = self._with_hint(tuple(reasons), hints[d])
            gone = [r for (dd, r) in preempted if dd == d]
            if gone:
                reasons = (Reason("CAPACITY", f"{len(gone)} replica(s) preempted for "
                                  "higher-priority or reserved work"),) + tuple(reasons)
            if d in self.time_cut:
                reasons = tuple(reasons) + (Reason(
                    "TIME_LIMIT", f"solve stopped at its {self.limit_ms} ms time limit before "
                    f"proving {dep.id} could not be placed; best plan found so far returned"),)
                time_limited = True
            unplaced.append(Unplaced(dep.id, missing, tuple(reasons)))
        for key in state.replicas:
            if key not in self.existing_replicas:
                new_placed += 1
        pending = int(self.stats.get("pending_replicas", 0))
        if pending == 0 and not self.lost:
            status = "optimal"
        elif new_placed == 0 and unplaced and not moved and not time_limited:
            status = "infeasible"  # not when the deadline cut the search: nothing is proved
        elif not unplaced and self.proved_optimal:
            status = "optimal"
        else:
            status = "optimal" if self.proved_optimal else "feasible"
        self.stats["solve_ms"] = (time.perf_counter() - self.t0) * 1000.0
        self.stats.setdefault("objective", self.objective(state))
        self.stats["nodes"] = topo.n_nodes
        self.stats["time_limit_hit"] = time_limited
        return Plan(status=status, placements=tuple(placements), unplaced=tuple(unplaced),
                    preempted=tuple(Preemption(deps[d].id, r) for d, r in preempted),
                    moved=tuple(moved), stats=dict(self.stats))


_gc_lock = threading.Lock()
_gc_depth = 0  # solves running (any thread)
_gc_restore = False  # whether the first of them found the cyclic collector enabled


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while solves run.

    A solve allocates a few container objects per existing placement (ShardAt, per-replica
    dicts, keys) that stay alive until it returns and then die by reference counting. With
    the collector on, those allocations trigger collections that traverse the whole heap (the
    caller's problem included): on a 16,384-node problem about half of a no-op solve. The
    collector is switched back on (if it was on) when the last concurrent solve ends."""
    global _gc_depth, _gc_restore
    with _gc_lock:
        if _gc_depth == 0:
            _gc_restore = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_restore:
                gc.enable()


def plan_value(plan: Plan, problem: Problem) -> tuple[int, int]:
    """What users care about, higher is better: priority-weighted placed demand (term 1 of
    the objective, `replica_value` per placed replica), then fewer preemptions and moves."""
    deps = {d.id: d for d in problem.deployments}
    low = min((d.priority for d in problem.deployments), default=0)
    replicas = {(p.deployment, p.replica) for p in plan.placements}
    placed = sum(deps[d].shards_per_replica * max(deps[d].shard.milli, 1) *
                 (deps[d].priority - low + 1) for d, _ in replicas)
    return placed, -(len(plan.preempted) + len(plan.moved))


def _needs_greedy_guard(problem: Problem) -> bool:
    """Where the stages after CP-SAT (moves, preemption) can undo its advantage: run the
    greedy pipeline too and keep the better plan (`solve`). Plain batch mode compares the
    two inside `cpsat.improve` already; online mode never runs CP-SAT."""
    opts = problem.options
    return opts.mode == "rebalance" or (opts.mode == "batch" and opts.allow_preemption)


def solve(problem: Problem, *, time_limit_ms: int | None = None) -> Plan:
    """Place what the problem asks for; never raises for a valid problem.

    With moves or preemption in play, the greedy pipeline (greedy, moves, preemption; no
    CP-SAT) runs first, then the full one in the time left, and the better plan by
    `plan_value` is returned (ties: the full one): a solver that spends its time limit never
    places less priority-weighted demand than the greedy with moves does."""
    with _cyclic_gc_paused():
        if not _needs_greedy_guard(problem):
            return Solver(problem, time_limit_ms).run()
        full = Solver(problem, time_limit_ms)  # its clock starts now: the whole limit
        deadline = full.deadline
        greedy = Solver(problem, time_limit_ms, use_cpsat=False,
                        deadline=full.t0 + GREEDY_GUARD_SHARE * (deadline - full.t0))
        greedy_plan = greedy.run()
        if time.perf_counter() >= deadline:
            return greedy_plan
        full_plan = full.run()
        g, f = plan_value(greedy_plan, problem), plan_value(full_plan, problem)
        best = full_plan if f >= g else greedy_plan
        best.stats.update({"pipeline": "cpsat" if best is full_plan else "greedy",
                           "greedy_pipeline_value": list(g), "cpsat_pipeline_value": list(f),
                           "solve_ms": (time.perf_counter() - full.t0) * 1000.0})
        return best

"""`solve(problem) -> plan`: the solve's pipeline, run over one `Solver` (the cycle state).

A solve is a fixed pipeline of small stages, each a module with one job (the way a Kubernetes
scheduling cycle runs its extension points and a Nomad evaluation runs its iterator stack):

    load existing placements  (here)         occupancy from the given placements
    repair                    repair.py      shards on down nodes: beside their gang, or pending
    place, by mode:
      online                  (here)         one arrival at a time in listed order, final
      online, batch_size k    online_batch   k arrivals: the best of several orders and of
                              joint_batch    one CP-SAT pairing of the fractions
      batch / rebalance       (here)         greedy (greedy.py) over all pending, priority first
        + improve             cpsat.py       CP-SAT over node classes, kept only if better
        + pair fractions      joint_batch    the new fractions paired again exactly, if better
        + rebalance           rebalance.py   moves (<= max_moves shards) that make room
    preempt                   preemption.py  fewest victims for what still does not fit
    emit the plan             emit.py        placements, moves, preemptions, reasons, status

Every stage reads and writes the `Solver`: the `ClusterState` it owns (replaced wholesale by
`adopt` when a trial on a copy wins), the placer, the reasons (`why`), the deployments whose
search the deadline cut (`time_cut`) and `stats`. Which nodes can take a shard is decided only
by the filter plugins (`filters.NODE_FILTERS`); why not, only by `explain`.

Existing placements that break a hard rule (a dedicated_node tenant sharing its node, a zone
breach, a node past its max_shards, a rack over its power budget, a replica across racks, a
spread or a quota exceeded, ...) are kept, or moved where a stage needs the room, and the status
does not count them: `optimal` says the placement of what was pending, not that the cluster is
clean. `solve(problem, check_kept=True)` lists the breaches the plan keeps in
`stats.kept_violations` (the first 20, each `{rule, scope, tenants, message}`, judged by
`violations.py` over the kept placements alone and, for gangs, locality, spread, models and
quotas, over the replicas they belong to: `emit.kept_violations`) and
`stats.kept_violations_total`; `maiactl solve` asks for it and warns. It is off by default,
and the warm session never runs it: the check costs about as much as a no-op solve on 4,096
nodes (docs/benchmarks.md), and the controller's isolation watchdog reports the isolation and
capacity breaches of stored placements continuously.

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

from scheduler.emit import emit_plan, note_kept_violations
from scheduler.explain import explain
from scheduler.fragmentation import Workload
from scheduler.greedy import Placer
from scheduler.joint_batch import pair_again
from scheduler.model import Placement, Plan, Problem, Reason
from scheduler.online_batch import place_batch
from scheduler.preemption import preempt_for
from scheduler.rebalance import rebalance
from scheduler.repair import repair
from scheduler.room import TrialBudget, own_running, restore
from scheduler.state import ClusterState, ShardAt
from scheduler.topology import build_topology

DEFAULT_TIME_LIMIT_MS = 2000
GREEDY_GUARD_SHARE = 0.5  # of the time limit, for the greedy pipeline that guards CP-SAT's
ROOM_TRIALS = 256  # fewest-replicas trials (moves, preemption) per solve: a count, not a clock


def replica_value(state: ClusterState, d: int, min_priority: int) -> int:
    dep = state.deps[d]
    return dep.shards_per_replica * max(dep.shard.milli, 1) * (dep.priority - min_priority + 1)


class Solver:
    """One solve: the state, the placer and the bookkeeping every stage reads and writes."""

    def __init__(self, problem: Problem, time_limit_ms: int | None, *, use_cpsat: bool = True,
                 deadline: float | None = None, wall_limit_ms: int | None = None) -> None:
        self.t0 = time.perf_counter()
        self.problem = problem
        limit = time_limit_ms or problem.options.time_limit_ms or DEFAULT_TIME_LIMIT_MS
        self.limit_ms = wall_limit_ms or limit  # the wall-clock limit (`solve`)
        self.deadline = self.t0 + self.limit_ms / 1000.0 if deadline is None else deadline
        # The seconds of the limit this solve plans for (CP-SAT's deterministic budget is a
        # share of it, `cpsat.configure`): a count fixed by the input, so the answer does not
        # depend on how fast the earlier stages ran; the deadline is only a ceiling.
        self.budget_s = limit / 1000.0
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
        self.claimants: set[int] = set()  # deployments placed by preempting others (`preemption.eligible_victims`)
        self.why: dict[int, tuple[Reason, ...]] = {}
        self.moves_used = 0
        self.stats: dict[str, object] = {}
        self.proved_optimal = False
        # Lost shards `repair` placed beside their siblings, greedily, before any search: what
        # the model then proves is proved over what that choice left, not the problem.
        self.repaired = False
        # Deployments whose search the deadline cut short (CP-SAT unproved or skipped, a
        # preemption or rebalance loop stopped): TIME_LIMIT if they end up unplaced.
        self.time_cut: set[int] = set()
        # Deployments whose preemption search ran out of `room_trials` before they were placed
        # whole (not the clock): the same solve again gives the same plan; another solve of the
        # cluster that plan leaves goes on (TIME_LIMIT reason: the controller solves again).
        self.trials_cut: set[int] = set()
        # Trials the move and preemption searches may still run (`room.TrialBudget`): where
        # this ends a search, not the deadline, repeated solves give the same plan.
        self.room_trials = TrialBudget(ROOM_TRIALS)
        # The guard's greedy pipeline (`solve`), when it ran every stage to its end: the
        # stages after CP-SAT repeat it exactly if CP-SAT kept the greedy answer.
        self.repeats: Solver | None = None
        self._load_existing()

    # ---- setup ----------------------------------------------------------------------------

    def _load_existing(self) -> None:
        topo, state = self.topo, self.state
        groups: dict[tuple[int, int], dict[int, ShardAt]] = {}
        given = self.given
        lost: dict[tuple[int, int], list[int]] = defaultdict(list)
        alive = topo.node_alive.tolist()
        failed = topo.node_failed  # a shard on one is lost as on a down node
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
            if not alive[n] or (n in failed and not failed[n].isdisjoint(p.accelerator_indices)):
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

    def placeable(self, d: int) -> list[int]:
        """Pending replicas of d this solve may place: not an existing one it preempted
        (placing that again elsewhere would be a move, which only rebalance makes, and
        rebalance runs before any preemption); it stays reported as preempted."""
        todo = self.pending(d)
        if not self.preempted or not todo:
            return todo
        gone = set(self.preempted)
        return [r for r in todo if (d, r) not in gone]

    def replica_value(self, d: int) -> int:
        """Term 1 weight of one replica of deployment d (see the module docstring)."""
        return replica_value(self.state, d, self.min_priority)

    def objective(self, state: ClusterState) -> int:
        """Term 1 of the objective over everything placed (see the module docstring)."""
        return sum(len(rs) * replica_value(state, d, self.min_priority)
                   for d, rs in state.by_dep.items())

    def batch_order(self, ds: list[int]) -> list[int]:
        """Priority first; of one priority, work that is not preemptible first (preemptible work
        placed before it would yield to it at once: a reserved claim preempts it), then the
        biggest replicas first."""
        deps = self.state.deps
        return sorted(ds, key=lambda d: (-deps[d].priority, deps[d].preemptible,
                                         -deps[d].shards_per_replica * max(deps[d].shard.milli, 1),
                                         d))

    def late(self, d: int) -> bool:
        """Past the deadline? Then deployment d's search was cut short (TIME_LIMIT), by the
        clock rather than its trial budget (`stats.clock_cut`: the plan may differ on a faster
        machine, even when d ends up placed)."""
        if time.perf_counter() < self.deadline:
            return False
        self.time_cut.add(d)
        self.stats["clock_cut"] = True
        return True

    def adopt(self, state: ClusterState) -> None:
        """Make this state the solve's (a trial that won); the placer follows it."""
        self.state = state
        self.placer = Placer(state, scorer=self.placer.scores.scorer, workload=self.workload)

    # ---- the pipeline ---------------------------------------------------------------------

    def run(self) -> Plan:
        opts = self.problem.options
        repair(self)
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
                    place_batch(self, group, i // k)
        elif wanted:
            base = self.state.copy()
            self.place_group(wanted, preempt=False)
            greedy_state = self.state
            if self.use_cpsat and (any(self.pending(d) for d in wanted) or len(wanted) > 1):
                self.improve_with_cpsat(base, wanted)
                pair_again(self, wanted)
            if self.state is greedy_state and self.repeats is not None:
                self.take_over(self.repeats)
                return emit_plan(self)
            if opts.mode == "rebalance":
                self.rebalance()  # moves before preemption: tier 2 preempts least first
            evicted = len(self.preempted)
            told: dict[int, int] = {}  # the preemptions made when each one's reasons were worked out
            for d in self.batch_order([d for d in wanted if self.pending(d)]):
                if len(self.preempted) > evicted:
                    # A claim before it preempted: what that freed and its claim left is taken before
                    # preempting more (it went unused: a reserved claim then evicted new work for it).
                    self._take_freed(d)
                    if not self.pending(d):
                        self.why.pop(d, None)
                        continue
                if d not in self.why or len(self.preempted) > evicted:
                    self.why[d] = explain(self.state, d)
                told[d] = len(self.preempted)
                if opts.allow_preemption:
                    preempt_for(self, d)
            # Reasons worked out before a later preemption say a cluster that is no more.
            self.why.update((d, explain(self.state, d)) for d, at in told.items()
                            if at < len(self.preempted) and self.pending(d))
        return emit_plan(self)

    def _take_freed(self, d: int) -> None:
        """Place what of d fits now, its running replicas that min_replicas took away back where
        they ran first (`own_running`): placed anew they would move. When one's place is taken,
        none is placed (as before: it waits for a preemption, which puts them back)."""
        own = own_running(self, d)
        for x, shards in own.items():
            if not restore(self.state, (d, x), shards):
                for y in own:
                    if (d, y) in self.state.replicas:
                        self.state.remove_replica(d, y)
                return
        self.placer.place_deployment(d, self.placeable(d))

    def take_over(self, other: Solver) -> None:
        """The stages after CP-SAT would repeat `other`'s (the same problem, the greedy
        answer kept, the same deterministic searches, which `other` ran to their end): take
        its outcome instead of running them again. What CP-SAT found out (its statistics,
        the deployments its deadline cut short) stays this solve's."""
        self.adopt(other.state)
        self.why = dict(other.why)
        self.preempted = list(other.preempted)
        self.claimants = set(other.claimants)
        self.moves_used = other.moves_used
        self.time_cut |= other.time_cut
        self.trials_cut |= other.trials_cut
        self.stats["after_cpsat"] = "the greedy pipeline's moves and preemptions (same state)"

    def place_group(self, ds: list[int], preempt: bool = True) -> None:
        """Greedy over these deployments, priority first, biggest first; but first the
        replicas that running deployments short of min_replicas need to reach it (a down node
        broke one, or min_replicas was raised). Short of them, min_replicas would take the
        running replicas away too: running work is not dropped to make room for new work
        (only preemption evicts it, and reports it). A deployment that cannot reach its
        minimum even so runs nothing, and is not placed afresh in the second pass (that
        would move its running replicas)."""
        for d in ds:
            self.workload.observe(self.state.deps[d].shard, self.state.deps[d].replicas)
        short = {d: self.state.short_of_min(d) for d in ds}
        dropped: set[int] = set()
        for d in self.batch_order([d for d in ds if short[d]]):
            self.place_one(d, preempt, limit=short[d])
            if not self.state.by_dep.get(d):
                dropped.add(d)
        for d in self.batch_order([d for d in ds if d not in dropped]):
            self.place_one(d, preempt)

    def place_one(self, d: int, preempt: bool = True, limit: int | None = None) -> None:
        """Place deployment d's pending replicas (the first `limit` of them), preempting for
        them where allowed."""
        todo = self.placeable(d)[:limit]
        if not todo:
            return
        placed = self.placer.place_deployment(d, todo)
        if len(placed) < len(todo):
            if not preempt:
                # Said of the cluster the solve ends with (the batch's last stage, or `emit`):
                # worked out now, it said the greedy's answer, and CP-SAT's, the pairing's or the
                # moves' answer adopted since was another (a rack told to hold a tenant the plan
                # put elsewhere), as were the deployments the greedy placed after this one.
                self.why.pop(d, None)
                return
            self.why[d] = explain(self.state, d)
            if self.problem.options.allow_preemption:
                preempt_for(self, d)

    def improve_with_cpsat(self, base: ClusterState, wanted: list[int]) -> None:
        """Stage: CP-SAT over node classes from `base` (the state before the greedy)."""
        from scheduler.cpsat import improve
        improve(self, base, wanted)

    def rebalance(self) -> None:
        """Stage: moves within max_moves that make room for what is pending."""
        rebalance(self)


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


def solve(problem: Problem, *, time_limit_ms: int | None = None,
          wall_limit_ms: int | None = None, check_kept: bool = False) -> Plan:
    """Place what the problem asks for; never raises for a valid problem.

    The searches stop at budgets planned for `time_limit_ms` (the problem's by default):
    deterministic time and trial counts, the same on any machine. The wall clock stops the
    solve at `wall_limit_ms` (`time_limit_ms` by default); on a loaded machine it may stop a
    search first, or shape CP-SAT's multi-worker search when its ceiling comes near (even one
    that ends OPTIMAL: another of the equal answers), and then the plan can differ. A caller
    that needs the same plan on any machine (the golden plans) gives a wall limit far above
    the time limit.

    With moves or preemption in play, the greedy pipeline (greedy, moves, preemption; no
    CP-SAT) runs first, then the full one in the time left, and the better plan by
    `plan_value` is returned (ties: the full one): a solver that spends its time limit never
    places less priority-weighted demand than the greedy with moves does.

    With `check_kept`, the plan's stats also list the existing placements it keeps that break
    a hard rule (`emit.note_kept_violations`; the module docstring says why it is asked for)."""
    plan = _solve(problem, time_limit_ms, wall_limit_ms)
    if check_kept:
        note_kept_violations(problem, plan)
    return plan


def _solve(problem: Problem, time_limit_ms: int | None, wall_limit_ms: int | None) -> Plan:
    with _cyclic_gc_paused():
        if not _needs_greedy_guard(problem):
            return Solver(problem, time_limit_ms, wall_limit_ms=wall_limit_ms).run()
        # Its clock starts now: the whole limit.
        full = Solver(problem, time_limit_ms, wall_limit_ms=wall_limit_ms)
        full.budget_s *= 1.0 - GREEDY_GUARD_SHARE  # planned for what the greedy leaves
        deadline = full.deadline
        greedy = Solver(problem, time_limit_ms, use_cpsat=False,
                        deadline=full.t0 + GREEDY_GUARD_SHARE * (deadline - full.t0))
        greedy_plan = greedy.run()
        if time.perf_counter() >= deadline:
            return greedy_plan
        if time.perf_counter() < greedy.deadline:  # no stage of it was cut short
            full.repeats = greedy
        full_plan = full.run()
        g, f = plan_value(greedy_plan, problem), plan_value(full_plan, problem)
        best = full_plan if f >= g else greedy_plan
        best.stats.update({"pipeline": "cpsat" if best is full_plan else "greedy",
                           "greedy_pipeline_value": list(g), "cpsat_pipeline_value": list(f),
                           "solve_ms": (time.perf_counter() - full.t0) * 1000.0})
        return best

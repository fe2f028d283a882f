"""A warm scheduling session: the cluster loaded once and kept, decisions applied to it.

`solve(problem)` rebuilds the whole cluster (topology, occupancy, every placement) on every
call: right for files and what-ifs, wrong for a scheduler meeting arrivals one by one. A
`Session` builds that state once from a `Problem` and keeps it; each decision then costs the
decision (one pass of the node filters, the domain choice, the indices), not a re-read.

It is not a second solver: the session owns one long-lived `Solver` (solve.py) in online mode
and drives the same stages a `solve()` runs. An arrival is `Solver.place_one` (the greedy
placer, `explain`, preemption when the options allow it); what is left unplaced is worded by
`emit.unplaced_with_reasons`; a node going down or disappearing is `repair`. So the
constraints, reason codes and messages are those of `solve()`.

Changes arrive as deltas:
  * `place(deployment)`      an arrival (or a known deployment tried again), decided at once;
  * `adopt(deployment, placements)`  replicas placed elsewhere (a full `solve()` whose plan was
                             committed), recorded where they are;
  * `release(id, replicas)`  departures: the replicas' placements are taken out;
  * `replace(deployment, placements)`  a deployment changed elsewhere (updated, replicas
                             released or retired), held as given from now on;
  * `nominate(nominations)`  nodes kept for deployments waiting at the head of the line
                             (`nominees` says which to keep for one), updated in place;
  * `apply(ClusterDelta)`    nodes, tenants (contracts) and domains added or changed, nodes
                             removed. A node flipped between `ready` and `cordoned` is updated
                             in place; anything that changes the shape of the indexes (a new
                             node, a resource change, a node going down, a contract) rebuilds
                             them from the session's own state, in memory, once per delta
                             (~2x the cost of loading the session: 145 ms on 4,096 nodes and
                             ~10,000 shards), then repairs what lost shards (coalesce changes
                             into one delta). New nodes keep a problem listed by node id so
                             (as a fresh read lists them), else they come last.
Where the session may differ from `solve()` on the same state:
  * single-shard scoring learns the workload from every arrival the session has seen (as one
    online `solve()` does over its listed arrivals), not just the deployments of one problem,
    so the node chosen may differ (both choices are valid; with `MAIA_SCORER=bestfit` they are
    identical);
  * with preemption allowed, every replica placed before the decision may be a victim (a
    session's earlier decisions are committed), where one online `solve()` protects the
    arrivals it placed itself;
  * a gang repaired after its node went down (or was removed) is placed again without
    preempting anything; `solve()` may preempt for it (and then report the victim re-placed
    as moves in online mode, which the independent checker refuses).

A session is not thread-safe: one owner (the controller's scheduling loop) drives it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import numpy as np

from scheduler.emit import unplaced_with_reasons
from scheduler.decisions import ClusterDelta, Decision
from scheduler.errors import ProblemError
from scheduler.model import Deployment, Move, Node, Nomination, Options, Placement, Preemption, Problem
from scheduler.nominate import choose_nodes
from scheduler.repair import repair
from scheduler.room import TrialBudget
from scheduler.solve import DEFAULT_TIME_LIMIT_MS, Solver
from scheduler.state import ShardAt

# Departed deployments keep their index (a tombstone with no replicas) until this many have
# piled up, and more than there are live ones: then the indexes are rebuilt without them.
COMPACT_AFTER = 1024
# What may change about a known deployment without placing it anew.
_SCALABLE = ("replicas", "min_replicas", "priority", "preemptible")


def _scaled_only(old: Deployment, new: Deployment) -> bool:
    """Whether `new` differs from `old` in `_SCALABLE` fields alone (changed in place)."""
    return dataclasses.replace(old, **{f: getattr(new, f) for f in _SCALABLE}) == new


class Session:
    """The cluster as of its last decision, kept warm between decisions."""

    def __init__(self, problem: Problem, *, time_limit_ms: int | None = None) -> None:
        self.time_limit_ms = (time_limit_ms or problem.options.time_limit_ms
                              or DEFAULT_TIME_LIMIT_MS)
        self.options = Options(mode="online", time_limit_ms=self.time_limit_ms,
                               allow_preemption=problem.options.allow_preemption)
        self._zones = {z.id: z for z in problem.zones}
        self._rows = {r.id: r for r in problem.rows}
        self._racks = {r.id: r for r in problem.racks}
        self._nodes = {n.id: n for n in problem.nodes}
        self._tenants = {t.id: t for t in problem.tenants}
        self.rebuilds = 0  # times the indexes were rebuilt from memory (structural deltas)
        self._solver = self._new_solver(dataclasses.replace(problem, options=self.options))
        self._gone: set[int] = set()  # departed deployments' indices (tombstones)
        self._lost_from: dict[tuple[str, int, int], str] = {}
        # Shards the problem had on down nodes, repaired as solve() would (moves, re-placed).
        self.repaired_at_load: list[Decision] = self._repair()

    # ---- decisions ------------------------------------------------------------------------

    def place(self, deployment: Deployment | str) -> Decision:
        """Place what a deployment is missing, now: an arrival (a new `Deployment`), a known
        one changed in replicas/min_replicas/priority/preemptible, or a known id tried again.
        Its replicas are placed whole or not at all, online (final once placed). A known one
        scaled down releases its replicas beyond the new count: the decision says them
        `released` with those the decision itself stopped."""
        if isinstance(deployment, str):
            return self._decide(self._index(deployment))
        d, extra = self._upsert(deployment)
        decision = self._decide(d)
        if not extra:
            return decision
        return dataclasses.replace(decision, released=tuple(sorted({*extra, *decision.released})))

    def nominate(self, nominations: Iterable[Nomination]) -> None:
        """Replace the nominations (the problem's `nominations`, `model.Nomination`): nodes kept
        for deployments waiting at the head of the line. Nodes unknown to the session are left
        out; the nodes whose nomination changed are judged again."""
        changed = self._solver.topo.nominate(tuple(nominations))
        if len(changed):
            self._solver.state.touch(changed)

    def nominees(self, deployment: Deployment | str, zones_apart: bool = False) -> tuple[str, ...]:
        """The nodes to nominate for a deployment (`nominate.choose_nodes`): a known id, or a
        `Deployment` recorded now (as an arrival, not decided). Empty when nominating would not
        help it (it needs no accelerator, or no domain could hold a replica however empty; with
        `zones_apart`, none in a zone where no other deployment holds nominated nodes) and for
        an id the session does not know (a caller in another process asks without failing its
        session)."""
        if isinstance(deployment, str) and deployment not in self:
            return ()
        d = self._index(deployment) if isinstance(deployment, str) else self._upsert(deployment)[0]
        ids = self._solver.topo.node_ids
        return tuple(ids[n] for n in choose_nodes(self._solver.state, d, zones_apart=zones_apart))

    def release(self, deployment: str, replicas: list[int] | None = None) -> None:
        """Departures: these replicas of a deployment stop (None: the deployment is gone)."""
        d = self._index(deployment)
        s = self._solver
        state = s.state
        rs = sorted(state.by_dep.get(d, ())) if replicas is None else replicas
        touched: set[int] = set()
        for r in rs:
            for at in state.remove_replica(d, r).values():
                touched.add(at.node)
        self._not_running(d, rs)
        s.placer.refresh_nodes(np.array(sorted(touched), dtype=np.int64))
        if replicas is None:
            self._forget(d)

    def adopt(self, deployment: Deployment, placements: Iterable[Placement]) -> None:
        """Record replicas placed elsewhere (whole replicas; a replica the session holds is
        replaced), e.g. from a committed `solve()` plan: the state follows without deciding."""
        d, _ = self._upsert(deployment)
        s = self._solver
        state, node_index = s.state, s.topo.node_index
        replicas: dict[int, dict[int, ShardAt]] = {}
        given: dict[int, dict[int, Placement]] = {}
        for p in placements:
            milli = p.accelerator_milli
            replicas.setdefault(p.replica, {})[p.shard] = ShardAt(
                node_index[p.node], tuple(p.accelerator_indices), 1000 if milli is None else milli)
            given.setdefault(p.replica, {})[p.shard] = p
        touched: set[int] = set()
        for r, shards in replicas.items():
            if (d, r) in state.replicas:
                touched.update(at.node for at in state.remove_replica(d, r).values())
            state.add_replica(d, r, shards)
            s.existing_replicas.add((d, r))
            s.given[(d, r)], s.loaded[(d, r)] = given[r], shards
            touched.update(at.node for at in shards.values())
        state.static_cache.pop(d, None)
        s.placer.refresh_nodes(np.array(sorted(touched), dtype=np.int64))

    def replace(self, deployment: Deployment, placements: Iterable[Placement]) -> None:
        """A deployment changed elsewhere (a committed update, replicas released or retired):
        held as given from now on, its replicas where `placements` say (the rest pending). A
        change of more than its scalable fields makes it a new deployment of the same id."""
        d = self._solver.topo.deployment_index.get(deployment.id)
        if d is not None:
            old = self._solver.state.deps[d]
            self.release(deployment.id, self.placed_replicas(deployment.id) if _scaled_only(old, deployment) else None)
        self.adopt(deployment, placements)

    def apply(self, delta: ClusterDelta) -> list[Decision]:
        """Apply cluster changes; the decisions repairing what they displaced (if any)."""
        cordons = self._cordons_only(delta)
        ids = list(self._nodes)
        for n in delta.nodes:
            self._nodes[n.id] = n
        if len(self._nodes) > len(ids) and all(a < b for a, b in zip(ids, ids[1:])):
            self._nodes = dict(sorted(self._nodes.items()))  # a problem listed by id stays so
        if cordons is not None:
            topo = self._solver.topo
            flipped = np.array([topo.node_index[n.id] for n in cordons], dtype=np.int64)
            for i, n in zip(flipped.tolist(), cordons):
                topo.node_ready[i] = n.state == "ready"
                topo.node_condition[i] = n.condition
            self._solver.state.touch(flipped)  # the placer's kept candidates judge them again
            return []
        for z in delta.zones:
            self._zones[z.id] = z
        for w in delta.rows:
            self._rows[w.id] = w
        for r in delta.racks:
            self._racks[r.id] = r
        for t in delta.tenants:
            self._tenants[t.id] = t
        for nid in delta.removed_nodes:
            self._nodes.pop(nid, None)
        self._rebuild()
        return self._repair()

    def displaced_by(self, delta: ClusterDelta) -> list[str]:
        """The deployments `apply(delta)` may repair, one decision each (each may search to the
        time limit: the preemption hint of one left short): those holding a shard on a node the
        delta removes or changes beyond a cordon flip. None for tenants, topology or cordons."""
        if self._cordons_only(delta) is not None:
            return []
        index = self._solver.topo.node_index
        touched = {index[n] for n in (*(n.id for n in delta.nodes), *delta.removed_nodes) if n in index}
        state = self._solver.state
        return sorted({state.deps[d].id for (d, _), shards in state.replicas.items()
                       if any(at.node in touched for at in shards.values())})

    @staticmethod
    def repairs_at_load(problem: Problem) -> list[str]:
        """The deployments `Session(problem)` repairs as it loads (`repaired_at_load`), one
        decision each, as `displaced_by` says for `apply`, but known before the session is built:
        those with a replica short of shards on nodes that are not down and accelerators that
        have not failed (the shards the solver's load takes as lost or missing)."""
        nodes = {n.id: n for n in problem.nodes}
        standing: dict[tuple[str, int], set[int]] = {}  # per replica placed, its shards that stand
        for p in problem.placements:
            node = nodes[p.node]
            shards = standing.setdefault((p.deployment, p.replica), set())
            if node.state != "down" and not set(node.unhealthy_accelerators) & set(p.accelerator_indices):
                shards.add(p.shard)
        per_replica = {d.id: d.shards_per_replica for d in problem.deployments}
        return sorted({dep for (dep, _), stand in standing.items() if len(stand) < per_replica[dep]})

    # ---- what the session holds -------------------------------------------------------------

    def snapshot(self) -> Problem:
        """The cluster now, as a problem: every node, tenant, live deployment and placement
        (online mode, this session's preemption option). `solve()` or the checker can take it."""
        s = self._solver
        deps = s.state.deps
        placements = [p for (d, r), shards in sorted(s.state.replicas.items())
                      for p in self._placements(d, r, shards)]
        return Problem(
            nodes=tuple(self._nodes.values()),
            deployments=tuple(dep for d, dep in enumerate(deps) if d not in self._gone),
            zones=tuple(self._zones.values()), rows=tuple(self._rows.values()),
            racks=tuple(self._racks.values()), tenants=tuple(self._tenants.values()),
            placements=tuple(placements), options=self.options,
            nominations=tuple(s.topo.nominations))

    def placements_of(self, deployment: str) -> tuple[Placement, ...]:
        """Where the session holds a deployment's shards now, by replica and shard."""
        d = self._index(deployment)
        state = self._solver.state
        return tuple(p for r in state.placed_replicas(d) for p in self._placements(d, r, state.replicas[(d, r)]))

    def _placements(self, d: int, r: int, shards: dict[int, ShardAt]) -> list[Placement]:
        dep, ids = self._solver.state.deps[d], self._solver.topo.node_ids
        frac = dep.shard.fractional
        return [Placement(dep.id, r, sh, ids[at.node], tuple(at.indices), at.milli if frac else None)
                for sh, at in sorted(shards.items())]

    def pending(self) -> list[str]:
        """Deployments still short of replicas (unplaceable so far, or preempted)."""
        s = self._solver
        return [dep.id for d, dep in enumerate(s.state.deps)
                if d not in self._gone and s.pending(d)]

    def placed_replicas(self, deployment: str) -> list[int]:
        return self._solver.state.placed_replicas(self._index(deployment))

    def __contains__(self, deployment: str) -> bool:
        return deployment in self._solver.topo.deployment_index

    # ---- internals --------------------------------------------------------------------------

    def _new_solver(self, problem: Problem) -> Solver:
        previous = getattr(self, "_solver", None)
        solver = Solver(problem, self.time_limit_ms)
        if previous is not None:  # keep what single-shard scoring learnt of the workload
            workload = previous.workload
            workload.bind_models(solver.topo.node_model)
            if workload.counts:
                workload.refresh()
            solver.workload = workload
            solver.placer.scores.workload = workload
        return solver

    def _index(self, deployment: str) -> int:
        d = self._solver.topo.deployment_index.get(deployment)
        if d is None:
            raise ProblemError("deployment", deployment, "unknown deployment")
        return d

    def _upsert(self, dep: Deployment) -> tuple[int, list[int]]:
        """Record `dep` (new, or a known one changed in `_SCALABLE` fields only): its index, and
        the replicas released for it (a scale-down's beyond the new count)."""
        s = self._solver
        if dep.tenant not in s.topo.tenant_index:
            raise ProblemError(f"deployment {dep.id}.tenant", dep.tenant,
                               "unknown tenant (apply a ClusterDelta with the tenant first)")
        d = s.topo.deployment_index.get(dep.id)
        if d is None:
            d = s.state.add_deployment(dep)
            s.workload.observe(dep.shard, dep.replicas)
            return d, []
        old = s.state.deps[d]
        if old == dep:
            return d, []
        if not _scaled_only(old, dep):
            raise ProblemError(f"deployment {dep.id}", dep.id,
                               f"only {', '.join(_SCALABLE)} may change in place; release it "
                               "and place the new one")
        s.state.deps[d] = dep
        extra = sorted(r for r in s.state.by_dep.get(d, ()) if r >= dep.replicas)
        if extra:
            self.release(dep.id, extra)
        return d, extra

    def _decide(self, d: int, preempt: bool = True) -> Decision:
        """`Solver.place_one` on the warm state, and the decision it made."""
        s = self._solver
        dep = s.state.deps[d]
        before = {r: s.state.replicas[(d, r)] for r in s.state.by_dep.get(d, ())}
        s.deadline = time.perf_counter() + self.time_limit_ms / 1000.0
        s.why.pop(d, None)
        s.time_cut.clear()
        s.trials_cut.clear()
        s.room_trials = TrialBudget(s.room_trials.total)  # a decision's, as a solve's (not the session's life)
        s.preempted = []
        s.place_one(d, preempt)
        state = s.state  # preemption may have adopted a trial state
        after = state.by_dep.get(d, set())
        # Replicas it placed (held anew: each trial's state has its own); one a trial took out
        # and put back where it ran is held anew, not placed.
        held = sorted(r for r in after if state.replicas[(d, r)] is not before.get(r))
        new = [r for r in held if state.replicas[(d, r)] != before.get(r)]
        frac = dep.shard.fractional
        ids = s.topo.node_ids
        placements = tuple(
            Placement(dep.id, r, sh, ids[at.node], tuple(at.indices), at.milli if frac else None)
            for r in new for sh, at in sorted(state.replicas[(d, r)].items()))
        self._now_running(d, held, placements)
        released = sorted(set(before) - after)
        self._not_running(d, released)
        victims = sorted({v for v in s.preempted if v not in state.replicas})
        for vd, vr in victims:
            self._not_running(vd, (vr,))
        unplaced, _ = unplaced_with_reasons(s, victims, only=[d])
        state.static_cache.pop(d, None)  # per-deployment masks: rebuilt when next needed
        return Decision(
            deployment=dep.id, placements=placements,
            unplaced=unplaced[0] if unplaced else None,
            preempted=tuple(Preemption(state.deps[vd].id, vr) for vd, vr in victims),
            released=tuple(released))

    def _now_running(self, d: int, replicas: Iterable[int], placements: Iterable[Placement] = ()) -> None:
        """These replicas of d run where the state has them now (`placements`: theirs, as the
        decision says them). What the solver knows of running replicas follows: `loaded` (where
        a replica taken out short of min_replicas is put back: `room.own_running`) and `given`
        (a replica a batch stage may not move: `defer`, `joint_batch`). Kept only as loaded, a
        replica this session placed or adopted was put back from scratch, a move without a
        `moved` entry, and one it released since was put back on a node taken meanwhile, which
        blocked every preemption trial (found in review). A replica whose shards `placements`
        does not all say is said from the state."""
        s = self._solver
        rs = set(replicas)
        given: dict[int, dict[int, Placement]] = {r: {} for r in rs}
        for p in placements:
            if p.replica in given:
                given[p.replica][p.shard] = p
        for r in rs:
            shards = s.state.replicas[(d, r)]
            if len(given[r]) != len(shards):
                given[r] = {p.shard: p for p in self._placements(d, r, shards)}
            s.existing_replicas.add((d, r))
            s.loaded[(d, r)] = shards
            s.given[(d, r)] = given[r]

    def _not_running(self, d: int, replicas: Iterable[int]) -> None:
        """These replicas of d run no more (released, preempted, stopped short of min_replicas)."""
        s = self._solver
        for r in replicas:
            s.existing_replicas.discard((d, r))
            s.loaded.pop((d, r), None)
            s.given.pop((d, r), None)

    def _forget(self, d: int) -> None:
        """A departed deployment: a tombstone with no replicas; compact when many pile up."""
        s = self._solver
        dep = s.state.deps[d]
        s.state.deps[d] = dataclasses.replace(dep, replicas=0, min_replicas=0)
        s.topo.deployment_index.pop(dep.id, None)
        s.state.static_cache.pop(d, None)
        s.why.pop(d, None)
        self._gone.add(d)
        if len(self._gone) > max(COMPACT_AFTER, len(s.state.deps) - len(self._gone)):
            self._rebuild()

    def _cordons_only(self, delta: ClusterDelta) -> list[Node] | None:
        """The delta's nodes when all it does is flip known nodes between ready and cordoned, or
        change their `condition` (updated in place); None when the indexes must be rebuilt."""
        if delta.removed_nodes or delta.tenants or delta.zones or delta.rows or delta.racks:
            return None
        for n in delta.nodes:
            old = self._nodes.get(n.id)
            if old is None or dataclasses.replace(old, state=n.state, condition=n.condition) != n or \
                    "down" in (old.state, n.state):
                return None
        return list(delta.nodes)

    def _rebuild(self) -> None:
        """Build the indexes again from the session's own state (no re-read): for changes
        that reshape them. Shards on removed nodes, or on accelerators a node no longer has,
        are dropped here and repaired (`_repair`) like shards on a down node (and those on
        accelerators that failed, by the new solver's load: `Solver._load_existing`)."""
        problem = self.snapshot()
        nodes = self._nodes
        kept: list[Placement] = []
        self._lost_from = {}
        for p in problem.placements:
            node = nodes.get(p.node)
            if node is not None and all(i < node.accelerators for i in p.accelerator_indices):
                kept.append(p)
            else:
                self._lost_from[(p.deployment, p.replica, p.shard)] = p.node
        solver = self._new_solver(dataclasses.replace(problem, placements=tuple(kept)))
        # Replicas that lost every shard are unknown to the new solver: lost all the same
        # (a deployment may fall below min_replicas, as with a down node).
        index = solver.topo.deployment_index
        for dep_id, r, sh in self._lost_from:
            shards = solver.lost.setdefault((index[dep_id], r), [])
            if sh not in shards:
                shards.append(sh)
        self._solver = solver
        self._gone = set()
        self.rebuilds += 1

    def _repair(self) -> list[Decision]:
        """Replicas that lost shards (down, removed or shrunk nodes): `repair` re-places the
        lost shards beside their gang, or takes the gang out; gangs taken out are placed again
        whole, without preempting (a gang that no longer fits stays pending; `place` it again
        to let it preempt, as new work). One decision per deployment concerned."""
        s = self._solver
        lost = dict(s.lost)
        if not lost:
            return []
        gone_from = self._lost_from
        was = {(d, r, sh): s.given[(d, r)][sh].node if sh in s.given.get((d, r), {})
               else gone_from.get((s.state.deps[d].id, r, sh))
               for (d, r), shards in lost.items() for sh in shards}
        repair(s)
        s.lost = {}
        self._lost_from = {}
        decisions = []
        ids = s.topo.node_ids
        for d in sorted({d for d, _ in lost}):
            dep = s.state.deps[d]
            frac = dep.shard.fractional
            fixed: list[Placement] = []
            moved: list[Move] = []
            taken_out = set()
            for r in sorted(r for dd, r in lost if dd == d):
                if (d, r) not in s.state.replicas:
                    taken_out.add(r)  # placed again whole below, if it fits
                    continue
                for sh in sorted(lost[(d, r)]):
                    at: ShardAt = s.state.replicas[(d, r)][sh]
                    fixed.append(Placement(dep.id, r, sh, ids[at.node], tuple(at.indices),
                                           at.milli if frac else None))
                    if was.get((d, r, sh)) is not None:
                        moved.append(Move(dep.id, r, sh, was[(d, r, sh)], ids[at.node]))
            decision = self._decide(d, preempt=False)
            # A replica repaired above that this decision stopped again (short of min_replicas,
            # the deployment keeps none): neither placed nor moved.
            still = set(s.state.placed_replicas(d))
            fixed = [p for p in fixed if p.replica in still]
            moved = [m for m in moved if m.replica in still]
            again = {(p.replica, p.shard): p for p in decision.placements}
            for (r, sh), p in sorted(again.items()):
                if was.get((d, r, sh)) is not None and was[(d, r, sh)] != p.node:
                    moved.append(Move(dep.id, r, sh, was[(d, r, sh)], p.node))
            released = taken_out - {p.replica for p in decision.placements}
            self._now_running(d, {p.replica for p in fixed})  # repaired where the state has them
            self._not_running(d, released)
            decisions.append(dataclasses.replace(
                decision, placements=tuple(fixed) + decision.placements, moved=tuple(moved),
                released=tuple(sorted(released | set(decision.released)))))
        return decisions

"""A plan's changes to the snapshot it was solved from, replica by replica, re-checked.

`_check` turns a plan into what a commit writes (`_Changes`) against one read of the committed
state (plans/committed.py): a replica the plan leaves as it was, nothing; one someone else
changed since the snapshot, turned away (`CHANGED_SINCE`); one removed, removed; one placed or
moved, judged again by the scheduler's rules (`_recheck`) against the committed state, with the
specs and nodes of the snapshot's document (`_spec_doc`) or of one read again when it is stale.
The rules themselves are store/recheck.py's (pure, no database); this module gathers what they
judge by, maps the plan's solver deployments back to stored keys (`_solver_ids`), and decides
whether a re-check runs on the event loop or in a worker thread (`RECHECK_ON_LOOP_MAX`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.metering import NodeMeter, node_meters
from controller.store.recheck import ReplicaKey, Unread, recheck
from controller.store.rollout import SolverRef, outgoing_id, stored_key
from controller.store.snapshot import ShardKey, Snapshot, Where, load_spec_doc
from controller.store.plans.committed import _Committed, _Row, _where
from controller.store.plans.neighbours import (_judged_alone, _neighbours, _read_racks, _read_unread,
    _snapshot_neighbours, _snapshot_racks, _specs_since)

if TYPE_CHECKING:  # the controller may import the solver's types; it never needs them at run time
    from scheduler import Plan


CHANGED_SINCE = "changed by another commit since the plan's snapshot"


TEMPLATE_REPLACED = "the deployment's template changed since the plan's snapshot"


@dataclass
class _Changes:
    """What of a plan is written: rows to insert (with their revision), move and delete;
    replicas turned away."""

    inserts: dict[ShardKey, Any] = field(default_factory=dict)
    revision_of: dict[ShardKey, int] = field(default_factory=dict)
    updates: list[tuple[_Row, Any]] = field(default_factory=list)
    deletes: list[_Row] = field(default_factory=list)
    requeued: dict[ReplicaKey, tuple[str, ...]] = field(default_factory=dict)
    # Victims the plan preempted for a deployment whose replicas it places were turned away:
    # kept where they run (not preempted for nothing).
    spared: set[ReplicaKey] = field(default_factory=set)
    # The nodes the landing replicas touch, from the document they were re-checked against (the
    # usage meter's, so it does not read them again).
    nodes: dict[str, NodeMeter] = field(default_factory=dict)


@dataclass(frozen=True)
class _SolverIds:
    """The solver deployments that stand for the stored deployments `keys` in a snapshot
    (`_solver_ids`), told by membership: the keys themselves and, when `refs` is given, every
    solver deployment whose ref names one of them."""

    keys: frozenset[str]
    refs: Mapping[str, SolverRef] | None = None

    def __contains__(self, solver_id: object) -> bool:
        if solver_id in self.keys:
            return True
        ref = None if self.refs is None else self.refs.get(solver_id)  # type: ignore[call-overload]
        return ref is not None and ref.key in self.keys


def _solver_ids(snapshot: Snapshot, keys: Collection[str]) -> _SolverIds:
    """The solver deployments that stand for the stored deployments `keys` in `snapshot`: each
    one's own and, while a rollout or a drain replaces its replicas, its outgoing revisions'
    (store/rollout.py), told by their refs (a cost of `keys`, not of the cluster). A solver
    deployment's ref names the stored deployment its id does (`SolverRef`): each of them is
    among the snapshot's documents of `keys` (`SnapshotIndex.deployments_of`, `placements_of`)."""
    refs, indices = snapshot.solver_refs, snapshot.replica_indices
    wanted = frozenset(keys)
    for key in wanted:
        ref = refs.get(key)
        if ref is None or ref.outgoing or indices.get(key, frozenset()) - set(ref.replicas.values()):
            return _SolverIds(wanted, refs)
    return _SolverIds(wanted)


def _spec_doc(snapshot: Snapshot, keys: Collection[str] | None = None,
              rows: Collection[str] | None = None, nodes: Collection[str] | None = None) -> dict[str, Any]:
    """The snapshot's problem with one deployment per stored deployment and revision, named
    `TENANT/NAME~REVISION`: what the re-check judges each shard by (the spec its replica was
    placed with); only the stored deployments `keys` and the nodes of `rows` when given, of
    those only `nodes` when given too (looked up in the snapshot's index: a cost of what they
    hold, not of the cluster)."""
    problem, index = snapshot.problem, snapshot.index
    docs = problem.get("deployments", ())
    if keys is not None:
        ids = _solver_ids(snapshot, keys)
        docs = [doc for doc in index.deployments_of(problem, keys) if doc["id"] in ids]
    specs: dict[str, dict[str, Any]] = {}
    for doc in docs:
        ref = snapshot.solver_refs.get(doc["id"])
        spec_id = outgoing_id(ref.key, ref.revision) if ref is not None else doc["id"]
        specs.setdefault(spec_id, dict(doc, id=spec_id))
    judged = {**{k: v for k, v in problem.items() if k != "nominations"},  # a policy, not a rule judged (recheck.py)
              "deployments": list(specs.values()), "placements": []}
    if rows is not None:
        racks = index.racks_in(problem, rows)
        within = {r["id"] for r in racks}
        if nodes is None:
            on = index.nodes_on(problem, within)
        else:
            by_id = index.nodes_by_id(problem)
            held = {by_id[n]["rack"] for n in nodes if n in by_id} & within
            on = [n for n in index.nodes_on(problem, held) if n["id"] in nodes]
        judged.update(rows=[r for r in problem.get("rows", ()) if r["id"] in rows], racks=racks, nodes=on)
    return judged


def _victims_of(snapshot: Snapshot, claimants: Mapping[tuple[str, int], str] | None) -> dict[str, set[ReplicaKey]]:
    """The victims `claimants` names (solver deployment and replica -> the solver deployment it
    was preempted for), by the stored key of their claimant, as stored replicas of the snapshot
    (a replica the snapshot does not hold never ran: nothing of it to keep)."""
    victims: dict[str, set[ReplicaKey]] = defaultdict(set)
    refs = snapshot.solver_refs
    for (name, replica), claimant in (claimants or {}).items():
        ref = refs.get(name)
        stored = replica if ref is None else ref.replicas.get(replica)
        if stored is not None:
            victims[stored_key(claimant)].add((stored_key(name), stored))
    return victims


async def _plan_changes(
    session: AsyncSession, snapshot: Snapshot, plan: Plan, committed: _Committed, stale: bool,
    claimants: Mapping[tuple[str, int], str] | None = None,
) -> _Changes:
    """The plan's changes to the snapshot it was solved from, in stored keys, each replica re-checked.

    Per replica: unchanged by the plan, nothing to do; changed by the plan but also by someone
    else since the snapshot, turned away (the next pass decides again); removed, removed;
    placed or moved, landed if it still fits the committed state (`recheck`). Only replicas of
    the live deployments `committed` read are considered (a scoped commit's plan speaks for no other).

    A victim of the plan's preemptions whose claimant (`claimants`: victim -> the solver
    deployment it was preempted for) has a replica turned away is not removed: it stays where
    it runs (`_Changes.spared`), and the claimant's other landing replicas are judged again with
    it there (until nothing more is turned away): no victim goes for work the commit did not write."""
    deployments, current, live = committed.deployments, committed.current, committed.live
    keys = snapshot.plan_keys()
    # The placements of the live ones' solver deployments (looked up in the snapshot's index;
    # none when they hold no shards in the snapshot: arrivals).
    solver_ids = _solver_ids(snapshot, live)
    held = any(snapshot.replica_indices.get(key) for key in live)
    base: dict[ShardKey, Where] = {}
    for p in snapshot.index.placements_of(snapshot.problem, live) if held else ():
        if p["deployment"] not in solver_ids:
            continue
        mapped = keys.key(p["deployment"], p["replica"], p["shard"])
        if mapped is not None:
            base[mapped[0]] = _where(p)
    changes = _Changes()
    desired: dict[ShardKey, Any] = {}
    for pl in plan.placements:
        if not committed.speaks_for(keys.name(pl.deployment)):
            continue
        mapped = keys.key(pl.deployment, pl.replica, pl.shard)
        if mapped is None:  # an outgoing replica is never placed anew
            continue
        key, revision = mapped
        if key in desired:
            raise ValueError(f"plan places shard {key} twice")
        if key[0] in live:  # else deleted since the snapshot: nothing of it is written
            desired[key] = pl
            changes.revision_of[key] = revision
    replicas: dict[ReplicaKey, set[ShardKey]] = defaultdict(set)
    for key in (*base, *desired):
        replicas[key[:2]].add(key)
    stored: dict[ReplicaKey, dict[ShardKey, _Row]] = defaultdict(dict)
    for key, row in current.items():
        if key[:2] in replicas:
            stored[key[:2]][key] = row

    landing: dict[ReplicaKey, dict[int, Where]] = {}
    removed: dict[ReplicaKey, list[_Row]] = {}
    for rk, shard_keys in replicas.items():
        before = {k: base[k] for k in shard_keys if k in base}
        after = {k: _where(desired[k]) for k in shard_keys if k in desired}
        if before == after:
            continue
        if {k: row.where for k, row in stored[rk].items()} != before:
            changes.requeued[rk] = (CHANGED_SINCE,)
        elif not after:
            removed[rk] = list(stored[rk].values())
        elif not before and changes.revision_of[min(after)] != deployments[rk[0]].template_revision:
            changes.requeued[rk] = (TEMPLATE_REPLACED,)
        else:
            if stored[rk]:  # a replica's shards are of one revision: the stored one (a rollback renumbers it)
                revision = next(iter(stored[rk].values())).revision
                changes.revision_of.update((k, revision) for k in after)
            landing[rk] = {k[2]: w for k, w in after.items()}
    victims = _victims_of(snapshot, claimants) if claimants else {}

    def spare() -> bool:
        """Keep the victims of claimants turned away; whether any more were kept. A deployment
        spared one replica is spared every replica the plan preempted: kept in part, it could run
        fewer than its min_replicas (its other replicas preempted for claimants that landed)."""
        hit = {rk[0] for rk in changes.requeued} & victims.keys()
        more = {v for claimant in hit for v in victims[claimant] if v in removed} - changes.spared
        kept_deployments = {rk[0] for rk in more}
        more |= {v for of_claimant in victims.values() for v in of_claimant
                 if v[0] in kept_deployments and v in removed} - changes.spared
        changes.spared |= more
        return bool(more)

    spare()
    changes.deletes += [row for rk, rows in removed.items() if rk not in changes.spared for row in rows]
    if landing:
        judged = landing
        while True:
            rejected, doc = await _recheck(session, snapshot, committed, changes, judged, stale)
            changes.requeued.update(rejected)
            if not rejected or not spare():
                break
            # Victims kept: what landed was judged without them. Judged again with them.
            changes.deletes = [row for row in changes.deletes if row.key[:2] not in changes.spared]
            judged = {rk: s for rk, s in landing.items() if rk not in changes.requeued}
            if not judged:
                break
        changes.nodes = node_meters(doc, {w[0] for by_shard in landing.values() for w in by_shard.values()})
    for rk, shards in landing.items():
        if rk in changes.requeued:
            continue
        for shard in shards:
            key = (*rk, shard)
            row = current.get(key)
            if row is None:
                changes.inserts[key] = desired[key]
            elif row.where != _where(desired[key]):
                changes.updates.append((row, desired[key]))
        changes.deletes += [row for k, row in stored[rk].items() if k not in desired]
    return changes


# The largest re-check run on the event loop (`recheck_work`): ~8 ms of CPU. Its cost is ~1 us a
# node and a shard of the document it judges and ~60 times as much a landing replica (measured:
# an unscoped commit's re-check, 12-20 ms of CPU at 4,096 nodes and 11,058 shards, 51-63 ms at
# 16,384 and 44,114 for 1-32 landing replicas, 0.76 s for all 19,125; a scoped one's, 1-5 ms;
# docs/benchmarks.md, issue 8, `rv-gil`).
RECHECK_ON_LOOP_MAX = 8_000
RECHECK_REPLICA_WORK = 60


def recheck_work(doc: Mapping[str, Any], placed: Collection[Any], wanted: Collection[Any]) -> int:
    """What a re-check costs, in the units of `RECHECK_ON_LOOP_MAX`: the document's nodes, the
    committed shards and the landing replicas (`RECHECK_REPLICA_WORK` each)."""
    return len(doc.get("nodes", ())) + len(placed) + RECHECK_REPLICA_WORK * len(wanted)


async def _recheck(
    session: AsyncSession, snapshot: Snapshot, committed: _Committed, changes: _Changes,
    landing: dict[ReplicaKey, dict[int, Where]], stale: bool,
) -> tuple[dict[ReplicaKey, tuple[str, ...]], dict[str, Any]]:
    """`recheck` of the landing replicas against the committed state (on the event loop when it
    is small, else in a worker thread: `RECHECK_ON_LOOP_MAX`); shards
    are named by the spec of their revision (`_spec_doc`). The specs and nodes come from the
    snapshot, or are read again when it is stale (a node cordoned, a contract changed since).
    A scoped commit adds the shards outside its scope on the racks the landing replicas touch
    (on the nodes they touch, when the re-check judges those alone: `_judged_alone`), and the
    totals of the rest that row power budgets and tenant quotas need (`Unread`).
    Returns the replicas turned away (why) and the document judged by (its nodes are current)."""
    deployments, removed = committed.deployments, {row.key for row in changes.deletes}
    shards = {k: (row.revision, row.where) for k, row in committed.current.items() if k not in removed}
    template = {key: d.template_revision for key, d in deployments.items()}
    racks: set[str] = set()
    rows: set[str] | None = None
    ids: set[int] | None = None
    touched: set[str] = set()
    alone = False
    since = await _specs_since(session, snapshot, committed.generation) if stale else None
    current = not stale or since is not None  # the snapshot's document
    if committed.scope is not None:
        touched = {w[0] for s in landing.values() for w in s.values()}
        racks, rows = _snapshot_racks(snapshot, touched) if current else await _read_racks(session, touched)
        alone = current and _judged_alone(snapshot, committed, landing, racks, rows)
        near = _snapshot_neighbours(snapshot, committed, racks, since, touched if alone else None) if current else None
        outside, others = near if near is not None else await _neighbours(session, committed, racks)
        shards.update(outside)
        template.update((key, revision) for key, (_, revision) in others.items())
        ids = {d.id for d in deployments.values()} | {i for i, _ in others.values()}
    if not current:
        doc = await load_spec_doc(session, within_rows=rows, deployment_ids=ids)
    else:
        # Judged alone, the nodes the landing replicas touch are all of the rows it needs.
        doc = _spec_doc(snapshot, None if committed.scope is None else set(template), rows, touched if alone else None)
    specs = {d["id"] for d in doc["deployments"]}
    unread = Unread() if rows is None else await _read_unread(session, committed, doc, landing, racks, rows)

    named: dict[tuple[str, int], str] = {}  # each deployment's shards share one or two revisions

    def spec(name: str, revision: int) -> str:
        found = named.get((name, revision))
        if found is None:
            # A deployment without a solver ref in its snapshot (a cache that learnt it) is its own spec.
            found = next((candidate for candidate in (outgoing_id(name, revision), outgoing_id(name, template[name]),
                                                      name) if candidate in specs),
                         outgoing_id(name, revision))  # else judged as an unknown deployment
            named[(name, revision)] = found
        return found

    placed = {(spec(k[0], revision), k[1], k[2]): where for k, (revision, where) in shards.items()}
    wanted = {(spec(rk[0], changes.revision_of[(*rk, min(by_shard))]), rk[1]): by_shard
              for rk, by_shard in landing.items()}
    # A small re-check on the loop, not a worker thread: Python holding the GIL all along (4 ms of
    # CPU a call at the median, 17 ms at most, saturated at 4,096 nodes), which a worker holds just
    # as long and the loop waits for just the same, after a hand-over each way (there 12.5 ms of
    # wall time a call for 3.6 ms of CPU: docs/benchmarks.md, issue 8, `gilthreads`). A large one
    # (an unscoped commit's, which judges the whole cluster) in a worker thread, where the loop
    # still gets its turns: `RECHECK_ON_LOOP_MAX`.
    if recheck_work(doc, placed, wanted) <= RECHECK_ON_LOOP_MAX:
        rejected = recheck(doc, placed, wanted, unread)
    else:
        rejected = await asyncio.to_thread(recheck, doc, placed, wanted, unread)
    return {(stored_key(spec_id), replica): why for (spec_id, replica), why in rejected.items()}, doc


@dataclass(frozen=True)
class _Checked:
    """A plan's changes against the committed state as read at one generation (`_check`)."""

    read: _Committed  # as read
    committed: _Committed  # without the shards released (`released`)
    # Shards the snapshot left out (store/snapshot.py `released`) that are still there: removed.
    released: list[_Row]
    changes: _Changes


async def _check(session: AsyncSession, snapshot: Snapshot, plan: Plan, read: _Committed,
                 claimants: Mapping[tuple[str, int], str] | None = None) -> _Checked:
    """The plan's changes (each replica re-checked) against `read`. What it depends on beyond
    `read` (the snapshot's or the database's topology, nodes, tenants, specs, the shards of other
    deployments and the change log) changes only with the cluster generation, which `read` holds
    (every writer of those bumps it: the package's docstring, plans/__init__.py): checked again
    against a read with the same rows at the same generation, it gives the same changes."""
    current = read.current
    released = [current[k] for k, where in snapshot.released.items() if k in current and current[k].where == where]
    committed = read
    if released:
        gone = {row.key for row in released}
        committed = replace(read, current={k: row for k, row in current.items() if k not in gone})
    changes = await _plan_changes(session, snapshot, plan, committed, read.generation != snapshot.generation,
                                  claimants)
    return _Checked(read, committed, released, changes)

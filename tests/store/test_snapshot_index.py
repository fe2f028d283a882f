"""A snapshot's index answers as walks of its document, kept as the document is appended to,
departed from and replaced; the plan applier's re-check reads through it exactly what walks of
the whole snapshot read (`plans.neighbours._snapshot_racks`, `_snapshot_neighbours`,
`plans.check._spec_doc`, `_solver_ids`)."""

from __future__ import annotations

import dataclasses
import gc
import random
from collections.abc import Collection
from typing import Any

import pytest

from controller.store.plans.check import _solver_ids, _spec_doc
from controller.store.plans.committed import _Committed
from controller.store.plans.neighbours import _Since, _snapshot_neighbours, _snapshot_racks
from controller.store.rollout import SolverRef, outgoing_id, stored_key
from controller.store.snapshot import Snapshot

from .snapshot_walks import WalkingIndex, assert_index_walks

TEMPLATE = 3  # every deployment's current revision; some hold replicas of revision 2 too


def _deployment(rng: random.Random, snap: Snapshot, key: str) -> None:
    """Append one stored deployment (its current revision and maybe an outgoing one, or no ref
    at all: one a cache learnt) and its placements on random nodes."""
    problem = snap.problem
    nodes = [n["id"] for n in problem["nodes"]]
    used: set[int] = set()
    for revision in [TEMPLATE] + ([2] if rng.random() < 0.3 else []):
        outgoing = revision != TEMPLATE
        solver_id = outgoing_id(key, revision) if outgoing else key
        replicas, shards = rng.randint(1, 3), rng.randint(1, 2)
        problem["deployments"].append({"id": solver_id, "tenant": "t", "replicas": replicas,
                                       "shards_per_replica": shards, "shard": {"accelerators": 1}})
        placed = rng.sample(range(replicas), rng.randint(0, replicas))
        mapping = {}
        for replica in placed:
            mapping[replica] = stored = len(used) + 10 * outgoing
            used.add(stored)
            for shard in range(shards):
                problem["placements"].append({"deployment": solver_id, "replica": replica, "shard": shard,
                                              "node": rng.choice(nodes), "accelerator_indices": [shard]})
        if outgoing or rng.random() < 0.9:
            snap.solver_refs[solver_id] = SolverRef(key, revision, outgoing, shards, mapping)  # type: ignore[index]
    snap.replica_indices[key] = frozenset(used)  # type: ignore[index]
    snap.deployment_ids[key] = len(snap.deployment_ids) + 1  # type: ignore[index]


def _snapshot(rng: random.Random) -> Snapshot:
    rows = [{"id": f"row{i}", "zone": "z"} for i in range(rng.randint(1, 3))]
    racks = [{"id": f"rack{i}", "row": rng.choice(rows)["id"]} for i in range(rng.randint(1, 6))]
    nodes = [{"id": f"n{i:02d}", "rack": rng.choice(racks)["id"], "state": "ready", "accelerators": 4}
             for i in sorted(rng.sample(range(60), rng.randint(1, 24)))]
    snap = Snapshot(1, {"version": 1, "zones": [{"id": "z"}], "rows": rows, "racks": racks, "nodes": nodes,
                        "tenants": [{"id": "t"}], "deployments": [], "placements": []}, {}, {}, {})
    for k in range(rng.randint(0, 20)):
        _deployment(rng, snap, f"t/d{k}")
    return snap


def _step(rng: random.Random, snap: Snapshot, step: int) -> tuple[Snapshot, str]:
    """One change as the owners of snapshots make them: arrivals and their placements appended,
    departures (cut from the lists by the index: `SnapshotIndex.depart`), a list
    replaced, a copy of the snapshot (the index goes with it)."""
    problem = snap.problem
    kind = rng.choice(["arrive", "arrive", "depart", "depart", "nodes", "placements", "copy"])
    if kind == "arrive":
        _deployment(rng, snap, f"t/new{step}")
    elif kind == "depart" and snap.deployment_ids:
        gone = set(rng.sample(sorted(snap.deployment_ids), rng.randint(1, min(3, len(snap.deployment_ids)))))
        expected = {"deployments": [d for d in problem["deployments"] if d["id"] not in gone],
                    "placements": [p for p in problem["placements"] if p["deployment"] not in gone]}
        snap.index.depart(problem, gone)
        assert {name: problem[name] for name in expected} == expected
        for key in gone:
            for mapping in (snap.deployment_ids, snap.solver_refs, snap.replica_indices):
                mapping.pop(key, None)  # type: ignore[attr-defined]
    elif kind == "nodes":  # a node changed: the list is replaced
        problem["nodes"] = [dict(n, rack=rng.choice(problem["racks"])["id"]) if rng.random() < 0.2 else n
                            for n in problem["nodes"]]
    elif kind == "placements":  # a commit followed: the list is rebuilt
        problem["placements"] = [p for p in problem["placements"] if rng.random() < 0.9]
    else:
        snap = dataclasses.replace(snap, generation=snap.generation + 1)
    return snap, kind


@pytest.mark.parametrize("seed", range(30))
def test_the_index_answers_as_walks_of_the_document_as_it_changes(seed: int) -> None:
    rng = random.Random(seed)
    snap = _snapshot(rng)
    assert_index_walks(snap, rng)
    reads, replaced = snap.index.whole_reads, 0
    for step in range(16):
        snap, kind = _step(rng, snap, step)
        replaced += kind == "placements"
        if rng.random() < 0.5:  # else the next change lands on what the index has not read yet
            assert_index_walks(snap, rng)
            # Arrivals and departures are followed at their cost: only a replaced list is read whole.
            assert reads + bool(replaced) <= snap.index.whole_reads <= reads + replaced, kind
            reads, replaced = snap.index.whole_reads, 0


def test_a_list_changed_in_place_otherwise_than_appended_to_is_read_again() -> None:
    rng = random.Random(5)
    snap = _snapshot(rng)
    while len(snap.problem["placements"]) < 2:
        _deployment(rng, snap, f"t/more{len(snap.deployment_ids)}")
    assert_index_walks(snap, rng)
    reads = snap.index.whole_reads
    del snap.problem["placements"][0]  # what the owners of snapshots never do: still answered right
    assert_index_walks(snap, rng)
    assert snap.index.whole_reads == reads + 1


def test_the_order_numbers_a_departure_keeps_are_not_the_collectors_to_walk() -> None:
    """A departure makes each list anew; its order numbers are an array of machine integers, which
    the collector does not walk number by number, so only the document list itself is one more
    young container of the list's length (docs/benchmarks.md,
    `cutarray`: the paced collection after a departure at 12,000 deployments, 0.30 -> 0.22 ms)."""
    rng = random.Random(7)
    snap = _snapshot(rng)
    while len(snap.deployment_ids) < 3:
        _deployment(rng, snap, f"t/more{len(snap.deployment_ids)}")
    assert_index_walks(snap, rng)
    gone = {stored_key(sorted(snap.deployment_ids)[0])}
    before = len(snap.problem["deployments"])
    snap.index.depart(snap.problem, gone)
    assert len(snap.problem["deployments"]) < before  # a cut was made
    assert_index_walks(snap, rng)
    for grouped in (snap.index._deployments, snap.index._placements):
        assert len(gc.get_referents(grouped._seqs)) <= 1  # its type at most, none of its numbers
        assert len(grouped._seqs) == grouped._read


# The spec readers as whole-snapshot walks, as they were before the index (they read the
# deployments of the keys' solver ids among all of the snapshot's, not the keys' documents).
def _walked_solver_ids(snap: Snapshot, keys: Collection[str]) -> set[str]:
    refs, indices = snap.solver_refs, snap.replica_indices
    ids = set(keys)
    for key in keys:
        ref = refs.get(key)
        if ref is None or ref.outgoing or indices.get(key, frozenset()) - set(ref.replicas.values()):
            return ids | {sid for sid, ref in refs.items() if ref.key in ids}
    return ids


def _walked_spec_doc(snap: Snapshot, keys: Collection[str] | None, rows: Collection[str] | None,
                     nodes: Collection[str] | None = None) -> dict[str, Any]:
    specs: dict[str, dict[str, Any]] = {}
    ids = None if keys is None else _walked_solver_ids(snap, keys)
    for doc in snap.problem["deployments"]:
        if ids is not None and doc["id"] not in ids:
            continue
        ref = snap.solver_refs.get(doc["id"])
        spec_id = outgoing_id(ref.key, ref.revision) if ref is not None else doc["id"]
        specs.setdefault(spec_id, dict(doc, id=spec_id))
    problem = {**snap.problem, "deployments": list(specs.values()), "placements": []}
    if rows is not None:
        racks = [r for r in problem["racks"] if r["row"] in rows]
        within = {r["id"] for r in racks}
        problem.update(rows=[r for r in problem["rows"] if r["id"] in rows], racks=racks,
                       nodes=[n for n in problem["nodes"] if n["rack"] in within and (nodes is None or n["id"] in nodes)])
    return problem


@pytest.mark.parametrize("seed", range(30))
def test_the_recheck_reads_through_the_index_what_walks_of_the_snapshot_read(seed: int) -> None:
    rng = random.Random(seed)
    snap = _snapshot(rng)
    for step in range(8):
        snap, _ = _step(rng, snap, step)
        problem = snap.problem
        names = sorted(snap.deployment_ids) + ["t/unknown"]
        if rng.random() < 0.2 and problem["placements"]:  # shards left out of the document
            p = rng.choice(problem["placements"])
            snap = dataclasses.replace(snap, released={(stored_key(p["deployment"]), 99, 0): (p["node"], (0,), None)})
        walked = dataclasses.replace(snap, index=WalkingIndex())  # the readers over walks of the document
        for _ in range(4):
            keys = set(rng.sample(names, rng.randint(0, len(names))))
            every = {*snap.solver_refs, *(d["id"] for d in problem["deployments"]), *keys}
            ids = _solver_ids(snap, keys)
            assert {sid for sid in every if sid in ids} == _walked_solver_ids(snap, keys) & every
            rows = rng.choice([None, set(), {r["id"] for r in problem["rows"][:1]}, {r["id"] for r in problem["rows"]}])
            for wanted in (keys, None):
                assert _spec_doc(snap, wanted, rows) == _walked_spec_doc(snap, wanted, rows)
                if rows is not None:  # of those rows, only some nodes (and some of none of them)
                    some = set(rng.sample([n["id"] for n in problem["nodes"]], rng.randint(0, len(problem["nodes"]))))
                    some.add("n-unknown")
                    assert _spec_doc(snap, wanted, rows, some) == _walked_spec_doc(snap, wanted, rows, some)
            touched = set(rng.sample([n["id"] for n in problem["nodes"]], rng.randint(0, len(problem["nodes"]))))
            racks, in_rows = _snapshot_racks(snap, touched | {"n-unknown"})
            assert (racks, in_rows) == _snapshot_racks(walked, touched)
            assert racks == {n["rack"] for n in problem["nodes"] if n["id"] in touched}
            scope = frozenset(rng.sample(names, rng.randint(0, min(3, len(names)))))
            read = set(rng.sample(names, rng.randint(0, min(3, len(names)))))
            committed = _Committed(scope, snap.generation, {key: None for key in read}, set(), {}, [])
            gone = frozenset(rng.sample(names, rng.randint(0, min(2, len(names)))))
            since = rng.choice([None, _Since(gone, False)])
            on = rng.choice([None, touched])  # every node of the racks, or the touched ones alone
            assert _snapshot_neighbours(snap, committed, racks, since, on) == _snapshot_neighbours(
                walked, committed, racks, since, on)

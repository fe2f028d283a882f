"""What a snapshot's index (`controller/store/snapshot_index.py`) must answer, by plain walks of
its problem document: an index that walks (`WalkingIndex`), and a check for any snapshot,
however its index was kept (`assert_index_walks`)."""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Snapshot
from controller.store.snapshot_index import SnapshotIndex

Doc = dict[str, Any]


class WalkingIndex(SnapshotIndex):
    """A `SnapshotIndex` that keeps nothing: each lookup walks the document's lists."""

    def nodes_by_id(self, problem: Mapping[str, Any]) -> dict[str, Doc]:
        return {n["id"]: n for n in problem.get("nodes", [])}

    def nodes_on(self, problem: Mapping[str, Any], racks: Iterable[str]) -> list[Doc]:
        wanted = set(racks)
        return [n for n in problem.get("nodes", []) if n["rack"] in wanted]

    def row_of(self, problem: Mapping[str, Any]) -> dict[str, str]:
        return {r["id"]: r["row"] for r in problem.get("racks", [])}

    def racks_in(self, problem: Mapping[str, Any], rows: Collection[str]) -> list[Doc]:
        return [r for r in problem.get("racks", []) if r["row"] in rows]

    def placements_on(self, problem: Mapping[str, Any], nodes: Iterable[str]) -> list[Doc]:
        wanted = set(nodes)
        return [p for p in problem.get("placements", []) if p["node"] in wanted]

    def placements_of(self, problem: Mapping[str, Any], keys: Iterable[str]) -> list[Doc]:
        wanted = set(keys)
        return [p for p in problem.get("placements", []) if stored_key(p["deployment"]) in wanted]

    def placed_on(self, problem: Mapping[str, Any], node: str) -> set[str]:
        return {p["deployment"] for p in self.placements_on(problem, {node})}

    def deployments_of(self, problem: Mapping[str, Any], keys: Iterable[str]) -> list[Doc]:
        wanted = set(keys)
        return [d for d in problem.get("deployments", []) if stored_key(d["id"]) in wanted]


def assert_index_walks(snapshot: Snapshot, rng: random.Random | None = None) -> None:
    """Each lookup of `snapshot.index` (one key at a time, and a few random sets of keys) gives
    what a walk of the document's lists gives (`WalkingIndex`), in the lists' order."""
    rng = rng or random.Random(0)
    problem, index, walk = snapshot.problem, snapshot.index, WalkingIndex()
    # What the lookups by stored deployment rest on (`plans.check._solver_ids`): a solver deployment's
    # ref names the stored deployment its id names.
    assert all(ref.key == stored_key(solver_id) for solver_id, ref in snapshot.solver_refs.items())
    assert list(index.nodes_by_id(problem).items()) == list(walk.nodes_by_id(problem).items())
    assert index.row_of(problem) == walk.row_of(problem)

    def subsets(keys: set[str]) -> list[set[str]]:
        ordered = sorted(keys)
        return [{key} for key in ordered] + [set(rng.sample(ordered, rng.randint(0, len(ordered))))
                                             for _ in range(3)] + [set(ordered) | {"nowhere"}]

    nodes, racks = problem.get("nodes", []), problem.get("racks", [])
    placements, deployments = problem.get("placements", []), problem.get("deployments", [])
    for wanted in subsets({n["rack"] for n in nodes} | {r["id"] for r in racks}):
        assert index.nodes_on(problem, wanted) == walk.nodes_on(problem, wanted), wanted
    for wanted in subsets({r["row"] for r in racks}):
        assert index.racks_in(problem, wanted) == walk.racks_in(problem, wanted), wanted
    for wanted in subsets({p["node"] for p in placements} | {n["id"] for n in nodes}):
        assert index.placements_on(problem, wanted) == walk.placements_on(problem, wanted), wanted
    for node in {p["node"] for p in placements} | {"nowhere"}:
        assert index.placed_on(problem, node) == walk.placed_on(problem, node), node
    for wanted in subsets({stored_key(p["deployment"]) for p in placements} | {stored_key(d["id"]) for d in deployments}):
        assert index.placements_of(problem, wanted) == walk.placements_of(problem, wanted), wanted
        assert index.deployments_of(problem, wanted) == walk.deployments_of(problem, wanted), wanted

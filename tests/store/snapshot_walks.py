"""What a snapshot's index (`controller/store/snapshot_index.py`) must answer, by plain walks of
its problem document: a check for any snapshot, however its index was kept."""

from __future__ import annotations

import random
from typing import Any

from controller.store.rollout import stored_key
from controller.store.snapshot import Snapshot


def assert_index_walks(snapshot: Snapshot, rng: random.Random | None = None) -> None:
    """Each lookup of `snapshot.index` (one key at a time, and a few random sets of keys) gives
    what a walk of the document's lists gives, in the lists' order."""
    rng = rng or random.Random(0)
    problem, index = snapshot.problem, snapshot.index
    # What the lookups by stored deployment rest on (`plans._solver_ids`): a solver deployment's
    # ref names the stored deployment its id names.
    assert all(ref.key == stored_key(solver_id) for solver_id, ref in snapshot.solver_refs.items())
    nodes, racks = problem.get("nodes", []), problem.get("racks", [])
    placements, deployments = problem.get("placements", []), problem.get("deployments", [])
    assert list(index.nodes_by_id(problem).items()) == [(n["id"], n) for n in nodes]
    assert index.row_of(problem) == {r["id"]: r["row"] for r in racks}

    def subsets(keys: set[str]) -> list[set[str]]:
        ordered = sorted(keys)
        return [{key} for key in ordered] + [set(rng.sample(ordered, rng.randint(0, len(ordered))))
                                             for _ in range(3)] + [set(ordered) | {"nowhere"}]

    for wanted in subsets({n["rack"] for n in nodes} | {r["id"] for r in racks}):
        assert index.nodes_on(problem, wanted) == [n for n in nodes if n["rack"] in wanted], wanted
    for wanted in subsets({r["row"] for r in racks}):
        assert index.racks_in(problem, wanted) == [r for r in racks if r["row"] in wanted], wanted
    for wanted in subsets({p["node"] for p in placements} | {n["id"] for n in nodes}):
        on: list[dict[str, Any]] = [p for p in placements if p["node"] in wanted]
        assert index.placements_on(problem, wanted) == on, wanted
        if len(wanted) == 1:
            assert index.placed_on(problem, next(iter(wanted))) == {p["deployment"] for p in on}
    keys = {stored_key(p["deployment"]) for p in placements} | {stored_key(d["id"]) for d in deployments}
    for wanted in subsets(keys):
        assert index.placements_of(problem, wanted) == [
            p for p in placements if stored_key(p["deployment"]) in wanted], wanted
        assert index.deployments_of(problem, wanted) == [
            d for d in deployments if stored_key(d["id"]) in wanted], wanted

"""Cached node scores and filter results decide exactly as computing them afresh.

The greedy placer keeps every node's FGD scores between decisions, and `filters.node_fit` its
node-local slots, and both compute again only for the nodes whose stamp
(`ClusterState.node_version`) moved; the placer takes the best node as a lexicographic minimum
instead of sorting. The reference here bypasses the tables (every candidate scored and every
node judged afresh on every decision) and sorts with the whole `np.lexsort`: on random event
sequences (arrivals of whole, fractional and gang shards of several tenants, retries,
departures, scale-downs, cordons, nodes down, up, added and removed, contract changes) played
into two warm sessions, one each way, every decision and every resulting state is identical.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builders import dep, node, placed, problem  # noqa: E402
from strategies import problems  # noqa: E402

from scheduler import Node, problem_from_dict  # noqa: E402
from scheduler import filters, greedy, scoring  # noqa: E402
from scheduler.fragmentation import node_fragmentation  # noqa: E402
from scheduler.model import ShardSpec  # noqa: E402
from scheduler.session import ClusterDelta, Session  # noqa: E402
from scheduler.state import ClusterState  # noqa: E402

Doc = dict[str, Any]
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])


def scores_afresh(scores: scoring.NodeScores, t: int, spec: ShardSpec,
                  nodes: np.ndarray) -> scoring.ShardScores:
    scores._current_snapshot()
    values = scores.pairing_values() if spec.fractional and spec.accelerators > 0 else None
    return scores.score_rows(t, spec, nodes, values, fgd=True)


def fragmentation_afresh(scores: scoring.NodeScores, t: int, nodes: np.ndarray) -> np.ndarray:
    scores._current_snapshot()
    s = scores.state
    return node_fragmentation(scores.free_milli(t)[nodes], s.cpu_free[nodes],
                              s.mem_free[nodes], scores.workload, nodes)


def local_slots_afresh(state: ClusterState, d: int) -> np.ndarray:
    fit = filters.FitInput(state, d)
    return np.minimum.reduce([f.slots(fit) for f in filters.LOCAL_FILTERS])


def uncached() -> ExitStack:
    """Patch the placer to score every candidate afresh and sort them all (no kept
    candidates per rack), and the filters to judge every node afresh."""
    stack = ExitStack()
    stack.enter_context(mock.patch.object(greedy, "KEEP_CANDIDATES", False))
    stack.enter_context(mock.patch.object(filters, "local_slots", local_slots_afresh))
    stack.enter_context(mock.patch.object(scoring.NodeScores, "fgd_scores", scores_afresh))
    stack.enter_context(mock.patch.object(scoring.NodeScores, "fragmentation",
                                          fragmentation_afresh))
    stack.enter_context(mock.patch.object(greedy, "lexmin",
                                          lambda keys: int(np.lexsort(keys)[0])))
    return stack


def play(doc: Doc, events: list[tuple[str, int]]) -> list[Any]:
    """Every decision and the state after every event, playing `events` into a session."""
    problem = problem_from_dict(copy.deepcopy(doc))
    running = {p.deployment for p in problem.placements}
    start = dataclasses.replace(problem, deployments=tuple(
        d for d in problem.deployments if d.id in running))
    arrivals = [d for d in problem.deployments if d.id not in running]
    session = Session(start)
    seen: list[Any] = [session.repaired_at_load]
    last: str | None = None  # the node of the last placement decided
    for action, k in events:
        state = session.snapshot()
        nodes, live = list(state.nodes), list(state.deployments)
        out: Any = None
        if action == "arrive" and arrivals:
            out = session.place(arrivals.pop(0))
        elif action == "retry" and session.pending():
            out = session.place(session.pending()[k % len(session.pending())])
        elif action == "depart" and live:
            session.release(live[k % len(live)].id)
        elif action == "scale" and live:
            d = live[k % len(live)]
            out = session.place(dataclasses.replace(d, replicas=1 + k % 3, min_replicas=1))
        elif action == "cordon_used" and last is not None:
            n = next(n for n in nodes if n.id == last)  # where the last decision placed
            out = session.apply(ClusterDelta(nodes=(dataclasses.replace(n, state="cordoned"),)))
        elif action in ("cordon", "uncordon", "down", "up") and nodes:
            n = nodes[k % len(nodes)]
            new_state = {"cordon": "cordoned", "uncordon": "ready", "down": "down",
                         "up": "ready"}[action]
            out = session.apply(ClusterDelta(nodes=(dataclasses.replace(n, state=new_state),)))
        elif action == "add_node" and state.racks:
            rack = state.racks[k % len(state.racks)].id
            out = session.apply(ClusterDelta(nodes=(Node(
                id=f"extra{k}", rack=rack, accelerators=1 + k % 4, accelerator_model="m1",
                idle_power_w=0.0),)))
        elif action == "remove_node" and len(nodes) > 1:
            out = session.apply(ClusterDelta(removed_nodes=(nodes[k % len(nodes)].id,)))
        elif action == "contract" and state.tenants:
            t = state.tenants[k % len(state.tenants)]
            out = session.apply(ClusterDelta(tenants=(dataclasses.replace(
                t, max_accelerators=None, max_power_w=None),)))
        if getattr(out, "placements", None):
            last = out.placements[-1].node
        seen.append((action, k, out, session.snapshot().placements))
    return seen


def assert_same_both_ways(doc: Doc, events: list[tuple[str, int]]) -> None:
    cached = play(doc, events)
    with uncached():
        afresh = play(doc, events)
    for i, (a, b) in enumerate(zip(cached, afresh)):
        assert a == b, f"event {i}: {events[i - 1] if i else 'load'}"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Doc, list[tuple[str, int]]]:
    doc = draw(problems(modes=("online",), max_nodes=8, max_deployments=8, max_tenants=3))
    doc["options"].pop("batch_size", None)
    actions = st.sampled_from(["arrive"] * 6 + ["retry", "depart", "scale", "cordon",
                                                 "uncordon", "down", "up", "add_node",
                                                 "remove_node", "contract"])
    events = draw(st.lists(st.tuples(actions, st.integers(0, 1000)), min_size=1, max_size=16))
    return doc, events


@settings(max_examples=60, **COMMON)
@given(scenarios())
def test_cached_scores_decide_as_fresh_ones_on_random_events(
        scenario: tuple[Doc, list[tuple[str, int]]]) -> None:
    doc, events = scenario
    note(str(events))
    assert_same_both_ways(doc, events)


def test_cached_scores_decide_as_fresh_ones_on_a_maia_cluster_with_many_tenants() -> None:
    """64 Maia-shaped nodes (power budgets, isolation, zones, a capped tenant), six tenants'
    single shards, fractions and gangs arriving between departures and cordons: enough
    decisions that the workload snapshot and the pairing prices change on the way."""
    from bench import synthetic as syn
    rng = random.Random(5)
    doc = syn.cluster(64, 5)
    doc = {**doc, "deployments": [syn.arrival(rng, i) for i in range(60)],
           "options": {"mode": "online"}}
    events = [("arrive", 0)] * 20 + [
        (rng.choice(["arrive", "arrive", "arrive", "depart", "scale", "cordon", "uncordon",
                     "down", "up", "retry"]), rng.randrange(1000)) for _ in range(80)]
    assert_same_both_ways(doc, events)


def test_a_cordoned_node_leaves_the_kept_candidates() -> None:
    """The placer keeps each rack's best node for a tenant and shape between decisions
    (`candidates.RackBest`); cordoning the best one (no change of its occupancy) must take
    it out of the next choice."""
    nodes = [node(f"n{i}", rack=f"r{i // 2}", acc=4) for i in range(6)]
    running = dep("p", replicas=5, locality="node")
    used = [("n0", 0), ("n0", 1), ("n0", 2), ("n1", 0), ("n1", 1)]  # n0 the fullest, then n1
    doc = problem(nodes, [running, dep("a", locality="node"), dep("b", locality="node")],
                  placements=[placed("p", n, [i], replica=r) for r, (n, i) in enumerate(used)],
                  mode="online")
    p, a, b = problem_from_dict(doc).deployments
    session = Session(dataclasses.replace(problem_from_dict(doc), deployments=(p,)))
    assert session.place(a).placements[0].node == "n0"  # full now; n1 is the best left
    n1 = next(n for n in session.snapshot().nodes if n.id == "n1")
    session.apply(ClusterDelta(nodes=(dataclasses.replace(n1, state="cordoned"),)))
    assert session.rebuilds == 0  # changed in place, not rebuilt
    assert session.place(b).placements[0].node not in ("n0", "n1")


def test_kept_candidates_decide_as_the_full_ranking_on_many_racks() -> None:
    """256 Maia-shaped nodes in 16 racks (power budgets that bind, isolation, exclusion,
    zones): single shards of every tenant, whole and fractional, between departures,
    cordons and nodes going down, decided from the kept candidates and from the full
    ranking of every node afresh."""
    from bench import synthetic as syn
    rng = random.Random(11)
    doc = syn.cluster(256, 11)
    arrivals = [syn.arrival(rng, i, rng.choice(["node", "fraction", "fraction", "gang"]))
                for i in range(120)]
    doc = {**doc, "deployments": arrivals, "options": {"mode": "online"}}
    events = [(rng.choice(["arrive"] * 6 + ["depart", "retry", "cordon", "cordon_used",
                                            "uncordon", "down", "up"]), rng.randrange(1000))
              for _ in range(140)]
    assert_same_both_ways(doc, events)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.lists(
    st.lists(st.integers(0, 3), min_size=n, max_size=n), min_size=1, max_size=5)))
def test_lexmin_is_the_first_of_lexsort(columns: list[list[int]]) -> None:
    keys = [np.array(c) for c in columns]
    assert greedy.lexmin(keys) == int(np.lexsort(keys)[0])


def test_every_change_of_a_node_gives_it_a_new_stamp() -> None:
    """The stamps the score tables trust: placing, releasing and loading change them for the
    nodes concerned only; a twin starts with its original's and then goes its own way."""
    doc = problem([node(f"n{i}", acc=2) for i in range(3)], [dep("x", replicas=2)],
                  placements=[placed("x", "n0", [0])])
    from scheduler.solve import Solver
    solver = Solver(problem_from_dict(doc), 1000)
    state: ClusterState = solver.state
    loaded = state.node_version.copy()
    assert loaded[0] != loaded[1] and loaded[1] == loaded[2]
    twin = state.copy()
    assert (twin.node_version == loaded).all()
    state.add_replica(0, 1, {0: state.replicas[(0, 0)][0]._replace(node=2, indices=(1,))})
    assert state.node_version[2] != loaded[2] and (state.node_version[:2] == loaded[:2]).all()
    state.remove_replica(0, 0)
    assert state.node_version[0] != loaded[0] and state.node_version[1] == loaded[1]
    twin.remove_replica(0, 0)
    assert twin.node_version[0] not in (loaded[0], state.node_version[0])

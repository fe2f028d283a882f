"""The departures protocol (`bench/departures.py`) on the committed 6-node cut of the trace.

Checks the protocol's bookkeeping, not its speed: arrivals are a seeded Poisson process over
the trace's pods, every moment's allocation stays under what an offline re-pack of the pods
present could reach, and the state left at the end passes the independent checker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "openb-tiny"
sys.path.insert(0, str(REPO))

from bench import departures, fgd, traces  # noqa: E402
from bench.checking import check_state  # noqa: E402


def load() -> tuple[list[traces.TraceNode], list[traces.TracePod], list[tuple[int, int]]]:
    nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST, TINY))
    path = traces.trace_path(traces.workload_file("tiny"), TINY)
    return nodes, traces.load_pods(path), traces.load_lifetimes(path)


def test_arrivals_are_a_seeded_poisson_process_over_the_trace_pods() -> None:
    nodes, pods, lifetimes = load()
    cap = fgd.capacity_milli(nodes)
    jobs = departures.make_jobs(pods, lifetimes, cap, 0.9, seed=3)
    assert jobs == departures.make_jobs(pods, lifetimes, cap, 0.9, seed=3)
    assert jobs != departures.make_jobs(pods, lifetimes, cap, 0.9, seed=4)
    times = [j.arrive for j in jobs]
    assert times == sorted(times) and times[0] > 0
    life = {p.name: max(d - c, 1) for p, (c, d) in zip(pods, lifetimes)}
    assert all(j.lifetime == life[j.pod.name] for j in jobs)  # the trace's own lifetimes
    # Twice the load, twice the arrivals over the same window (give or take the draw).
    more = departures.make_jobs(pods, lifetimes, cap, 1.8, seed=3)
    assert 1.4 < len(more) / len(jobs) < 2.6


@pytest.mark.parametrize("policy", departures.POLICIES)
def test_replay_stays_under_the_repack_limit_and_ends_valid(policy: str) -> None:
    nodes, pods, lifetimes = load()
    cap = fgd.capacity_milli(nodes)
    jobs = departures.make_jobs(pods, lifetimes, cap, 0.9, seed=1)
    r = departures.replay("tiny", nodes, jobs, policy, seed=1, load=0.9, samples=3)
    assert 0.0 < r.alloc_pct <= 100.0
    assert len(r.moments) == 3
    for _, alloc, limit in r.moments:
        assert 0.0 < alloc <= limit + 1e-9 <= 100.0 + 1e-9
    assert r.waited >= r.never_placed >= 0 and r.wait_mean_s >= 0.0
    if policy != "maia+moves":
        assert r.moves == 0
    doc = {**fgd.cluster_doc(nodes), "deployments": r.deployments}
    assert check_state(doc, r.placements) == []
    assert {p["deployment"] for p in r.placements} <= {d["id"] for d in r.deployments}


@pytest.mark.parametrize("defer", [True, False])
def test_batches_end_valid_and_account_for_every_arrival(defer: bool) -> None:
    nodes, pods, lifetimes = load()
    cap = fgd.capacity_milli(nodes)
    jobs = departures.make_jobs(pods, lifetimes, cap, 1.2, seed=2)
    r = departures.replay("tiny", nodes, jobs, "maia", seed=2, load=1.2, samples=2,
                          batch_size=4, defer=defer)
    assert 0.0 < r.alloc_pct <= 100.0
    for _, alloc, limit in r.moments:
        assert 0.0 < alloc <= limit + 1e-9
    doc = {**fgd.cluster_doc(nodes), "deployments": r.deployments}
    assert check_state(doc, r.placements) == []


def test_a_batch_holds_its_arrivals_until_it_is_full() -> None:
    nodes, pods, lifetimes = load()
    jobs = departures.make_jobs(pods, lifetimes, fgd.capacity_milli(nodes), 0.9, seed=1)
    sim = departures.Replay(nodes, jobs, "maia", 0, 60.0, batch_size=3)
    assert sim.arrive(0, 1.0) == [] and sim.arrive(1, 2.0) == []
    assert sim.held == [0, 1] and not sim.solver.state.replicas
    started = sim.arrive(2, 3.0)
    assert sim.held == [] and started  # the empty cluster takes the batch
    assert sorted(started + sim.waiting) == [0, 1, 2]
    assert all(sim.started[i] == 3.0 for i in started)  # started when the batch was decided

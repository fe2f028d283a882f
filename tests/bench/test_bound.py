"""The packing bound of bench/bound.py: exact on small cases, and below every policy."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import bound, fgd, traces  # noqa: E402
from bench.traces import TraceNode, TracePod  # noqa: E402


def node(name: str, gpus: int, model: str | None = "A") -> TraceNode:
    return TraceNode(name, 64000, 262144, gpus, model)


def pod(milli: int, gpus: int = 1, spec: tuple[str, ...] = ()) -> TracePod:
    return TracePod(f"p{milli}", 1000, 1024, gpus, milli, spec)


def brute_force(gpu_models: list[str | None], pods: list[TracePod]) -> int:
    """Most milli placed, trying every assignment of pods to GPUs (or nowhere)."""
    best = 0
    for choice in itertools.product(range(-1, len(gpu_models)), repeat=len(pods)):
        used = [0] * len(gpu_models)
        ok = True
        for p, g in zip(pods, choice):
            if g < 0:
                continue
            if p.gpu_spec and gpu_models[g] not in p.gpu_spec:
                ok = False
                break
            used[g] += p.gpu_milli
        if ok and all(u <= 1000 for u in used):
            best = max(best, sum(used))
    return best


def test_fractional_pairs_are_chosen_exactly() -> None:
    # 600+400 on one GPU and 600 alone beats 600+... any other pairing.
    pods = [pod(600), pod(600), pod(500), pod(400)]
    b = bound.packing_bound([node("n", 2)], pods)
    assert b.proven
    assert b.milli == brute_force(["A", "A"], pods) == 1600
    assert b.unallocated_pct == pytest.approx(20.0)


def test_models_are_respected() -> None:
    # Two 700-milli pods that only run on B, which has one GPU: one of them cannot run.
    nodes = [node("a", 2, "A"), node("b", 1, "B")]
    pods = [pod(700, spec=("B",)), pod(700, spec=("B",)), pod(300), pod(1000, 2, ("A",))]
    b = bound.packing_bound(nodes, pods)
    assert b.proven
    assert b.milli == 700 + 300 + 2000


def test_whole_gpu_pods_take_whole_gpus() -> None:
    nodes = [node("a", 4)]
    pods = [pod(1000, 2), pod(1000, 2), pod(1000, 1), pod(250), pod(250)]
    b = bound.packing_bound(nodes, pods)
    assert b.milli == 4000  # 2+2 GPUs beat any mix with the 1-GPU pod and the fractions
    mixed = [pod(1000, 3), pod(500), pod(450)]
    assert bound.packing_bound(nodes, mixed).milli == 3950


def test_random_small_cases_match_brute_force() -> None:
    import random
    rng = random.Random(5)
    for _ in range(12):
        models = [rng.choice(["A", "B"]) for _ in range(3)]
        nodes = [node(f"n{i}", 1, m) for i, m in enumerate(models)]
        pods = [pod(rng.choice([150, 230, 320, 470, 650, 810]),
                    spec=rng.choice([(), ("A",), ("B",)])) for _ in range(5)]
        b = bound.packing_bound(nodes, pods)
        assert b.proven
        assert b.milli == brute_force(models, pods), (models, pods)


def test_no_policy_beats_the_bound_on_the_tiny_trace() -> None:
    tiny = REPO / "tests" / "data" / "openb-tiny"
    nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST, tiny))
    pods = traces.load_pods(traces.trace_path(traces.workload_file("tiny"), tiny))
    cap = fgd.capacity_milli(nodes)
    b = bound.packing_bound(nodes, fgd.seed_arrivals(pods, cap, 42))
    assert b.proven and b.capacity_milli == cap
    for policy, batch in (("bestfit", 1), ("random", 1), ("maia", 1), ("maia", 4)):
        r = fgd.run_seed("tiny", 42, policy, nodes=nodes, pods=pods, batch_size=batch)
        assert r.allocated_milli <= b.milli, policy


def test_pods_forced_in_give_the_limit_of_a_policy_that_places_them() -> None:
    # openb's case in small: two 470s per GPU (1,880 on two GPUs) beat an 810 alone; a
    # policy that placed the 810s cannot reach that.
    pods = [pod(810), pod(810), pod(470), pod(470), pod(470), pod(470)]
    free = bound.packing_bound([node("n", 2)], pods)
    one = bound.packing_bound([node("n", 2)], pods, min_placed={810: 1})
    both = bound.packing_bound([node("n", 2)], pods, min_placed={810: 2})
    assert free.proven and one.proven and both.proven
    assert free.milli == brute_force(["A", "A"], pods) == 1880
    assert one.milli == brute_force_with(["A", "A"], pods, {810: 1}) == 810 + 940
    assert both.milli == brute_force_with(["A", "A"], pods, {810: 2}) == 1620
    # More than there are forces all there are.
    assert bound.packing_bound([node("n", 2)], pods, min_placed={810: 5}).milli == 1620


def brute_force_with(gpu_models: list[str | None], pods: list[TracePod],
                     at_least: dict[int, int]) -> int:
    """`brute_force` over the assignments that place at least `at_least` pods per size."""
    best = 0
    for choice in itertools.product(range(-1, len(gpu_models)), repeat=len(pods)):
        used = [0] * len(gpu_models)
        placed: dict[int, int] = {}
        for p, g in zip(pods, choice):
            if g >= 0:
                used[g] += p.gpu_milli
                placed[p.gpu_milli] = placed.get(p.gpu_milli, 0) + 1
        if all(u <= 1000 for u in used) and all(placed.get(m, 0) >= n
                                               for m, n in at_least.items()):
            best = max(best, sum(used))
    return best

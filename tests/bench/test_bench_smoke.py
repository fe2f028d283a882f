"""End to end: the FGD protocol on a tiny committed cut of the openb trace.

It checks the protocol's arithmetic (unallocated share recomputed from the placements), that the
final state is valid for the independent checker, and that a missing trace fails clearly. No
timing assertions: benchmarks report times, tests never judge them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "openb-tiny"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "scheduler"))

from bench import fgd, traces  # noqa: E402
from checker import check_plan  # noqa: E402


def load() -> tuple[list[traces.TraceNode], list[traces.TracePod]]:
    nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST, TINY))
    pods = traces.load_pods(traces.trace_path(traces.workload_file("tiny"), TINY))
    return nodes, pods


RUNS = [("bestfit", 1), ("bestfit-frac", 1), ("random", 1), ("maia", 1), ("maia", 4)]


@pytest.mark.parametrize(("policy", "batch"), RUNS)
def test_fgd_protocol_end_to_end(policy: str, batch: int) -> None:
    nodes, pods = load()
    r = fgd.run_seed("tiny", 42, policy, nodes=nodes, pods=pods, batch_size=batch)
    cap = 1000 * sum(n.gpus for n in nodes)
    assert r.capacity_milli == cap == 20000  # 2+2+2+2+4+8 GPUs
    # Arrivals stop at the first one that brings demand to 100% of capacity.
    demand = [p["shard"]["accelerator_milli"] if p["shard"].get("accelerator_milli")
              else 1000 * p["shard"]["accelerators"] for p in r.deployments]
    assert sum(demand) >= cap > sum(demand[:-1])
    # Unallocated share, recomputed from the placements themselves.
    by_id = {d["id"]: (d, m) for d, m in zip(r.deployments, demand)}
    held = 0
    for p in r.placements:
        d, m = by_id[p["deployment"]]
        held += m if d["shard"]["accelerators"] == 1 else 1000 * len(p["accelerator_indices"])
    assert held == r.allocated_milli
    assert r.unallocated_pct == pytest.approx(100 * (cap - held) / cap)
    assert 0.0 <= r.unallocated_pct < 100.0
    # The final state is a valid plan for the whole arrival sequence.
    doc = {**fgd.cluster_doc(nodes), "deployments": r.deployments}
    placed = {p["deployment"] for p in r.placements}
    plan = {"status": "feasible", "placements": r.placements, "unplaced": [
        {"deployment": d["id"], "replicas": 1, "reasons": [{"code": "CAPACITY", "message": "-"}]}
        for d in r.deployments if d["id"] not in placed]}
    assert check_plan(doc, plan) == []


@pytest.mark.parametrize(("batch", "given"), [(1, None), (4, None), (4, 300)])
def test_single_solve_gives_every_decision_its_own_time_limit(
        monkeypatch: pytest.MonkeyPatch, batch: int, given: int | None) -> None:
    """The single solve stands for one call per decision: its limit is one decision's times
    the decisions, so a batch late in the run still gets its joint search (a whole-run
    limit of 2 s cut every later batch's CP-SAT to 10 ms, the plan depending on load)."""
    import scheduler
    from scheduler.solve import DEFAULT_TIME_LIMIT_MS
    limits: list[int | None] = []
    real = scheduler.solve

    def spy(problem: object, *, time_limit_ms: int | None = None) -> object:
        limits.append(time_limit_ms)
        return real(problem, time_limit_ms=time_limit_ms)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduler, "solve", spy)
    nodes, pods = load()
    r = fgd.run_seed("tiny", 42, "maia", nodes=nodes, pods=pods, batch_size=batch,
                     time_limit_ms=given)
    decisions = -(-r.arrivals // batch)
    assert limits == [(given or DEFAULT_TIME_LIMIT_MS) * decisions]


@pytest.mark.parametrize("policy", ["maia", "random"])
def test_gpu_configurations_account_for_every_unallocated_milli(policy: str) -> None:
    nodes, pods = load()
    r = fgd.run_seed("tiny", 42, policy, nodes=nodes, pods=pods)
    configs = fgd.gpu_configurations(r.deployments, r.placements)
    assert all(sum(c) <= 1000 and list(c) == sorted(c, reverse=True) for c in configs)
    used = sum(configs.values())
    free = sum((1000 - sum(c)) * n for c, n in configs.items())
    assert free + 1000 * (sum(n.gpus for n in nodes) - used) == r.capacity_milli - r.allocated_milli
    shown = fgd.format_configurations(configs, 3).splitlines()
    assert len(shown) == min(3, sum(1 for c in configs if sum(c) < 1000))
    lost = [int(line.rsplit(", ", 1)[1].split()[0]) for line in shown]
    assert lost == sorted(lost, reverse=True)


def test_gpu_configurations_group_pods_by_gpu() -> None:
    deps = [{"id": "a", "shard": {"accelerators": 1, "accelerator_milli": 470}},
            {"id": "b", "shard": {"accelerators": 1, "accelerator_milli": 320}},
            {"id": "c", "shard": {"accelerators": 2}}]
    at = [{"deployment": "b", "node": "n", "accelerator_indices": [0]},
          {"deployment": "a", "node": "n", "accelerator_indices": [0]},
          {"deployment": "a", "node": "m", "accelerator_indices": [0]},
          {"deployment": "c", "node": "n", "accelerator_indices": [1, 2]}]
    assert fgd.gpu_configurations(deps, at) == {(470, 320): 1, (470,): 1, (1000,): 2}
    assert fgd.format_configurations(fgd.gpu_configurations(deps, at), 5).splitlines() == [
        "    470: 1 GPUs, 530 free each, 530 milli",
        "    470+320: 1 GPUs, 210 free each, 210 milli"]


def test_sampling_reaches_the_share_and_is_seeded() -> None:
    nodes, pods = load()
    cap = fgd.capacity_milli(nodes)
    a = fgd.sample_arrivals(pods, cap, 42)
    assert sum(p.gpu_request_milli for p in a) >= 1.3 * cap
    assert sum(p.gpu_request_milli for p in a[:-1]) < 1.3 * cap + max(
        p.gpu_request_milli for p in a)
    assert [p.name for p in a] == [p.name for p in fgd.sample_arrivals(pods, cap, 42)]


def test_cli_prints_the_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "fgd", "--workload", "tiny", "--seeds", "42-43",
         "--policies", "bestfit", "--configs", "2"], cwd=REPO, capture_output=True, text=True,
        env={"MAIA_DATA_DIR": str(TINY), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bestfit" in out.stdout and "unalloc %" in out.stdout
    assert " GPUs, " in out.stderr and " free each, " in out.stderr  # --configs, per seed


def test_missing_trace_fails_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "fgd", "--seeds", "42"], cwd=REPO,
        capture_output=True, text=True, env={"MAIA_DATA_DIR": str(tmp_path),
                                             "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 2
    assert "MAIA_DATA_DIR" in out.stderr and "not found" in out.stderr

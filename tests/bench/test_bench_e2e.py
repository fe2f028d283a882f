"""`python -m bench e2e` on the smallest cluster: real controller and simnode processes, SQLite.

Checks what the benchmark reports is about a run that happened (every deployment submitted ran,
the deletions went through, the committed state passes the independent checker); never its
times, which are for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pgserver import find_pg_bin_dir
from controller import limits

sys.path.insert(0, str(Path(__file__).parent))
from benchrun import bench_session, session_processes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _e2e(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """`bench e2e` on 16 nodes of SQLite with 4 clients and `args`: its output and its one result,
    which must have run without an error and pass the checker."""
    out = tmp_path / "e2e.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "e2e", "--nodes", "16", "--db", "sqlite", "--clients", "4", *args,
         "--load-delay", "0.05", "--timeout", "120", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())
    assert result["errors"] == [] and result["checker_violation_count"] == 0
    return done, result


def test_e2e_runs_everything_and_the_checker_agrees(tmp_path: Path) -> None:
    done, result = _e2e(tmp_path, "--delete-every", "3")
    assert (result["singles"], result["gangs"], result["gang_shards"]) == (24, 1, 8)
    assert result["running"] == result["deployments"] == 25
    assert result["deletes"] == 25 // 3
    assert result["controller_exit"] == 0
    assert result["reconcile_passes"].get("full", 0) + result["reconcile_passes"].get("fast", 0) > 0
    assert result["loop_lag_p99_le_s"] is not None  # the controller's event-loop lag, from its /metrics
    assert result["submit_server_p99_le_s"] is not None  # its own timing of the submits, from its /metrics
    assert "submit p50/p99" in done.stdout and "/s steady" in done.stdout  # None when 25 ran at once
    # the host's speed read before the run and after it (bench/calibrate.py), in the JSON and the report
    before, after = result["host_calibration_ms"]
    assert before > 0 and after > 0 and f"host calibration {before:g}/{after:g} ms before/after" in done.stdout
    # the machine's CPU over the submits: its busy part holds at least the controller's and the bench's
    assert 0 < result["machine_busy_cpu_s"] and result["controller_cpu_s"] + result["bench_cpu_s"] <= \
        result["machine_busy_cpu_s"] + 0.2 <= result["machine_cpu_s"] + 0.2


def test_e2e_submit_batch_sends_singles_in_calls_of_k(tmp_path: Path) -> None:
    """`--submit-batch 8`: the singles go 8 a SubmitDeployments call (the controller's handling
    histogram counts those calls), the gang alone; everything runs, the checker agrees."""
    done, result = _e2e(tmp_path, "--submit-batch", "8", "--delete-every", "0", "--keep",
                        "--controller-log-level", "INFO")
    assert result["running"] == result["deployments"] == 25
    assert "up to 8 single-shard deployments a call" in result["load"]
    assert result["submit_server_p99_le_s"] is not None
    calls = _calls_logged(done.stdout)
    assert calls["SubmitDeployments"] >= 24 // 8 and calls["SubmitDeployment"] == 1, calls


def test_e2e_submit_batch_over_the_call_limit_is_refused_before_it_starts(tmp_path: Path) -> None:
    """A K the controller would refuse every call of (more than `limits.SUBMITS_PER_CALL_MAX`)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "e2e", "--nodes", "16", "--db", "sqlite",
         "--submit-batch", str(limits.SUBMITS_PER_CALL_MAX + 1), "--json", str(tmp_path / "e2e.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"K from 1 to {limits.SUBMITS_PER_CALL_MAX}" in done.stderr
    assert not (tmp_path / "e2e.json").exists()


def _calls_logged(stdout: str) -> dict[str, int]:
    """RPCs answered OK per method, from the kept run's controller log (`--keep`: "logs in DIR")."""
    [logs] = [line.split("logs in ", 1)[1].strip() for line in stdout.splitlines() if "logs in " in line]
    try:
        text = (Path(logs) / "controller.log").read_text(errors="replace")
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return {method: text.count(f"method=/maia.v1.DeploymentService/{method} ") for method in
            ("SubmitDeployment", "SubmitDeployments")}


def test_e2e_through_agent_gateways_counts_their_cpu_apart(tmp_path: Path) -> None:
    """`--agent-gateways 2`: the fleet connects to the gateways; their CPU is part of the
    controller's (its children's) and reported apart, with their memory."""
    done, result = _e2e(tmp_path, "--agent-gateways", "2", "--delete-every", "0")
    assert result["running"] == result["deployments"] == 25
    assert result["agent_gateways"] == 2
    # (a run this small keeps them busy for hundredths of a second: their memory says they were found)
    assert 0 <= result["controller_gateways_cpu_s"] <= result["controller_children_cpu_s"] <= result["controller_cpu_s"]
    assert result["gateways_peak_rss_mib"] > 2 * 20  # two interpreters with grpc
    assert "2 agent gateways" in done.stdout


def test_e2e_on_postgres_reports_the_database_servers_cpu_and_statements(tmp_path: Path) -> None:
    """`--db postgres --pg-statements 3`: the bench's own server's CPU over the submits (postmaster
    and backends, from /proc), its transactions, and pg_stat_statements' top statements since the
    first submit, in the result and the report."""
    if find_pg_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries (make postgres)")
    done, result = _e2e(tmp_path, "--db", "postgres", "--pg-statements", "3", "--delete-every", "0")
    assert result["running"] == result["deployments"] == 25
    assert result["db_server_cpu_s"] > 0 and result["db_transactions"] > 0
    statements = result["pg_statements"]
    assert len(statements["top"]) == 3 and statements["calls"] >= sum(s["calls"] for s in statements["top"]) > 0
    assert all(0 <= s["mean_ms"] <= s["max_ms"] + 0.05 and s["max_ms"] > 0 for s in statements["top"])
    assert "(mean " in done.stdout and ", max " in done.stdout
    assert "database server CPU" in done.stdout and "pg_stat_statements since the first submit" in done.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to keep some apart")
def test_e2e_keeps_the_database_the_fleets_and_its_clients_on_the_others_cpus(tmp_path: Path) -> None:
    """`--others-cpus`: the bench checks, as each run's submits start, that the fleets, the
    database server (its postmaster and the processes it runs) and itself run on those CPUs and the
    controller does not (an error of the run if not), and reports where they ran. Two runs: the
    second's controller starts from the bench after the first confined it."""
    if find_pg_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries (make postgres)")
    cpu = max(os.sched_getaffinity(0))
    out = tmp_path / "e2e.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "e2e", "--nodes", "16", "--db", "sqlite", "postgres", "--clients", "4",
         "--others-cpus", str(cpu), "--delete-every", "0", "--load-delay", "0.05", "--timeout", "120",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert [r["db"] for r in results] == ["sqlite", "postgres"]
    for result in results:
        assert result["errors"] == [] and result["checker_violation_count"] == 0
        assert result["running"] == result["deployments"] == 25
        assert result["others_cpus"] == [cpu]
    assert f"; the fleets and this bench on CPUs {cpu}, the controller on any" in done.stdout
    assert f"; the database server, the fleets and this bench on CPUs {cpu}, the controller on any" in done.stdout


def test_e2e_from_a_preloaded_cluster(tmp_path: Path) -> None:
    """`--preload`: the cluster and its running work written before the controller starts; the
    fleet joins as existing nodes, the run's deployments are its own, the checker agrees."""
    _, result = _e2e(tmp_path, "--preload", "16", "--delete-every", "0")
    assert (result["preloaded"], result["singles"], result["gangs"]) == (16, 24, 0)
    assert result["running"] == result["deployments"] == 24


def test_e2e_stopped_part_way_stops_what_it_started_and_reports(tmp_path: Path) -> None:
    """SIGTERM while the deployments are submitted (a `timeout` around the bench): the controller
    and the fleet it started are gone when it exits, and it printed what it measured up to then.
    Offered at 10/s (~5 s of submits): one closed-loop client once submitted all 49 in under a
    second, before a progress line (its scrape of the controller included) said 'submitting'."""
    with bench_session("e2e", "--nodes", "16", "--db", "sqlite", "--rate", "10", "--arrivals", "even",
                       "--load-delay", "0.05", "--fill", "1", "--progress-every", "0.2") as bench:
        assert bench.stderr is not None
        for line in bench.stderr:  # progress lines: wait until the submits are under way
            if "] submitting" in line:
                break
        else:
            raise AssertionError(f"no progress line said 'submitting': {bench.communicate()}")
        bench.send_signal(signal.SIGTERM)
        out, _ = bench.communicate(timeout=120)
        left = session_processes(bench.pid)
    assert bench.returncode == 130, out
    assert "stopped while submitting: cancelled" in out and "submit p50/p99" in out
    assert left == [], f"processes of the run still alive: {left}"


def test_e2e_open_loop_offers_every_deployment_at_its_rate(tmp_path: Path) -> None:
    """`--rate`: every deployment submitted at its arrival time (no clients), all of them ran,
    the checker agrees; the report names the load and how late the bench sent."""
    done, result = _e2e(tmp_path, "--rate", "40", "--arrivals", "even", "--delete-every", "0")
    assert result["submitted"] == result["running"] == result["deployments"] == 25
    assert result["load"] == "open loop, 40/s offered (even)"
    assert result["send_late"] is not None and result["offered_per_s"] > 0
    assert result["submit_server"]["p99_ms"] is not None  # the controller's own timing, interpolated
    assert "open loop, 40/s offered" in done.stdout


def test_e2e_deleters_send_every_nth_delete_with_at_most_n_at_the_controller_at_once() -> None:
    """`--deleters N`: every `--delete-every`-th deployment to run is deleted, by N clients each
    waiting for its last answer: up to N deletes at the controller at once (1: one after another)."""
    import asyncio

    from bench.e2e import Run, Times, deleter

    async def deleted_with(deleters: int) -> tuple[list[str], int]:
        sent: list[str] = []
        at_once = {"now": 0, "most": 0}
        answer = asyncio.Event()

        async def delete(request, **_: object) -> None:  # noqa: ANN001
            sent.append(request.name)
            at_once["now"] += 1
            at_once["most"] = max(at_once["most"], at_once["now"])
            await answer.wait()
            at_once["now"] -= 1

        class Channel:  # what the stub asks of a channel
            def unary_unary(self, method: str, **_: object):  # noqa: ANN201
                return delete

            unary_stream = stream_unary = stream_stream = unary_unary

        run = Run()
        names = [f"d{i}" for i in range(12)]
        run.times = {name: Times() for name in names}
        task = asyncio.create_task(deleter(Channel(), run, 2, deleters))
        for name in names:
            run.newly_running.put_nowait(name)
        for _ in range(20):
            await asyncio.sleep(0)
        answer.set()
        run.newly_running.put_nowait("")
        await asyncio.wait_for(task, 10)
        assert len(run.delete_rpc_ms) == len(sent)
        assert all(0 < t.delete_due <= t.delete_sent <= t.delete_answered for name, t in run.times.items() if name in sent)
        return sent, at_once["most"]

    for deleters, most in ((1, 1), (4, 4)):
        sent, at_once = asyncio.run(deleted_with(deleters))
        assert sorted(sent) == sorted(f"d{i}" for i in range(1, 12, 2))
        assert at_once == most


# A process that counts the SIGTERMs it gets (on stderr) and exits 0.5 s after the first.
_COUNTS_SIGTERMS = """
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(time.monotonic()))
print("ready", flush=True)
while not got or time.monotonic() < got[0] + 0.5:
    time.sleep(0.01)
print(f"sigterms {len(got)}", file=sys.stderr, flush=True)
"""


def test_stop_all_tells_each_process_once(tmp_path: Path) -> None:
    """Every fleet is sent SIGTERM, then waited for without a second one (which, landing after a
    fleet's loop closed, killed it: exit -15)."""
    from bench.e2e import Process, stop_all

    processes = [Process(f"p{i}", [sys.executable, "-c", _COUNTS_SIGTERMS], tmp_path / f"p{i}.log") for i in range(3)]
    for process in processes:
        assert process.proc.stdout is not None and process.proc.stdout.readline() == "ready\n"
    stop_all(processes)
    assert [process.proc.returncode for process in processes] == [0, 0, 0]
    assert [(tmp_path / f"p{i}.log").read_text() for i in range(3)] == ["sigterms 1\n"] * 3

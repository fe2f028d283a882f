"""`python -m bench join` on a tiny fleet (real controller and simnode processes): what it reports
is about a join that happened (every node ready and still ready after the steady window, every
Register through the admission gate, none abandoned in its queue); never its times."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchrun import bench_session, session_processes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_join_reports_every_node_ready_registered_and_heartbeating(tmp_path: Path) -> None:
    out = tmp_path / "join.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "join", "--nodes", "32", "--nodes-per-fleet", "16", "--db", "sqlite",
         "--steady", "4", "--heartbeat-timeout", "3", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = json.loads(out.read_text())
    assert run["nodes"] == 32 and run["fleets"] == 2 and run["all_ready"] and run["ready_after_steady"] == 32
    agents = run["agents_after_steady"]
    assert agents["connected"] == 32 and agents["register_ok"] >= 32 and agents["register_p99_ms"] is not None
    assert agents["heartbeats_sent"] > run["agents_at_join"]["heartbeats_sent"]
    assert run["admission_at_end"]["admitted_total"] >= 32 and run["admission_at_end"]["abandoned_total"] == 0
    assert run["controller_peak_rss_mib"] > 0 and run["controller_exit"] == 0


def test_join_stopped_part_way_stops_its_controller_and_fleets(tmp_path: Path) -> None:
    """SIGTERM while the fleets join (a `timeout` around the bench): the controller and every fleet
    it started are gone when it exits (it used to die at once and leave them running)."""
    with bench_session("join", "--nodes", "32", "--nodes-per-fleet", "16", "--db", "sqlite",
                       "--steady", "120", "--heartbeat-timeout", "3") as bench:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the bench, its controller and its two fleets
            if len(session_processes(bench.pid)) >= 4:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the fleets never started: {bench.communicate(timeout=5)}")
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=120)
        left = session_processes(bench.pid)
    assert bench.returncode == 130, err
    assert "everything this run started has been stopped" in err
    assert left == [], f"processes of the run still alive: {left}"


"""A `maia-simnode` fleet restarted (SIGTERM, then started again on its --state-dir) against a real
`maia-controller` process: its nodes come back holding the shards they ran, reported running in their
first heartbeat, and the controller keeps them where they were (no shard loaded again, none moved);
a shard the controller stopped assigning while the fleet was down is stopped and released."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

TOPOLOGY = """\
kind: Topology
zones: [{id: z1}]
rows: [{id: row-a, zone: z1, power_budget_w: 40000}]
racks: [{id: rack-00, row: row-a, power_budget_w: 20000}]
"""
WORKLOAD = """\
kind: Tenant
id: team-a
isolation: shared
---
kind: Deployment
name: gang
tenant: team-a
replicas: 1
shards_per_replica: 6
shard: {accelerators: 1, power_w: 700}
locality: rack
---
kind: Deployment
name: halves
tenant: team-a
replicas: 2
shards_per_replica: 1
shard: {accelerators: 1, accelerator_milli: 500, power_w: 600}
locality: node
"""


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


@pytest.fixture
def controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A `maia-controller` on SQLite (default node graces: down after 30 s, evicted after 90 s);
    MAIA_TOKEN is set to its bootstrap admin token."""
    out = (tmp_path / "controller.out").open("w")
    err = (tmp_path / "controller.log").open("w")
    proc = subprocess.Popen(
        [tool("maia-controller"), "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path}/maia.db",
         "--heartbeat-timeout", "10", "--reconcile-interval", "0.5",
         "--bootstrap-admin-token-file", str(tmp_path / "admin.token")],
        stdout=out, stderr=err)
    address = ""
    deadline = time.monotonic() + 60
    while not address and time.monotonic() < deadline and proc.poll() is None:
        match = re.search(r"listening on (\S+)", (tmp_path / "controller.out").read_text())
        address = match.group(1) if match else ""
        time.sleep(0.1)
    if not address:
        proc.kill()
        pytest.fail("controller did not start: " + (tmp_path / "controller.log").read_text()[-2000:])
    monkeypatch.setenv("MAIA_TOKEN", (tmp_path / "admin.token").read_text().strip())
    yield address
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


def maiactl(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("maiactl"), "--controller", address, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MAIA_CONTROLLER": ""})


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def fleet(controller: str, state_dir: Path, log: Path, bootstrap: str, load_delay_s: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([tool("maia-simnode"), "--controller", controller, "--racks", "1", "--nodes-per-rack", "4",
                             "--load-delay", str(load_delay_s), "--state-dir", str(state_dir)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "MAIA_TOKEN": bootstrap})


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


def placements(controller: str) -> dict[tuple[str, int, int], tuple[str, str]]:
    """(deployment, replica, shard) -> (node, phase)."""
    items = json.loads(ok(maiactl(controller, "placements", "-o", "json")))["items"]
    return {(p["deployment"], p["replica"], p["shard"]): (p["node"], p["phase"]) for p in items}


def test_a_restarted_fleet_keeps_its_shards_where_they_ran(controller: str, tmp_path: Path) -> None:
    (tmp_path / "topology.yaml").write_text(TOPOLOGY)
    (tmp_path / "workload.yaml").write_text(WORKLOAD)
    ok(maiactl(controller, "apply", "-f", str(tmp_path / "topology.yaml")))
    bootstrap = ok(maiactl(controller, "token", "create", "--role", "node-bootstrap", "--name", "fleet")).strip()
    state = tmp_path / "state"

    first = fleet(controller, state, tmp_path / "first.log", bootstrap, 0.3)
    try:
        ok(maiactl(controller, "wait", "nodes", "--connected", "4", "--timeout", "30"))
        ok(maiactl(controller, "apply", "-f", str(tmp_path / "workload.yaml")))
        ok(maiactl(controller, "wait", "deployment", "gang", "halves", "--timeout", "60"))
        before = placements(controller)
        assert len(before) == 8 and {phase for _, phase in before.values()} == {"running"}
    finally:
        assert stop(first) == 0
    kept = json.loads(next(state.glob("shards-*.json")).read_text())["nodes"]
    assert sum(len(node["shards"]) for node in kept.values()) == 8

    # While the fleet is down (within the controller's node graces) `halves` is deleted: its shards,
    # restored on their nodes, are no longer assigned and must be stopped and released.
    # Back with a load of 60 s: a shard loaded again could not be running before the checks below end.
    ok(maiactl(controller, "delete", "deployment", "halves"))
    second = fleet(controller, state, tmp_path / "second.log", bootstrap, 60)
    try:
        ok(maiactl(controller, "wait", "nodes", "--connected", "4", "--timeout", "30"))
        ok(maiactl(controller, "wait", "deployment", "halves", "--for", "deleted", "--timeout", "30"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(  # the first heartbeats' RUNNING written
                phase != "running" for _, phase in placements(controller).values()):
            time.sleep(0.3)
        after = placements(controller)
    finally:
        assert stop(second) == 0
    assert after == {key: place for key, place in before.items() if key[0] == "gang"}  # same nodes, running
    text = (tmp_path / "second.log").read_text()
    assert not re.search(r"gang/\d+/\d+ loading", text), text[-3000:]  # nothing loaded again
    assert len(re.findall(r"halves/\d/0 stopped", text)) == 2
    assert "8 shards restored" in text

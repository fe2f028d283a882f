"""End to end: a real maia-controller (SQLite, port 0), a real maia-simnode fleet of 4 nodes,
and maiactl, all as subprocesses, the way deploy/demo.sh runs them. A fleet restarted (SIGTERM,
then started again on its --state-dir) comes back holding the shards its nodes ran, reported
running in their first heartbeat, and the controller keeps them where they were (none loaded
again, none moved); a shard it stopped assigning meanwhile is stopped and released."""
from __future__ import annotations

import importlib.util
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

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("controller.main") is None or importlib.util.find_spec("controller.api.server") is None,
    reason="maia-controller (controller.main / controller.api.server) is not there yet")

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
    """The controller's address; MAIA_TOKEN is set to its bootstrap admin token."""
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
    assert (tmp_path / "admin.token").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("MAIA_TOKEN", (tmp_path / "admin.token").read_text().strip())
    yield address
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


def maiactl(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("maiactl"), "--controller", address, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MAIA_CONTROLLER": ""})


def test_simulated_nodes_run_what_the_controller_assigns(controller: str, tmp_path: Path) -> None:
    (tmp_path / "topology.yaml").write_text(TOPOLOGY)
    (tmp_path / "workload.yaml").write_text(WORKLOAD)
    assert maiactl(controller, "apply", "-f", str(tmp_path / "topology.yaml")).returncode == 0

    created = maiactl(controller, "token", "create", "--role", "node-bootstrap", "--name", "fleet")
    assert created.returncode == 0, created.stderr
    bootstrap = created.stdout.strip()
    assert bootstrap.startswith("maia_") and "\n" not in bootstrap  # the secret alone on stdout

    log = (tmp_path / "simnode.log").open("w")
    fleet = subprocess.Popen([tool("maia-simnode"), "--controller", controller, "--racks", "1",
                              "--nodes-per-rack", "4", "--load-delay", "0.3", "--state-dir", str(tmp_path / "state")],
                             stdout=log, stderr=log,
                             env={**os.environ, "MAIA_TOKEN": bootstrap})
    try:
        waited = maiactl(controller, "wait", "nodes", "--connected", "4", "--timeout", "30")
        assert waited.returncode == 0, waited.stderr

        applied = maiactl(controller, "apply", "-f", str(tmp_path / "workload.yaml"))
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.splitlines() == ["tenant/team-a created", "deployment/gang created",
                                               "deployment/halves created"]

        waited = maiactl(controller, "wait", "deployment", "gang", "halves", "--timeout", "60")
        assert waited.returncode == 0, waited.stderr

        placements = json.loads(maiactl(controller, "placements", "-o", "json").stdout)["items"]
        assert len(placements) == 8
        assert {p["phase"] for p in placements} == {"running"}
        assert {p["rack"] for p in placements} == {"rack-00"}

        nodes = json.loads(maiactl(controller, "get", "nodes", "-o", "json").stdout)["items"]
        assert len(nodes) == 4 and all(n["status"]["connected"] for n in nodes)
        # power the agents report: 4 x 600 W idle + 6 x 700 W + 2 x 300 W once heartbeats caught up
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            nodes = json.loads(maiactl(controller, "get", "nodes", "-o", "json").stdout)["items"]
            total = sum(n["status"]["power_draw_w"] for n in nodes)
            if total == pytest.approx(4 * 600 + 6 * 700 + 2 * 300):
                break
            time.sleep(0.5)
        assert total == pytest.approx(4 * 600 + 6 * 700 + 2 * 300)

        deleted = maiactl(controller, "delete", "deployment", "halves")
        assert deleted.returncode == 0, deleted.stderr
        gone = maiactl(controller, "wait", "deployment", "halves", "--for", "deleted", "--timeout", "30")
        assert gone.returncode == 0, gone.stderr
    finally:
        fleet.send_signal(signal.SIGINT)
        code = fleet.wait(timeout=20)
    assert code == 0
    text = (tmp_path / "simnode.log").read_text()
    assert "gang/0/5 running" in text
    assert re.search(r"halves/\d/0 stopped", text)
    assert "all 4 nodes stopped" in text


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

"""maiactl against a real controller with real simulated nodes (2 racks x 2 nodes x 4
accelerators, `maia-simnode`): explain's suggestion, the rack map, filters on placed work."""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from bench.checking import check_state
from cli_harness import BIN, RunningController, controller_process, maiactl

TOPOLOGY = """kind: Topology
zones: [{id: z1}]
rows: [{id: row-a, zone: z1, power_budget_w: 100000}]
racks:
  - {id: rack-00, row: row-a, power_budget_w: 56000}
  - {id: rack-01, row: row-a, power_budget_w: 56000}
---
kind: Tenant
id: lab
---
kind: Tenant
id: other
"""
# With one node of each rack cordoned, a rack has one node left: 2 shards x 3 accelerators fit
# in the row (one shard on each rack's ready node) but in no rack.
TOO_BIG_FOR_A_RACK = """kind: Deployment
name: wide
tenant: lab
replicas: 1
shards_per_replica: 2
shard: {accelerators: 3}
locality: rack
"""

SMALL = """kind: Deployment
name: small
tenant: other
replicas: 1
shards_per_replica: 1
shard: {accelerators: 1}
locality: node
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningController]:
    with controller_process(tmp_path_factory.mktemp("cluster")) as running:
        (running.folder / "setup.yaml").write_text(TOPOLOGY)
        assert running.ctl("apply", "-f", str(running.folder / "setup.yaml")).returncode == 0
        bootstrap = running.ctl("token", "create", "--role", "node-bootstrap").stdout.strip()
        fleet = subprocess.Popen([str(BIN / "maia-simnode"), "--controller", running.address, "--racks", "2",
                                  "--nodes-per-rack", "2", "--load-delay", "0.1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "MAIA_TOKEN": bootstrap})
        try:
            waited = running.ctl("wait", "nodes", "--connected", "4", "--timeout", "60")
            assert waited.returncode == 0, waited.stderr
            names = running.ctl("get", "nodes", "-o", "name").stdout.split()
            first_of_each_rack = [n.removeprefix("node/") for n in names if n.removeprefix("node/").startswith(
                ("rack-00-", "rack-01-"))][::2]
            assert running.ctl("cordon", *first_of_each_rack).returncode == 0
            (running.folder / "work.yaml").write_text(TOO_BIG_FOR_A_RACK + "---\n" + SMALL)
            assert running.ctl("apply", "-f", str(running.folder / "work.yaml")).returncode == 0
            ran = running.ctl("wait", "deployment", "small", "--timeout", "60")
            assert ran.returncode == 0, ran.stderr
            yield running
        finally:
            fleet.terminate()
            fleet.wait(timeout=30)


def test_explain_names_the_reason_and_the_smallest_change(cluster: RunningController) -> None:
    proc = cluster.ctl("explain", "deployment", "wide")
    assert proc.returncode == 0, proc.stderr
    assert "deployment/wide: Pending, 0/1 replicas placed" in proc.stdout
    assert "Why (the solver's reasons" in proc.stdout
    assert "Smallest change that fits: locality: row" in proc.stdout
    doc = json.loads(cluster.ctl("explain", "deployment", "wide", "-o", "json").stdout)
    assert doc["suggestion"] == "locality: row" and doc["reasons"]
    assert doc["tried"][0] == {"change": "as it is", "would_place": 0}
    settled = cluster.ctl("explain", "deployment", "small")
    assert "nothing to explain" in settled.stdout


def test_map_draws_racks_nodes_and_tenants_in_plain_text(cluster: RunningController) -> None:
    proc = cluster.ctl("map")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("row row-a (zone z1)  power [")
    assert any(line.startswith("  rack rack-00  2 nodes, ") for line in lines)
    assert "\x1b[" not in proc.stdout  # no colour codes off a terminal
    assert "tenants: A other" in proc.stdout
    assert sum(line.count("A") for line in lines if line.startswith("    n")) == 1  # small's 1 accelerator


def test_filters_on_placed_work(cluster: RunningController) -> None:
    nodes = cluster.ctl("get", "nodes", "--tenant", "other", "-o", "name").stdout.split()
    assert len(nodes) == 1
    rack = json.loads(cluster.ctl("get", "placements", "-o", "json").stdout)["items"][0]["rack"]
    assert cluster.ctl("get", "deployments", "--rack", rack, "-o", "name").stdout.split() == ["deployment/other/small"]
    other = "rack-01" if rack == "rack-00" else "rack-00"
    assert cluster.ctl("get", "deployments", "--rack", other, "-o", "name").stdout == ""


def test_drain_wait_blocks_until_the_work_runs_elsewhere(cluster: RunningController) -> None:
    before = json.loads(cluster.ctl("get", "placements", "-o", "json").stdout)["items"][0]["node"]
    # A typo among the nodes: the one drained is waited for all the same (it was not), and the
    # exit code says the typo (NOT_FOUND).
    proc = cluster.ctl("drain", before, "no-such-node", "--wait", "--timeout", "60")
    assert proc.returncode == 3, proc.stderr
    assert "node/no-such-node failed: NOT_FOUND" in proc.stderr
    after = json.loads(cluster.ctl("get", "placements", "-o", "json").stdout)["items"][0]["node"]
    assert after != before
    # Make-before-break: the replacement ran beside the old replica before that one stopped.
    assert "2/1 running" in proc.stderr and "1 on draining nodes still running until replaced" in proc.stderr, proc.stderr
    # Draining as it starts (it said "drained" before anything had moved); drained once moved.
    assert proc.stdout.splitlines()[0] == f"node/{before} draining (state cordoned, 1 shards)"
    assert proc.stdout.splitlines()[1:] == [f"drained {before}: 1 shard(s) moved",
                                            f"  other/small replica 0 shard 0: {before} -> {after} (now replica 1)"]
    assert cluster.ctl("uncordon", before).returncode == 0


def test_snapshot_is_the_committed_state_that_solve_and_the_checker_read(cluster: RunningController) -> None:
    proc = cluster.ctl("snapshot", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    problem = json.loads(proc.stdout)
    assert problem["version"] == 1 and len(problem["nodes"]) == 4
    assert sorted(n["state"] for n in problem["nodes"]).count("cordoned") == 2  # the two cordoned in setup
    placed = json.loads(cluster.ctl("get", "placements", "-o", "json").stdout)["items"]
    assert len(problem["placements"]) == len(placed) > 0
    assert check_state(problem, problem["placements"]) == []
    (cluster.folder / "snapshot.json").write_text(proc.stdout)
    solved = cluster.ctl("solve", str(cluster.folder / "snapshot.json"), "-o", "json")
    assert solved.returncode == 0, solved.stderr
    assert {p["deployment"] for p in json.loads(solved.stdout)["placements"]} >= {"other/small"}  # ids are TENANT/NAME
    assert "Placements:" in cluster.ctl("snapshot").stdout
    lab = cluster.ctl("token", "create", "--tenant", "lab").stdout.strip()
    denied = maiactl(cluster.address, "snapshot", "-o", "json", token=lab)
    assert denied.returncode != 0 and "error: PERMISSION_DENIED" in denied.stderr and denied.stdout == ""


def test_a_token_named_as_token_list_prints_it_is_revoked(cluster: RunningController) -> None:
    """`token list -o name` prints token/ID; `token revoke` reads that word back."""
    made = cluster.ctl("token", "create", "--role", "admin", "--name", "short-lived", "-o", "json")
    assert made.returncode == 0, made.stderr
    token_id = json.loads(made.stdout)["id"]
    assert f"token/{token_id}" in cluster.ctl("token", "list", "-o", "name").stdout.split()
    revoked = cluster.ctl("token", "revoke", f"token/{token_id}")
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"token/{token_id} revoked"


def test_token_revoke_revokes_every_id_it_can_and_says_which_it_could_not(cluster: RunningController) -> None:
    """A typo among the IDs of leaked tokens stopped the revocation there: the tokens named after
    it stayed live, with no word of them (exit 3 as for one missing token)."""
    ids = [json.loads(cluster.ctl("token", "create", "--role", "admin", "--name", f"leaked-{i}", "-o", "json").stdout)
           ["id"] for i in range(2)]
    revoked = cluster.ctl("token", "revoke", ids[0], "typo0000", ids[1])
    assert revoked.returncode == 3
    assert revoked.stdout.split("\n")[:2] == [f"token/{ids[0]} revoked", f"token/{ids[1]} revoked"]
    assert revoked.stderr.strip() == "token/typo0000 failed: NOT_FOUND: token typo0000 not found"
    listed = json.loads(cluster.ctl("token", "list", "-o", "json").stdout)["tokens"]
    assert all(t.get("revoked_at") for t in listed if t["id"] in ids)


def test_token_create_node_makes_a_bootstrap_token_bound_to_that_node(cluster: RunningController) -> None:
    made = cluster.ctl("token", "create", "--node", "rack-07-n03", "-o", "json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert (token["role"], token["node"]) == ("node-bootstrap", "rack-07-n03")
    listed = cluster.ctl("token", "list", "--role", "node-bootstrap", "-o", "json")
    assert [t["node"] for t in json.loads(listed.stdout)["tokens"] if t["id"] == token["id"]] == ["rack-07-n03"]
    wrong = cluster.ctl("token", "create", "--role", "admin", "--node", "rack-07-n03")
    assert wrong.returncode == 2 and wrong.stderr.strip() == \
        "error: token create --node makes a node-bootstrap token, not admin"

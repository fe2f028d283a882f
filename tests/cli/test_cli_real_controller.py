"""The real `maiactl` binary against a real `maia-controller` process (SQLite, port 0): output
formats, exit codes, the get -o yaml -> apply round trip, all-or-nothing apply, delete reporting
every object, filters that work or are refused. No nodes run, so deployments stay Pending."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cli_harness import RunningController, controller_process, maiactl
from tests.addresses import closed_port_address

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"

DEPLOYMENT = """kind: Deployment
name: {name}
tenant: {tenant}
replicas: {replicas}
shards_per_replica: 2
shard: {{accelerators: 1, hbm_gib: 48, power_w: 700}}
locality: rack
priority: 10
"""


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningController]:
    with controller_process(tmp_path_factory.mktemp("controller")) as running:
        setup = running.ctl("apply", "-f", str(EXAMPLES / "topology.yaml"), "-f", str(EXAMPLES / "tenants.yaml"))
        assert setup.returncode == 0, setup.stderr
        yield running


def deployment_names(running: RunningController) -> list[str]:
    return running.ctl("get", "deployments", "-o", "name").stdout.split()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_get_yaml_applies_back_unchanged_and_a_changed_spec_says_what_differs(running: RunningController, tmp_path: Path):
    f = write(tmp_path / "d.yaml", DEPLOYMENT.format(name="round", tenant="openlab", replicas=1))
    created = running.ctl("apply", "-f", f)
    # no nodes: the dry run says it would not be placed now, apply still creates it (Pending)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("deployment/round created (only 0/1 replicas would be placed now")

    got = running.ctl("get", "deployment", "round", "-o", "yaml")
    assert got.returncode == 0, got.stderr
    doc = yaml.safe_load(got.stdout)
    assert doc["kind"] == "Deployment" and doc["locality"] == "rack" and doc["shard"]["hbm_gib"] == 48
    assert doc["status"]["phase"] == "pending"
    again = running.ctl("apply", "-f", write(tmp_path / "x.yaml", got.stdout))
    assert (again.returncode, again.stdout) == (0, "deployment/round unchanged\n")
    as_json = running.ctl("get", "deployment", "round", "-o", "json").stdout
    assert running.ctl("apply", "-f", "-", stdin=as_json).stdout == "deployment/round unchanged\n"

    doc["replicas"] = 3
    doc["shard"]["power_w"] = 650
    changed = write(tmp_path / "changed.yaml", yaml.safe_dump(doc))
    diff = running.ctl("diff", "-f", changed)
    assert diff.returncode == 1 and "replicas: 1 -> 3" in diff.stdout
    updated = running.ctl("apply", "-f", changed)  # in place: the replica count and a rolling change
    assert updated.returncode == 0, updated.stderr
    assert updated.stdout == ("deployment/round configured (replicas: 1 -> 3; shard.power_w: 700 -> 650): "
                              "rolling to revision 2 (maiactl rollout status round)\n")
    stored = yaml.safe_load(running.ctl("get", "deployment", "round", "-o", "yaml").stdout)
    assert stored["replicas"] == 3 and stored["shard"]["power_w"] == 650
    assert running.ctl("diff", "-f", changed).returncode == 0 and running.ctl("diff", "-f", f).returncode == 1
    scaled = running.ctl("scale", "round", "--replicas", "2")
    # Its tenant resolved, as -o name writes a deployment (the NAME read back: deployment/openlab/round).
    assert (scaled.returncode, scaled.stdout) == (0, "deployment/openlab/round scaled: replicas 3 -> 2 "
                                                     "(resource version 3)\n")
    waiting = running.ctl("rollout", "status", "round", "--timeout", "1")  # no nodes: never rolled out
    assert waiting.returncode == 1 and "timed out after 1s waiting for rolled-out" in waiting.stderr
    assert running.ctl("delete", "round").returncode == 0


def test_apply_is_all_or_nothing_and_refuses_empty_input(running: RunningController, tmp_path: Path):
    good = write(tmp_path / "a.yaml", DEPLOYMENT.format(name="alpha", tenant="openlab", replicas=1))
    bad = write(tmp_path / "b.yaml", DEPLOYMENT.format(name="beta", tenant="nosuch", replicas=1))
    proc = running.ctl("apply", "-f", good, "-f", bad)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: nothing applied:\ndeployment/beta: tenant nosuch does not exist")
    assert "alpha" not in deployment_names(running)

    empty = running.ctl("apply", "-f", write(tmp_path / "empty.yaml", "# nothing here\n"))
    assert empty.returncode == 2 and "no objects found" in empty.stderr
    folder = tmp_path / "dir"
    folder.mkdir()
    write(folder / "one.yaml", DEPLOYMENT.format(name="dir-one", tenant="openlab", replicas=1))
    write(folder / "two.yml", DEPLOYMENT.format(name="dir-two", tenant="openlab", replicas=1))
    write(folder / "notes.txt", "not a manifest")
    from_dir = running.ctl("apply", "-f", str(folder), "-o", "name")
    assert from_dir.stdout.split() == ["deployment/openlab/dir-one", "deployment/openlab/dir-two"], from_dir.stderr
    gone = running.ctl("delete", "-f", str(folder))
    assert gone.returncode == 0 and "deployment/openlab/dir-one deleted" in gone.stdout


def test_misspelt_field_gets_a_suggestion_and_nothing_is_sent(running: RunningController, tmp_path: Path):
    f = write(tmp_path / "typo.yaml", DEPLOYMENT.format(name="typo", tenant="openlab", replicas=1)
              + "min_replica: 1\n")
    proc = running.ctl("apply", "-f", f)
    assert proc.returncode == 2
    assert "min_replica: unknown field (did you mean 'min_replicas'?)" in proc.stderr
    assert "typo" not in deployment_names(running)


def test_delete_tries_every_name_and_reports_each(running: RunningController, tmp_path: Path):
    running.ctl("apply", "-f", write(tmp_path / "r.yaml", DEPLOYMENT.format(name="real-one", tenant="openlab",
                                                                                  replicas=1)))
    proc = running.ctl("delete", "deployment", "nosuch", "real-one")
    assert proc.returncode == 3  # the only failure was NOT_FOUND
    assert "deployment/nosuch failed: NOT_FOUND" in proc.stderr
    assert "deployment/openlab/real-one deleted" in proc.stdout  # its tenant resolved


def test_output_formats_and_headers(running: RunningController):
    table = running.ctl("get", "tenants").stdout.splitlines()
    assert table[0].split()[:2] == ["TENANT", "ISOLATION"]
    bare = running.ctl("get", "tenants", "--no-headers").stdout.splitlines()
    assert bare == table[1:]
    assert running.ctl("get", "tenants", "-o", "name").stdout.split() == [
        "tenant/anthropic", "tenant/msft-internal", "tenant/openlab"]
    doc = json.loads(running.ctl("get", "tenant", "anthropic", "-o", "json").stdout)
    assert doc == {"kind": "Tenant", "id": "anthropic", "isolation": "dedicated_rack", "excludes": ["openlab"],
                   "zones": ["eastus2-az1", "eastus2-az2"], "reserved_accelerators": 32, "max_accelerators": 64,
                   "max_power_w": 60000, "status": {"used_accelerators": 0, "used_power_w": 0}}
    topology = yaml.safe_load(running.ctl("get", "topology", "-o", "yaml").stdout)
    assert topology["kind"] == "Topology"
    same = running.ctl("apply", "-f", str(EXAMPLES / "topology.yaml"))
    assert (same.stdout, same.stderr) == ("topology unchanged\n", "")
    # A rack left out of the file is not removed, and apply says so (it said "unchanged" alone).
    topology["racks"] = [r for r in topology["racks"] if r["id"] != "rack-03"]
    topology.pop("status", None)
    smaller = running.ctl("apply", "-f", "-", stdin=yaml.safe_dump(topology))
    assert smaller.stdout == "topology unchanged\n"
    assert "the topology keeps rack rack-03, which the file leaves out (applying a topology adds and changes; " \
           "it removes nothing: maiactl delete rack|row|zone ID removes one that holds nothing)" in smaller.stderr


SPARE_TOPOLOGY = """kind: Topology
zones: [{id: spare-az}]
rows: [{id: spare-row, zone: spare-az}]
racks: [{id: spare-r1, row: spare-row}, {id: spare-r2, row: spare-row}]
"""


def test_delete_removes_empty_racks_rows_and_zones_children_first(running: RunningController, tmp_path: Path):
    f = write(tmp_path / "spare.yaml", SPARE_TOPOLOGY)
    assert running.ctl("apply", "-f", f).returncode == 0
    held = running.ctl("delete", "row", "spare-row")
    assert held.returncode == 1
    assert ("row/spare-row failed: FAILED_PRECONDITION: row spare-row holds 2 rack(s): spare-r1, spare-r2; "
            "delete them first") in held.stderr
    named = running.ctl("delete", "zone", "eastus2-az2")  # rows in it, and tenants name it
    assert named.returncode == 1 and "zone eastus2-az2 holds 1 row(s): row-b" in named.stderr
    # The file's items, racks before their row and the row before its zone, whatever the file's order.
    gone = running.ctl("delete", "-f", f)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines() == ["rack/spare-r1 deleted", "rack/spare-r2 deleted", "row/spare-row deleted",
                                        "zone/spare-az deleted"]
    left = yaml.safe_load(running.ctl("get", "topology", "-o", "yaml").stdout)
    assert [z["id"] for z in left["zones"]] == ["eastus2-az1", "eastus2-az2"]
    assert [r["id"] for r in left["racks"]] == ["rack-00", "rack-01", "rack-02", "rack-03"]
    again = running.ctl("delete", "rack/spare-r1")
    assert again.returncode == 3 and "rack/spare-r1 failed: NOT_FOUND: rack spare-r1 not found" in again.stderr


def test_filters_work_or_are_refused(running: RunningController):
    refused = running.ctl("get", "tenants", "--rack", "rack-00")
    assert refused.returncode == 2 and "--rack does not apply to tenants" in refused.stderr
    assert running.ctl("get", "nodes", "--tenant", "anthropic", "-o", "name").returncode == 0
    bad = running.ctl("get", "nodes", "-l", "novalue")
    assert bad.returncode == 2 and "expected key=value" in bad.stderr
    missing = running.ctl("get", "deployment", "nosuch")
    assert missing.returncode == 3 and missing.stderr.startswith("error: NOT_FOUND")


def test_partial_dry_run_exits_4(running: RunningController, tmp_path: Path):
    f = write(tmp_path / "p.yaml", DEPLOYMENT.format(name="part", tenant="openlab", replicas=2))
    proc = running.ctl("submit", "--dry-run", "-f", f)
    assert proc.returncode == 4
    assert "would place 0/2 replicas" in proc.stdout and "PARTIAL" in proc.stdout
    plan = running.ctl("apply", "--dry-run", "-f", f)
    assert plan.returncode == 4 and plan.stdout.startswith("+ deployment/part: would be created")
    assert "part" not in deployment_names(running)


def test_unreachable_controller_exits_5_with_a_hint():
    proc = maiactl(closed_port_address(), "get", "deployments", "--rpc-timeout", "3")
    assert proc.returncode == 5
    assert "cannot reach the controller" in proc.stderr and "hint:" in proc.stderr


def test_wait_stops_at_once_when_quota_blocks_the_deployment(running: RunningController, tmp_path: Path):
    f = write(tmp_path / "q.yaml", "kind: Tenant\nid: tiny\nmax_accelerators: 1\n---\n"
              + DEPLOYMENT.format(name="over-quota", tenant="tiny", replicas=1))
    assert running.ctl("apply", "-f", f).returncode == 0
    proc = running.ctl("wait", "deployment", "over-quota", "--for", "running", "--timeout", "50")
    assert proc.returncode == 4, proc.stderr
    assert "stopped waiting for running: blocked" in proc.stderr
    assert "QUOTA_ACCELERATORS: tenant tiny holds 0 accelerators + 2 needed > 1 max_accelerators" in proc.stderr
    assert running.ctl("delete", "over-quota").returncode == 0


def test_version_shows_client_and_server(running: RunningController):
    proc = running.ctl("version", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["client"]["version"] == doc["server"]["version"]
    assert doc["server"]["schema_revision"] and doc["server"]["address"] == running.address
    text = running.ctl("version").stdout.splitlines()
    assert text[0].startswith("Client: maiactl ") and text[1].startswith("Server: maia-controller ")


def test_events_and_describe(running: RunningController, tmp_path: Path):
    running.ctl("apply", "-f", write(tmp_path / "e.yaml", DEPLOYMENT.format(name="evented", tenant="openlab",
                                                                                  replicas=1)))
    events = json.loads(running.ctl("get", "events", "--for", "deployment/evented", "-o", "json").stdout)
    assert [e["event"] for e in events["items"]][:1] == ["deployment.submitted"]
    assert {e["object"] for e in events["items"]} == {"deployment/openlab/evented"}  # the history names it TENANT/NAME
    table = running.ctl("get", "events", "--for", "tenant/openlab").stdout
    assert table.splitlines()[0].split() == ["TIME", "EVENT", "OBJECT", "ACTOR", "MESSAGE"]
    assert "tenant.created" in table
    bad = running.ctl("get", "events", "--for", "rack/x")
    assert bad.returncode == 2 and "expected KIND/NAME" in bad.stderr
    for ghost in ("node/ghost", "deployment/ghost", "tenant/ghost"):  # it said "No events.", exit 0
        missing = running.ctl("get", "events", "--for", ghost)
        assert (missing.returncode, missing.stdout) == (3, ""), missing.stderr
        assert missing.stderr.startswith(f"error: NOT_FOUND: {ghost.replace('/', ' ')}"), missing.stderr

    described = running.ctl("describe", "deployment", "evented")
    assert described.returncode == 0, described.stderr
    assert "Name:" in described.stdout and "Placements:" in described.stdout
    assert "Events:" in described.stdout and "deployment.submitted" in described.stdout
    described_yaml = running.ctl("describe", "tenant", "openlab", "-o", "yaml").stdout
    tenant = yaml.safe_load(described_yaml)
    assert "evented" in [d["name"] for d in tenant["status"]["deployments"]] and tenant["status"]["events"]
    # What describe says is a manifest too (its extras under status): it applied nothing, and failed
    # "events: unknown field" (exit 2).
    for kind, name in (("tenant", "openlab"), ("deployment", "openlab/evented")):
        again = tmp_path / f"{kind}.yaml"
        again.write_text(running.ctl("describe", kind, name, "-o", "yaml").stdout)
        reapplied = running.ctl("apply", "-f", str(again))
        assert reapplied.returncode == 0 and "unchanged" in reapplied.stdout, reapplied.stderr
    # Names are per tenant: TENANT/NAME or -n TENANT NAME say whose.
    assert running.ctl("get", "deployment", "openlab/evented", "-o", "name").stdout.split() == [
        "deployment/openlab/evented"]
    assert running.ctl("describe", "deployment", "evented", "-n", "openlab").returncode == 0
    assert running.ctl("get", "deployment", "evented", "-n", "nosuch").returncode == 3
    assert running.ctl("get", "deployment", "other/evented", "-n", "openlab").returncode == 2
    scaled = running.ctl("scale", "evented", "-n", "openlab", "--replicas", "1")  # main's newer by-name commands too
    assert scaled.returncode == 0 and "unchanged" in scaled.stdout, scaled.stderr
    assert running.ctl("scale", "openlab/nosuch", "--replicas", "1").returncode == 3
    assert running.ctl("describe", "node", "nosuch").returncode == 3
    assert running.ctl("describe", "rack", "x").returncode == 2
    running.ctl("delete", "evented")


def test_apply_sends_new_deployments_together_and_undoes_them_when_one_is_refused(running: RunningController,
                                                                                  tmp_path: Path):
    """One SubmitDeployments call (each deployment's audit entry says so); a request the controller
    refuses (a priority beyond its bounds, which only the write checks here: the plan does not dry-run
    the deployments of a tenant the files create) fails the apply, exits as its INVALID_ARGUMENT does
    (2), and deletes what its call wrote and the tenant it created; the tenant in the files,
    unchanged, is left alone (nothing was written to it, so nothing is "restored")."""
    f = write(tmp_path / "many.yaml", "---\n".join(DEPLOYMENT.format(name=name, tenant="openlab", replicas=1)
                                                   for name in ("many-a", "many-b")))
    proc = running.ctl("apply", "-f", f, "-o", "name")
    assert (proc.returncode, proc.stdout.splitlines()) == (0, ["deployment/openlab/many-a",
                                                                "deployment/openlab/many-b"]), proc.stderr
    entries = json.loads(running.ctl("audit", "list", "--tenant", "openlab", "-o", "json").stdout)["items"]
    submits = [e for e in entries if e["object_id"] in ("openlab/many-a", "openlab/many-b")]
    assert [(e["action"], e["outcome"], e["detail"].get("call")) for e in submits] == \
        [("/maia.v1.DeploymentService/SubmitDeployment", "OK", "/maia.v1.DeploymentService/SubmitDeployments")] * 2

    tenant = running.ctl("get", "tenant", "openlab", "-o", "yaml").stdout
    bad = DEPLOYMENT.format(name="refused-b", tenant="rf-lab", replicas=1).replace("priority: 10", "priority: 2000000")
    refused = write(tmp_path / "refused.yaml", "---\n".join(
        [tenant, DEPLOYMENT.format(name="refused-a", tenant="openlab", replicas=1), "kind: Tenant\nid: rf-lab\n", bad]))
    audited = len(json.loads(running.ctl("audit", "list", "--tenant", "openlab", "-o", "json").stdout)["items"])
    proc = running.ctl("apply", "-f", refused)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: deployment/refused-b failed: INVALID_ARGUMENT: "), lines
    assert lines[1:] == ["rolled back:", "  deployment/refused-a deleted again", "  tenant/rf-lab deleted again"]
    items = json.loads(running.ctl("get", "deployments", "-o", "json").stdout)["items"]
    assert [d for d in items if d["name"].startswith("refused-") and d["status"]["phase"] != "deleting"] == []
    entries = json.loads(running.ctl("audit", "list", "--tenant", "openlab", "-o", "json").stdout)["items"]
    assert not any("UpdateTenant" in e["action"] for e in entries[audited:]), entries[audited:]


def test_audit_json_is_a_list_with_numbers_as_numbers(running: RunningController):
    """int64 fields were strings ("seq": "1", "entries": "298"), and entries came as {"events": [...]}
    where every other list is a List document."""
    verified = json.loads(running.ctl("audit", "verify", "-o", "json").stdout)
    assert verified["intact"] is True and verified["first_bad_seq"] == 0
    assert type(verified["entries"]) is int and verified["head_seq"] == verified["entries"] >= 1
    listed = json.loads(running.ctl("audit", "list", "--limit", "2", "-o", "json").stdout)
    assert listed["kind"] == "List" and [(e["kind"], e["seq"]) for e in listed["items"]] == \
        [("AuditEvent", 1), ("AuditEvent", 2)]


def test_a_rollback_deletes_the_tenant_it_created_once_its_deployments_are_gone(running: RunningController,
                                                                               tmp_path: Path):
    """The new tenant's deployments deleted again stay Deleting until the controller released their
    shards; DeleteTenant meanwhile failed FAILED_PRECONDITION ("has 1 deployment(s)"), said "could not
    be undone", and left the tenant. The rollback now waits for them to be gone first."""
    bad = DEPLOYMENT.format(name="rb-b", tenant="rb-lab", replicas=1).replace("priority: 10", "priority: 2000000")
    f = write(tmp_path / "rb.yaml", "---\n".join(
        ["kind: Tenant\nid: rb-lab\n", DEPLOYMENT.format(name="rb-a", tenant="rb-lab", replicas=1), bad]))
    proc = running.ctl("apply", "-f", f)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: deployment/rb-b failed: INVALID_ARGUMENT: "), lines
    assert lines[1:] == ["rolled back:", "  deployment/rb-a deleted again", "  tenant/rb-lab deleted again"]
    assert running.ctl("get", "tenant", "rb-lab").returncode == 3


def test_the_plan_asks_the_controller_to_judge_each_write(running: RunningController, tmp_path: Path):
    """What only the controller checks is a conflict at the plan, before anything is written: a
    tenant naming a zone that does not exist, a rack in a row that does not exist, a deployment's
    update beyond its tenant's cap. They used to pass `apply --dry-run` and fail (or roll back)
    the apply."""
    base = write(tmp_path / "capped.yaml", "kind: Tenant\nid: capped\nmax_accelerators: 4\n---\n"
                 + DEPLOYMENT.format(name="capped-a", tenant="capped", replicas=1))
    assert running.ctl("apply", "-f", base).returncode == 0
    before = running.ctl("get", "tenants", "-o", "json").stdout
    topology = yaml.safe_load((EXAMPLES / "topology.yaml").read_text())
    topology["racks"].append({"id": "rack-new", "row": "row-nowhere"})
    cases = [
        ("kind: Tenant\nid: zoned\nzones: [mars]\n", 3, "tenant/zoned",
         "NOT_FOUND: tenant zoned names unknown zone(s): mars"),
        (yaml.safe_dump(topology), 3, "topology", "NOT_FOUND: unknown row(s) row-nowhere"),
        (DEPLOYMENT.format(name="capped-a", tenant="capped", replicas=3), 1, "deployment/capped-a",
         "RESOURCE_EXHAUSTED: deployment capped-a: 3 replicas need 6 accelerators"),
    ]
    for text, code, ref, refusal in cases:
        f = write(tmp_path / "case.yaml", "kind: Tenant\nid: fine\n---\n" + text)
        plan = running.ctl("apply", "--dry-run", "-f", f)
        assert plan.returncode == code, (plan.stdout, plan.stderr)
        assert f"! {ref}: conflict\n    {refusal}" in plan.stdout and "+ tenant/fine: would be created" in plan.stdout
        proc = running.ctl("apply", "-f", f)
        assert proc.returncode == code and proc.stderr.startswith("error: nothing applied:\n"), proc.stderr
        assert f"\n{ref}: {refusal}" in proc.stderr
    assert running.ctl("get", "tenants", "-o", "json").stdout == before  # "fine" neither: nothing written
    stored = running.ctl("get", "topology", "-o", "json")
    assert stored.returncode == 0 and "rack-new" not in stored.stdout
    assert running.ctl("delete", "capped-a", "-n", "capped").returncode == 0


def test_what_o_name_prints_every_by_name_command_reads_back(running: RunningController, tmp_path: Path):
    """Names are per tenant: `-o name` printed `deployment/twin` twice for two tenants' `twin`,
    `delete deployment/twin` read `deployment` as the tenant (NOT_FOUND), `delete
    deployment/TENANT/NAME` (delete's own words) failed INVALID_ARGUMENT with exit 1, and `get` and
    `describe` refused KIND/NAME as usage errors."""
    both = "---\n".join(DEPLOYMENT.format(name="twin", tenant=t, replicas=1) for t in ("openlab", "msft-internal"))
    assert running.ctl("apply", "-f", write(tmp_path / "twins.yaml", both)).returncode == 0
    names = [n for n in deployment_names(running) if n.endswith("/twin")]
    assert names == ["deployment/msft-internal/twin", "deployment/openlab/twin"]

    got = running.ctl("get", *names, "-o", "name")
    assert (got.returncode, got.stdout.split()) == (0, names), got.stderr
    one = running.ctl("get", "deployment", "deployment/openlab/twin", "-o", "json")
    assert json.loads(one.stdout)["tenant"] == "openlab", one.stderr
    described = running.ctl("describe", names[0], "-o", "name")
    assert (described.returncode, described.stdout) == (0, "deployment/msft-internal/twin\n"), described.stderr
    assert running.ctl("get", "tenant/openlab", "-o", "name").stdout == "tenant/openlab\n"
    assert running.ctl("describe", "tenant/openlab").returncode == 0
    assert running.ctl("get", "deployment/openlab/twin", "tenant/openlab").returncode == 2  # one kind per get
    ambiguous = running.ctl("delete", "deployment/twin")  # the name, not a tenant 'deployment'
    assert ambiguous.returncode == 1 and "tenant deployment" not in ambiguous.stderr, ambiguous.stderr
    assert "twin" in ambiguous.stderr and "FAILED_PRECONDITION" in ambiguous.stderr, ambiguous.stderr

    invalid = running.ctl("delete", "deployment/bad tenant!/twin")
    assert invalid.returncode == 2 and "INVALID_ARGUMENT" in invalid.stderr, invalid.stderr  # docs/cli.md: 2
    mixed = running.ctl("delete", "deployment/bad tenant!/twin", "openlab/nosuch")  # unlike failures: 1
    assert mixed.returncode == 1, mixed.stderr
    deleted = running.ctl("delete", *names)
    assert (deleted.returncode, deleted.stdout.splitlines()) == (
        0, [f"{n} deleted (phase Deleting)" for n in names]), deleted.stderr


def test_scale_wait_and_explain_read_what_o_name_prints(running: RunningController, tmp_path: Path):
    """`wait deployment/TENANT/NAME` and `explain deployment/TENANT/NAME` were usage errors
    (argparse: invalid choice), `scale deployment NAME` too (unrecognized arguments), and `scale
    deployment/TENANT/NAME` said `deployment/deployment/TENANT/NAME scaled`."""
    assert running.ctl("apply", "-f", write(tmp_path / "s.yaml", DEPLOYMENT.format(
        name="scaled", tenant="openlab", replicas=1))).returncode == 0
    [word] = [n for n in deployment_names(running) if n.endswith("/scaled")]
    assert word == "deployment/openlab/scaled"
    scaled = running.ctl("scale", word, "--replicas", "2")
    assert (scaled.returncode, scaled.stdout) == (0, f"{word} scaled: replicas 1 -> 2 (resource version 2)\n"), \
        scaled.stderr
    again = running.ctl("scale", "deployment", "scaled", "--replicas", "2")
    assert (again.returncode, again.stdout) == (0, f"{word} unchanged: already 2 replicas\n"), again.stderr
    explained = running.ctl("explain", word, "-o", "json")
    assert explained.returncode == 0 and json.loads(explained.stdout)["deployment"] == "scaled", explained.stderr
    pending = running.ctl("wait", word, "--timeout", "1")  # no nodes: never running
    assert pending.returncode == 1 and "openlab/scaled: Pending" in pending.stderr, pending.stderr
    assert running.ctl("delete", word).returncode == 0
    gone = running.ctl("wait", "deployment", word, "--for", "deleted", "--timeout", "30")
    assert (gone.returncode, gone.stdout) == (0, f"{word} condition met (deleted)\n"), gone.stderr


def test_rollout_history_lists_each_revision_and_undo_rolls_the_template_back(running: RunningController,
                                                                               tmp_path: Path):
    assert running.ctl("apply", "-f", write(tmp_path / "h.yaml", DEPLOYMENT.format(
        name="hist", tenant="openlab", replicas=1))).returncode == 0
    bigger = DEPLOYMENT.format(name="hist", tenant="openlab", replicas=2).replace("hbm_gib: 48", "hbm_gib: 64")
    assert running.ctl("apply", "-f", write(tmp_path / "h2.yaml", bigger)).returncode == 0

    table = running.ctl("rollout", "history", "hist")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["REVISION", "CURRENT", "CREATED", "SHARDS", "SHARD", "LOCALITY", "SPREAD", "CHANGES"]
    assert lines[1].split()[:2] == ["2", "yes"] and lines[1].endswith("shard.hbm_gib: 48 -> 64")
    assert lines[2].split()[:2] == ["1", "-"] and "48 GiB" in lines[2] and len(lines) == 3
    one = json.loads(running.ctl("rollout", "history", "hist", "--revision", "1", "-o", "json").stdout)
    assert (one["revision"], one["current"], one["spec"]["shard"]["hbm_gib"], one["spec"]["replicas"]) == (1, False, 48, 1)
    detail = running.ctl("rollout", "history", "hist", "--revision", "2").stdout
    assert "Current:" in detail and "Changes:" in detail and "shard.hbm_gib: 48 -> 64" in detail
    assert "1 acc, 64 GiB, 700 W" in detail

    dry = running.ctl("rollout", "undo", "hist", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("(dry run) deployment/") and "rolled back to revision 1's template (now revision 3)" \
        in dry.stdout and "shard.hbm_gib: 64 -> 48" in dry.stdout
    assert json.loads(running.ctl("get", "deployment", "hist", "-o", "json").stdout)["status"]["revision"] == 2

    undone = running.ctl("rollout", "undo", "hist")
    assert undone.returncode == 0, undone.stderr
    assert "rolled back to revision 1's template (now revision 3): shard.hbm_gib: 64 -> 48" in undone.stdout
    doc = json.loads(running.ctl("get", "deployment", "hist", "-o", "json").stdout)
    assert (doc["status"]["revision"], doc["shard"]["hbm_gib"], doc["replicas"]) == (3, 48, 2)
    again = running.ctl("rollout", "undo", "hist", "--to-revision", "3")
    assert again.returncode == 0 and "unchanged: its template already is revision 3's" in again.stdout

    missing = running.ctl("rollout", "undo", "hist", "--to-revision", "9")
    assert missing.returncode == 3 and "no revision 9 kept (kept: 1, 2, 3;" in missing.stderr
    assert running.ctl("rollout", "history", "hist", "-o", "name").stdout.split() == [
        "revision/openlab/hist/3", "revision/openlab/hist/2", "revision/openlab/hist/1"]

    restarted = running.ctl("rollout", "restart", "hist")
    assert restarted.returncode == 0, restarted.stderr
    assert "restarted (revision 4): its replicas are replaced one at a time" in restarted.stdout
    newest = json.loads(running.ctl("rollout", "history", "hist", "-o", "json").stdout)["items"][0]
    assert (newest["revision"], newest["changes"], newest["spec"]["shard"]["hbm_gib"]) == (
        4, ["restart: every replica replaced by a new one, one at a time"], 48)


def test_delete_of_a_file_with_a_tenant_and_its_deployments_deletes_both(running: RunningController, tmp_path: Path):
    """The tenant was deleted right after its deployments, which stay DELETING a while: refused,
    'tenant temp-t has 1 deployment(s)', exit 1. It waits for them now."""
    f = write(tmp_path / "td.yaml", "kind: Tenant\nid: temp-t\n---\n"
              + DEPLOYMENT.format(name="tdep", tenant="temp-t", replicas=1))
    assert running.ctl("apply", "-f", f).returncode == 0
    gone = running.ctl("delete", "-f", f)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.splitlines()[1:] == ["tenant/temp-t deleted"], gone.stdout


def test_get_of_one_object_named_twice_prints_it_once(running: RunningController, tmp_path: Path):
    """`x` and `TENANT/x` are one deployment: printed twice, the List was refused by apply ('given twice')."""
    assert running.ctl("apply", "-f", write(tmp_path / "once.yaml", DEPLOYMENT.format(
        name="once", tenant="openlab", replicas=1))).returncode == 0
    for words in (["deployment", "once", "openlab/once"], ["tenant", "openlab", "openlab"]):
        shown = running.ctl("get", *words, "-o", "yaml")
        assert shown.returncode == 0, shown.stderr
        shown_doc = yaml.safe_load(shown.stdout)
        assert shown_doc["kind"] != "List", shown_doc  # the one object, as when named once
        assert running.ctl("apply", "-f", "-", stdin=shown.stdout).returncode == 0
    assert running.ctl("delete", "once").returncode == 0

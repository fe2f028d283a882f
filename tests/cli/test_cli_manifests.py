"""Manifest parsing: the shipped examples parse, and each malformed case names file, document,
object, field and problem precisely."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller.cli.manifests import ManifestError, load_manifest_sources, load_manifests, parse_manifest_text
from maia.v1 import common_pb2

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"

DEPLOYMENT = """\
kind: Deployment
name: foo
tenant: t1
replicas: 2
shards_per_replica: 4
shard: {accelerators: 1, hbm_gib: 48, power_w: 700}
"""


def test_every_example_parses_and_all_fit_the_demo_cluster() -> None:
    objects = load_manifests(sorted(EXAMPLES.glob("*.yaml")))
    kinds = [o.kind for o in objects]
    assert kinds.count("Topology") == 1
    assert kinds.count("Tenant") == 3
    assert kinds.count("Deployment") >= 5
    tenants = {o.name: o.message for o in objects if o.kind == "Tenant"}
    assert {t.isolation for t in tenants.values()} == {
        common_pb2.ISOLATION_SHARED, common_pb2.ISOLATION_DEDICATED_NODE, common_pb2.ISOLATION_DEDICATED_RACK}
    assert any(t.excludes for t in tenants.values())
    assert any(t.HasField("reserved_accelerators") for t in tenants.values())
    topology = next(o.message for o in objects if o.kind == "Topology")
    assert [r.id for r in topology.racks] == ["rack-00", "rack-01", "rack-02", "rack-03"]
    specs = [o.message for o in objects if o.kind == "Deployment"]
    # 64 nodes x 4 accelerators: everything asked for fits with room to spare
    asked = sum(s.replicas * s.shards_per_replica * (s.shard.accelerator_milli or 1000) / 1000
                * s.shard.accelerators for s in specs)
    assert asked <= 64 * 4
    for spec in specs:
        assert spec.tenant in tenants
    localities = {s.locality for s in specs}
    assert {common_pb2.DOMAIN_NODE, common_pb2.DOMAIN_RACK} <= localities
    assert localities & {common_pb2.DOMAIN_ROW, common_pb2.DOMAIN_ZONE}
    assert any(s.preemptible for s in specs)
    assert any(0 < s.shard.accelerator_milli < 1000 for s in specs)
    assert any(s.shards_per_replica == 16 and s.locality == common_pb2.DOMAIN_RACK for s in specs)
    # every rack's power budget holds 16 idle nodes at full load
    for rack in topology.racks:
        assert rack.power_budget_w >= 16 * 600 + 64 * 700


def test_deployment_fields_become_the_proto() -> None:
    text = DEPLOYMENT + "locality: node\nspread: {domain: rack, max_per_domain: 1}\npriority: 5\npreemptible: true\n"
    [obj] = parse_manifest_text(text, "d.yaml")
    spec = obj.message
    assert obj.ref == "deployment/foo"
    assert (spec.name, spec.tenant, spec.replicas, spec.shards_per_replica) == ("foo", "t1", 2, 4)
    assert spec.shard.accelerators == 1 and spec.shard.hbm_gib == 48 and spec.shard.power_w == 700
    assert spec.locality == common_pb2.DOMAIN_NODE
    assert (spec.spread.domain, spec.spread.max_per_domain) == (common_pb2.DOMAIN_RACK, 1)
    assert spec.priority == 5 and spec.preemptible


def test_tenant_optional_numbers_keep_presence() -> None:
    [obj] = parse_manifest_text("kind: Tenant\nid: a\nmax_power_w: 0\n", "t.yaml")
    assert obj.message.HasField("max_power_w") and obj.message.max_power_w == 0
    assert not obj.message.HasField("max_accelerators")
    assert obj.message.isolation == common_pb2.ISOLATION_SHARED


def errors_of(text: str, source: str = "deploy/x.yaml") -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest_text(text, source)
    return info.value.problems


@pytest.mark.parametrize(("text", "expected"), [
    ("kind: Tenant\nid: a\n---\n" + DEPLOYMENT.replace("accelerators: 1", "accelerators: four"),
     "deploy/x.yaml document 2 (Deployment 'foo'): shard.accelerators: expected an integer, got 'four'"),
    (DEPLOYMENT.replace("replicas: 2\n", ""),
     "deploy/x.yaml document 1 (Deployment 'foo'): replicas: required field is missing"),
    (DEPLOYMENT + "locality: rackk\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): locality: expected one of node, rack, row, zone, none, got 'rackk'"),
    (DEPLOYMENT + "min_replica: 1\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): min_replica: unknown field"),
    (DEPLOYMENT + "min_replicas: 3\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): min_replicas: 3 is more than replicas 2"),
    (DEPLOYMENT.replace("replicas: 2", "replicas: 0"),
     "deploy/x.yaml document 1 (Deployment 'foo'): replicas: must be at least 1, got 0"),
    (DEPLOYMENT.replace("name: foo", "name: Foo_Bar"),
     "deploy/x.yaml document 1 (Deployment 'Foo_Bar'): name: 'Foo_Bar' is not a valid name"),
    (DEPLOYMENT.replace("name: foo", 'name: "foo\\n"'),  # `$` matched before the newline: it passed
     "deploy/x.yaml document 1 (Deployment 'foo\n'): name: 'foo\n' is not a valid name"),
    (DEPLOYMENT.replace("accelerators: 1,", "accelerators: 2, accelerator_milli: 500,"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard.accelerator_milli: a fraction (500) needs accelerators: 1, got 2"),
    (DEPLOYMENT.replace("accelerators: 1,", "accelerators: 1, accelerator_milli: 1500,"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard.accelerator_milli: must be at most 1000, got 1500"),
    (DEPLOYMENT + "spread: {domain: rack}\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): spread.max_per_domain: required field is missing"),
    (DEPLOYMENT + "preemptible: maybe\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): preemptible: expected true or false, got 'maybe'"),
    (DEPLOYMENT.replace("shard: {accelerators: 1, hbm_gib: 48, power_w: 700}", "shard: 4"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard: expected a mapping, got 4"),
    ("kind: Tenant\nid: a\nisolation: dedicated\n",
     "deploy/x.yaml document 1 (Tenant 'a'): isolation: expected one of shared, dedicated_node, dedicated_rack, got 'dedicated'"),
    ("kind: Tenant\nid: a\nexcludes: [b, 3]\n",
     "deploy/x.yaml document 1 (Tenant 'a'): excludes[1]: expected a non-empty string, got 3"),
    ("kind: Tenant\nid: a\nmax_power_w: lots\n",
     "deploy/x.yaml document 1 (Tenant 'a'): max_power_w: expected a number, got 'lots'"),
    ("kind: Topology\nracks: [{id: r1}]\n",
     "deploy/x.yaml document 1 (Topology): racks[0].row: required field is missing"),
    ("kind: Topology\nracks: [{id: r1, row: a, power_budget_w: -5}]\n",
     "deploy/x.yaml document 1 (Topology): racks[0].power_budget_w: must be at least 0, got -5"),
    ("kind: Pod\nname: x\n",
     "deploy/x.yaml document 1: kind: expected one of Tenant, Topology, Deployment, got 'Pod'"),
    ("name: x\n", "deploy/x.yaml document 1: kind: required field is missing"),
    ("- a\n- b\n", "deploy/x.yaml document 1: expected a mapping with a 'kind', got a list"),
    ("kind: Tenant\nid: [unclosed\n", "deploy/x.yaml: invalid YAML at line"),
    # Numbers the API's field cannot hold (protobuf would raise "Value out of range"): int32, int64.
    (DEPLOYMENT.replace("replicas: 2", "replicas: 99999999999999999999"),
     "deploy/x.yaml document 1 (Deployment 'foo'): replicas: must be at most 2147483647, got 99999999999999999999"),
    (DEPLOYMENT + "priority: 99999999999\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): priority: must be at most 2147483647, got 99999999999"),
    (DEPLOYMENT + "priority: -99999999999\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): priority: must be at least -2147483648, got -99999999999"),
    (DEPLOYMENT.replace("accelerators: 1,", "accelerators: 1, cpu_milli: 99999999999999999999,"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard.cpu_milli: must be at most 9223372036854775807"),
    (DEPLOYMENT.replace("accelerators: 1,", "accelerators: 1, memory_mib: 1.0e+30,"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard.memory_mib: must be at most 9223372036854775807"),
    (DEPLOYMENT.replace("accelerators: 1,", "accelerators: 3000000000,"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard.accelerators: must be at most 2147483647"),
    (DEPLOYMENT + "spread: {domain: rack, max_per_domain: 3000000000}\n",
     "deploy/x.yaml document 1 (Deployment 'foo'): spread.max_per_domain: must be at most 2147483647"),
    (DEPLOYMENT.replace("hbm_gib: 48", "hbm_gib: .nan"),
     "deploy/x.yaml document 1 (Deployment 'foo'): shard.hbm_gib: expected a finite number, got nan"),
    ("kind: Tenant\nid: a\nmax_power_w: " + "9" * 400 + "\n",
     "deploy/x.yaml document 1 (Tenant 'a'): max_power_w: expected a finite number"),
])
def test_malformed_manifest_messages(text: str, expected: str) -> None:
    problems = errors_of(text)
    assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_are_reported_not_just_the_first() -> None:
    text = DEPLOYMENT.replace("replicas: 2", "replicas: two").replace("tenant: t1\n", "")
    problems = errors_of(text)
    assert len(problems) == 2
    assert any("replicas: expected an integer, got 'two'" in p for p in problems)
    assert any("tenant: required field is missing" in p for p in problems)


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifests([tmp_path / "missing.yaml"])
    assert "missing.yaml: cannot read" in info.value.problems[0]


def test_an_empty_list_is_said_to_be_one(tmp_path: Path) -> None:
    """`get nodes -o yaml` of no nodes prints a List without items: it was called an empty file."""
    (tmp_path / "none.yaml").write_text("kind: List\nitems: []\n")
    with pytest.raises(ManifestError) as info:
        load_manifest_sources([tmp_path / "none.yaml"])
    assert info.value.problems == [f"{tmp_path / 'none.yaml'}: no objects found (empty file, only comments, or a "
                                   f"List without items)"]


def test_a_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ManifestError) as info:
        load_manifests([tmp_path / "bin.json"])
    assert info.value.problems == [f"{tmp_path / 'bin.json'}: cannot read: not UTF-8 text (byte 0xff at offset 0)"]


def test_what_an_object_is_identified_by(tmp_path: Path) -> None:
    """A deployment by its tenant and name (names are per tenant), a tenant by its id, a zone, row
    or rack by its id (in one Topology document or across several)."""
    topologies = "kind: Topology\nzones: [{id: z}]\n---\nkind: Topology\nrows: [{id: z, zone: z}]\n"
    other_tenant = DEPLOYMENT.replace("tenant: t1", "tenant: t2")
    (tmp_path / "a.yaml").write_text("---\n".join([DEPLOYMENT, other_tenant, topologies]))
    assert [o.ref for o in load_manifest_sources([tmp_path / "a.yaml"])] == [
        "deployment/foo", "deployment/foo", "topology", "topology"]
    (tmp_path / "b.yaml").write_text("kind: Topology\nzones: [{id: z}, {id: y}, {id: z}]\n")
    with pytest.raises(ManifestError) as info:
        load_manifest_sources([tmp_path / "b.yaml"])
    assert info.value.problems == [f"{tmp_path / 'b.yaml'} document 1 (Topology): zones[2]: zone z is given twice "
                                   f"(first in {tmp_path / 'b.yaml'} document 1 (Topology): zones[0])"]


@pytest.mark.parametrize(("text", "expected"), [
    # The last of two equal keys won silently: `apply` created t2.
    ("kind: Tenant\nid: t1\nid: t2\nisolation: shared\n",
     "deploy/x.yaml: invalid YAML at line 3 column 1: duplicate key 'id' (first on line 2)"),
    (DEPLOYMENT.replace("power_w: 700}", "power_w: 700, hbm_gib: 80}"),
     "deploy/x.yaml: invalid YAML at line 6 column 53: duplicate key 'hbm_gib' (first on line 6)"),
    ('{"kind": "Tenant", "id": "t1",\n "id": "t2"}\n',  # a .json manifest: JSON is read as YAML
     "deploy/x.yaml: invalid YAML at line 2 column 2: duplicate key 'id' (first on line 1)"),
    # A RecursionError traceback, exit 1 (YAML or JSON, flow or block).
    ("[" * 100_000 + "\n", "deploy/x.yaml: invalid YAML at line 1 column 101: nested deeper than 100 levels"),
    ('{"a": ' * 5000 + "1" + "}" * 5000 + "\n",
     "deploy/x.yaml: invalid YAML at line 1 column 596: nested deeper than 100 levels"),
    ("".join(f"{'  ' * i}k{i}:\n" for i in range(200)),
     "deploy/x.yaml: invalid YAML at line 100 column 199: nested deeper than 100 levels"),
])
def test_a_key_given_twice_or_absurd_nesting_is_refused_with_its_line(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_a_merge_key_may_still_be_overridden_and_lists_nest_as_deep_as_manifests_need() -> None:
    base = "kind: Tenant\nid: t1\nisolation: shared\n"
    [tenant] = parse_manifest_text(
        "kind: List\nitems:\n- &t {kind: Tenant, id: t0, isolation: shared, excludes: [a]}\n"
        "- {<<: *t, id: t1}\n", "x.yaml")[1:]
    assert tenant.name == "t1" and list(tenant.message.excludes) == ["a"]
    assert [o.name for o in parse_manifest_text(base, "x.yaml")] == ["t1"]


@pytest.mark.parametrize("command", [["apply", "--dry-run"], ["diff"], ["apply"]])
def test_apply_and_diff_refuse_them_in_one_line_exit_2_with_nothing_sent(tmp_path: Path, capsys,
                                                                         command: list[str]) -> None:
    from controller.cli.main import main

    deep, dup = tmp_path / "deep.json", tmp_path / "dup.yaml"
    deep.write_text('{"a": ' * 5000 + "1" + "}" * 5000)
    dup.write_text("kind: Tenant\nid: t1\nid: t2\nisolation: shared\n")
    # Nothing listens at 127.0.0.1:9: a call would exit 5.
    assert main(["--controller", "127.0.0.1:9", *command, "-f", str(deep), "-f", str(dup)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {deep}: invalid JSON at line 1 column 601: nested deeper than 100 levels",
        f"error: {dup}: invalid YAML at line 3 column 1: duplicate key 'id' (first on line 2)"]


def test_a_directory_of_bad_manifests_prints_twenty_problems_and_how_many_more(tmp_path: Path, capsys) -> None:
    """A directory of other JSON (dumps, a config) printed a line per problem, hundreds."""
    from controller.cli.main import main

    for i in range(30):
        (tmp_path / f"dump-{i:02d}.json").write_text('{"items": []}')
    assert main(["--controller", "127.0.0.1:9", "apply", "-f", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 21 and err[0].startswith(f"error: {tmp_path / 'dump-00.json'}")
    assert err[-1] == "error: ... and 10 more problems (30 in all); fix these first"


TENANT_JSON = '{\n\t"kind": "Tenant",\n\t"id": "t1",\n\t"isolation": "shared",\n\t"max_power_w": 1e3\n}\n'


@pytest.mark.parametrize("source", ["deploy/x.json", "<stdin>"])
def test_json_is_read_as_json(source: str) -> None:
    """YAML refused JSON indented with tabs ("invalid YAML at line 2 column 1: found character
    '\\t' that cannot start any token") and read 1e3 as the string '1e3'."""
    [tenant] = parse_manifest_text(TENANT_JSON, source)
    assert (tenant.name, tenant.message.max_power_w) == ("t1", 1000.0)


@pytest.mark.parametrize(("text", "source", "expected"), [
    # Each said "invalid YAML": a .json file's, and JSON piped in (`get -o json | apply -f -`).
    ('{"kind": "Tenant",\n "id": "t1" "isolation": "shared"}\n', "deploy/x.json",
     "deploy/x.json: invalid JSON at line 2 column 13: Expecting ',' delimiter"),
    ('{"kind": "Tenant", "id": "t1",}\n', "deploy/x.json",  # YAML let the trailing comma pass
     "deploy/x.json: invalid JSON at line 1 column 31: Expecting property name enclosed in double quotes"),
    ('{"kind": "Tenant",\n "id": "t1" "isolation": "shared"}\n', "<stdin>",
     "<stdin>: invalid JSON at line 2 column 13: Expecting ',' delimiter"),
    ('{"kind": "Tenant", "id": "t1",\n "id": "t2"}\n', "deploy/x.json",
     "deploy/x.json: invalid JSON at line 2 column 2: duplicate key 'id' in an object (each key at most once)"),
    ('{"kind": "List", "items": [{"kind": "Tenant", "id": "t1"},\n  {"kind": "Tenant", "id": "t2",\n'
     '   "isolation": "shared", "isolation": "shared"}]}', "<stdin>",
     "<stdin>: invalid JSON at line 3 column 27: duplicate key 'isolation' in an object (each key at most once)"),
    ('{"a": ' * 150 + "1" + "}" * 150, "deploy/x.json",
     "deploy/x.json: invalid JSON at line 1 column 601: nested deeper than 100 levels"),
    ("", "deploy/x.json", "deploy/x.json: invalid JSON at line 1 column 1: Expecting value"),
])
def test_json_errors_say_invalid_json_with_the_line_and_column(text: str, source: str, expected: str) -> None:
    assert errors_of(text, source) == [expected]


def test_yaml_in_flow_style_on_stdin_is_still_yaml() -> None:
    """Text starting with `{` that is no JSON is read as YAML; a .yaml file is YAML whatever it starts with."""
    assert [o.name for o in parse_manifest_text("{kind: Tenant, id: t1, isolation: shared}", "<stdin>")] == ["t1"]
    assert errors_of('{"kind": "Tenant", "id": "t1",\n "id": "t2"}\n', "deploy/x.yml") == [
        "deploy/x.yml: invalid YAML at line 2 column 2: duplicate key 'id' (first on line 1)"]


def test_a_field_left_out_of_a_document_differs_as_its_default() -> None:
    """`apply` of min_replicas 1 printed 'min_replicas: 2 -> (unset)' (the document leaves 1 out),
    where the controller's event said '2 -> 1'."""
    from controller.cli.documents import DEPLOYMENT_DEFAULTS, spec_differences

    current = {"kind": "Deployment", "name": "svc", "replicas": 2, "min_replicas": 2}
    wanted = {"kind": "Deployment", "name": "svc", "replicas": 2}
    assert spec_differences(current, wanted, DEPLOYMENT_DEFAULTS) == ["min_replicas: 2 -> 1"]
    assert spec_differences(wanted, current, DEPLOYMENT_DEFAULTS) == ["min_replicas: 1 -> 2"]
    assert spec_differences(current, wanted) == ["min_replicas: 2 -> (unset)"]  # a field with no default

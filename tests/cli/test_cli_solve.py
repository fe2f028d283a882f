"""`maiactl solve` on every shared example, run as a subprocess like a user would.

`-o json` must print exactly one plan document valid against plan.schema.json; the table
output must mention every deployment. Skipped (with the reason) when /work/shared or the
solver is not there yet.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path("/work/shared/placement")
EXAMPLES = sorted((SHARED / "examples").glob("*.problem.json")) if SHARED.is_dir() else []

try:
    from scheduler import solve as _solve  # noqa: F401
    SOLVER_ERROR = ""
except ImportError as exc:  # the solver is built in parallel
    SOLVER_ERROR = f"scheduler.solve is not importable yet: {exc}"

pytestmark = [
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is missing: no shared examples to solve"),
    pytest.mark.skipif(bool(SOLVER_ERROR), reason=SOLVER_ERROR or "solver present"),
]


def maiactl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plan_validator():
    import jsonschema
    from referencing import Registry, Resource

    plan_schema = json.loads((SHARED / "plan.schema.json").read_text())
    problem_schema = json.loads((SHARED / "problem.schema.json").read_text())
    registry = Registry().with_resource(problem_schema["$id"], Resource.from_contents(problem_schema))
    return jsonschema.Draft202012Validator(plan_schema, registry=registry)


@pytest.mark.parametrize("problem", EXAMPLES, ids=lambda p: p.name)
def test_solve_json_is_one_valid_plan(problem: Path, plan_validator) -> None:
    result = maiactl("solve", str(problem), "-o", "json", "--time-limit-ms", "5000")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)  # the whole stdout is one JSON document
    errors = sorted(plan_validator.iter_errors(plan), key=str)
    assert not errors, [e.message for e in errors[:5]]
    doc = json.loads(problem.read_text())
    node_ids = {n["id"] for n in doc["nodes"]}
    assert {p["node"] for p in plan["placements"]} <= node_ids


@pytest.mark.parametrize("problem", EXAMPLES, ids=lambda p: p.name)
def test_solve_table_mentions_every_deployment(problem: Path) -> None:
    result = maiactl("solve", str(problem), "--time-limit-ms", "5000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Status:")
    for deployment in json.loads(problem.read_text())["deployments"]:
        assert deployment["id"] in result.stdout


def test_unplaceable_reasons_are_shown() -> None:
    problem = SHARED / "examples" / "tiny-unplaceable.problem.json"
    if not problem.exists():
        pytest.skip("tiny-unplaceable example missing")
    result = maiactl("solve", str(problem))
    assert result.returncode == 0, result.stderr
    assert "Unplaced:" in result.stdout
    assert "POWER_RACK" in result.stdout or "EXCLUSION" in result.stdout


def test_problem_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": [{"id": "n1"}], "deployments": []}))
    result = maiactl("solve", str(bad), "-o", "json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_a_time_limit_flag_does_not_hide_a_problems_bad_options(tmp_path: Path) -> None:
    """`options: "fast"` is refused; with --time-limit-ms it was replaced silently and solved."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "nodes": [], "deployments": [], "options": "fast"}))
    for flags in ((), ("--time-limit-ms", "100")):
        result = maiactl("solve", str(bad), *flags)
        assert result.returncode == 2 and "options: 'fast' is not of type 'object'" in result.stderr, result.stderr


def test_invalid_json_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    result = maiactl("solve", str(bad))
    assert result.returncode == 2
    assert "invalid JSON at line 1" in result.stderr
    bad.write_text('{"version": 1, "x": ' + "9" * 5000 + "}")  # past Python's int digits: was a traceback
    result = maiactl("solve", str(bad))
    assert result.returncode == 2 and "cannot read its JSON: Exceeds the limit" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("plan, expected", [
    ({"status": "optimal", "unplaced": [{"deployment": "a", "replicas": 2}]},
     "partial: 2 replica(s) of 1 deployment(s) left unplaced; what is placed is optimal (proved)"),
    ({"status": "feasible", "stats": {"objective": 10, "best_bound": 10, "cpsat": "optimal"}},
     "optimal for the placement model (objective = best bound; preemption and moves are outside the proof)"),
    ({"status": "feasible", "stats": {"objective": 9, "best_bound": 10}}, "feasible (not proved optimal)"),
    ({"status": "optimal"}, "optimal (proved)"),
    ({"status": "infeasible", "unplaced": [{"deployment": "a", "replicas": 1}]},
     "infeasible: nothing new could be placed (1 replica(s) left unplaced)"),
])
def test_status_is_never_optimal_with_work_left_nor_bare_feasible_at_the_bound(plan, expected) -> None:
    from controller.cli.plan_view import status_text

    assert status_text(plan) == expected


def test_a_file_that_is_not_utf8_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bin.json"
    bad.write_bytes(b"\xff\xfe")
    result = maiactl("solve", str(bad))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {bad}: cannot read: not UTF-8 text (byte 0xff at offset 0)\n"


def test_a_key_given_twice_or_absurd_nesting_exits_2(tmp_path: Path) -> None:
    """json.loads kept the last of two equal keys silently, and nesting 5,000 deep ended in a
    RecursionError traceback, exit 1."""
    problem = json.loads((SHARED / "examples" / "tiny.problem.json").read_text())
    twice = tmp_path / "twice.json"
    twice.write_text('{"options": {"mode": "online"}, ' + json.dumps(problem)[1:])
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 5000 + "]" * 5000)
    at = twice.read_text().rindex('"options"') + 1  # the second: where it is given again
    for path, says in ((twice, f"invalid JSON at line 1 column {at}: duplicate key 'options' in an object "
                               "(each key at most once)"),
                       (deep, "invalid JSON: nested too deeply for a problem document")):
        result = maiactl("solve", str(path), "-o", "json")
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {path}: {says}\n")


def test_problem_files_are_read_by_the_librarys_own_reader(tmp_path: Path, monkeypatch) -> None:
    """maiactl kept its own copy of the strict JSON reader (a duplicate-key hook of its own) while
    the library read with plain json.loads; it reads with the library's now, so a problem file is
    refused alike by maiactl and every other caller of the interchange."""
    from controller.cli.commands.solve import load_problem
    from scheduler import interchange

    read: list[str] = []
    monkeypatch.setattr(interchange, "document_from_json", lambda text: read.append(text) or {"read": "here"})
    path = tmp_path / "p.json"
    path.write_text("{}")
    assert (load_problem(str(path)), read) == ({"read": "here"}, ["{}"])


def test_an_id_that_is_not_unicode_text_prints_escaped_not_a_traceback(tmp_path: Path) -> None:
    """JSON may escape a lone surrogate (`"d\\udfff"`), which no UTF-8 stream can write: the table
    ended in a UnicodeEncodeError traceback (exit 1) where `-o json` worked. It prints escaped."""
    text = ('{"version": 1, "zones": [{"id": "z"}], "rows": [{"id": "w", "zone": "z"}], '
            '"racks": [{"id": "r", "row": "w"}], "nodes": [{"id": "n", "rack": "r", "accelerators": 1}], '
            '"tenants": [{"id": "t"}], "deployments": [{"id": "d\\udfff", "tenant": "t", "replicas": 1, '
            '"shards_per_replica": 1, "shard": {"accelerators": 1}}]}')
    problem = tmp_path / "surrogate.json"
    problem.write_text(text, encoding="ascii")
    done = maiactl("solve", str(problem))
    assert done.returncode == 0, done.stderr
    assert "d\\udfff" in done.stdout and "Traceback" not in done.stderr


def test_a_kept_breach_of_a_hard_rule_is_warned_of(tmp_path: Path) -> None:
    """Tenant a (dedicated_node) shares n1 with b in the given placements: the solve keeps them and
    says `optimal`; the table warns and lists the breach, `-o json` carries it in stats only."""
    doc = {"version": 1, "zones": [{"id": "z1"}], "rows": [{"id": "w1", "zone": "z1"}],
           "racks": [{"id": "r1", "row": "w1"}],
           "nodes": [{"id": n, "rack": "r1", "accelerators": 4} for n in ("n1", "n2")],
           "tenants": [{"id": "a", "isolation": "dedicated_node"}, {"id": "b", "isolation": "shared"}],
           "deployments": [{"id": d, "tenant": t, "replicas": 1, "shards_per_replica": 1,
                            "shard": {"accelerators": 1}} for d, t in (("x", "a"), ("y", "b"))],
           "placements": [{"deployment": d, "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [i]}
                          for i, d in enumerate(("x", "y"))],
           "options": {"mode": "batch"}}
    path = tmp_path / "breach.json"
    path.write_text(json.dumps(doc))
    table = maiactl("solve", str(path))
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("Status:")
    warning = next(line for line in table.stdout.splitlines() if line.startswith("Warning:"))
    assert "keeps 1 breach(es) of hard rules by existing placements (ISOLATION)" in warning
    assert "  ISOLATION [node n1]: node n1 holds tenant a (dedicated_node) together with b" in table.stdout
    as_json = maiactl("solve", str(path), "-o", "json")
    plan = json.loads(as_json.stdout)
    assert plan["status"] == "optimal" and plan["stats"]["kept_violations_total"] == 1
    assert [(v["rule"], v["scope"]) for v in plan["stats"]["kept_violations"]] == [("ISOLATION", "node n1")]
    clean = maiactl("solve", str(SHARED / "examples" / "tiny.problem.json"))
    assert clean.returncode == 0 and "Warning:" not in clean.stdout and "kept_violations" not in clean.stdout

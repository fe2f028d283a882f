"""The compiled schema check agrees with jsonschema; trusted callers may skip it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import dep, node, placed, problem
from scheduler import ProblemError, problem_from_dict
from scheduler.interchange import _validator, load_schema
from scheduler.schema_check import compile_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "scheduler" / "schemas"


def base_doc() -> dict[str, Any]:
    doc = problem([node("n1", acc=4, cpu_milli=8000, memory_mib=1024),
                   node("n2", acc=2)],
                  [dep("a"), dep("b")],
                  tenants=[{"id": "t1", "isolation": "shared", "max_accelerators": 3}])
    doc["placements"].append(placed("a", "n1", [0]))
    doc["options"] = {"mode": "online", "batch_size": 4}
    return doc


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, prefix + (i,))
    return out


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 2000),
                      st.floats(-2.0, 2000.0, allow_nan=False), st.sampled_from(
                          ["", "x", "ready", "down", "online", "rack", "a" * 129]),
                      st.just([]), st.just({}), st.just(1.0), st.just(True))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_compiled_check_agrees_with_jsonschema_on_mutations(data: st.DataObject) -> None:
    doc = base_doc()
    fast = compile_schema(load_schema("problem"))
    assert fast is not None
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(doc)[1:]))
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(JSON_LEAF)
    assert fast(doc) == _validator("problem").is_valid(doc)


def test_problem_schema_compiles() -> None:
    # The plan schema refers to the problem schema's file: it keeps the jsonschema path.
    assert compile_schema(load_schema("problem")) is not None


def test_shared_examples_pass_the_compiled_check() -> None:
    fast = compile_schema(load_schema("problem"))
    examples = Path(__file__).resolve().parents[3] / "shared" / "placement" / "examples"
    docs = sorted(examples.glob("*.problem.json")) if examples.is_dir() else []
    for path in docs:
        doc = json.loads(path.read_text())
        assert fast(doc) == _validator("problem").is_valid(doc), path.name


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "integer", "minimum": 0}, [0, 3, 2.0], [True, -1, 1.5, "1", None]),
    ({"type": "number", "maximum": 1}, [0.5, 1, -3], [False, 2, "0"]),
    ({"enum": ["a", "b"]}, ["a"], ["c", 1, None]),
    ({"const": 1}, [1, 1.0], [True, 2, "1"]),
    ({"type": "object", "additionalProperties": {"type": "string"}}, [{}, {"k": "v"}],
     [{"k": 1}, []]),
    ({"type": "array", "items": {"type": "boolean"}}, [[], [True]], [[1], {}]),
])
def test_compiled_keywords_follow_jsonschema(schema: dict, good: list, bad: list) -> None:
    fast = compile_schema(schema)
    assert fast is not None
    for v in good:
        assert fast(v) and jsonschema.Draft202012Validator(schema).is_valid(v), v
    for v in bad:
        assert not fast(v) and not jsonschema.Draft202012Validator(schema).is_valid(v), v


def test_unknown_keyword_means_no_fast_path() -> None:
    assert compile_schema({"type": "string", "pattern": "^a"}) is None
    assert compile_schema({"oneOf": [{"type": "string"}]}) is None


def test_schema_error_still_names_field_and_value() -> None:
    doc = base_doc()
    doc["nodes"][1]["accelerators"] = -2
    with pytest.raises(ProblemError) as info:
        problem_from_dict(doc)
    assert info.value.field == "nodes[1].accelerators"
    assert "-2" in str(info.value)


def test_trusted_callers_skip_the_schema_but_not_the_references() -> None:
    doc = base_doc()
    doc["nodes"][1]["labels"] = {"k": 3}  # schema violation only
    with pytest.raises(ProblemError):
        problem_from_dict(copy.deepcopy(doc))
    assert problem_from_dict(copy.deepcopy(doc), validate=False).nodes[1].labels == (("k", 3),)
    doc["placements"].append(placed("ghost", "n1", [1]))
    with pytest.raises(ProblemError) as info:
        problem_from_dict(doc, validate=False)
    assert info.value.field == "placements[1].deployment"


@pytest.mark.parametrize("left_out, listed, message", [
    # Several rows, no racks: which row each rack is in is not said (it was told as
    # "racks[0].row: unknown row '_row'", of a list the document never had).
    ("racks", {"rows": [{"id": "w1", "zone": "z1"}, {"id": "w2", "zone": "z1"}]},
     "racks: left out, and rows lists 2 rows: give racks to say which row each rack is in"),
    ("rows", {"zones": [{"id": "z1"}, {"id": "z2"}]},
     "rows: left out, and zones lists 2 zones: give rows to say which zone each row is in"),
])
def test_a_list_left_out_under_several_parents_is_refused_saying_so(
        left_out: str, listed: dict[str, Any], message: str) -> None:
    doc = problem([node("n1")], [dep("d")])
    del doc[left_out]
    if left_out == "racks":
        doc["rows"] = listed["rows"]
    else:
        doc["zones"] = listed["zones"]
        del doc["racks"]
    with pytest.raises(ProblemError) as info:
        problem_from_dict(doc)
    assert str(info.value) == message


def test_one_parent_holds_what_is_left_out_and_nothing_listed_implies_everything() -> None:
    doc = problem([node("n1")], [dep("d")])
    del doc["racks"]
    assert [(r.id, r.row) for r in problem_from_dict(copy.deepcopy(doc)).racks] == [("r1", "w1")]
    for key in ("rows", "zones", "tenants"):
        del doc[key]
    implied = problem_from_dict(doc)
    assert [t.id for t in implied.tenants] == ["t1"] and len(implied.rows) == len(implied.zones) == 1


@pytest.mark.parametrize("field, path", [("tenants", "deployments[0].tenant"), ("racks", "nodes[0].rack")])
def test_a_list_given_empty_is_checked_as_given(field: str, path: str) -> None:
    """A list that is present is checked strictly, empty too: an empty `tenants` took a
    deployment's unknown tenant as implied, an empty `racks` a node's unknown rack."""
    doc = problem([node("n1", rack="typo-rack")], [dep("d", tenant="ghost")])
    doc[field] = []
    with pytest.raises(ProblemError) as info:
        problem_from_dict(doc)
    assert info.value.field == path


def test_an_empty_parent_list_under_one_left_out_says_to_list_or_leave_it_out() -> None:
    doc = problem([node("n1")], [dep("d")])
    del doc["racks"]
    doc["rows"] = []
    with pytest.raises(ProblemError) as info:
        problem_from_dict(doc)
    assert str(info.value) == "rows: is empty, and racks is left out: list the row(s), or leave rows out too"

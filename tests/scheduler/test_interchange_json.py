"""The interchange's own JSON reader: `document_from_json` refuses an object that gives a key
twice (json.loads kept the last without a word, so a problem naming `options` or a node's
`hbm_gib` twice was solved as whichever came last) and reads every other document as json.loads
does, so the interchange stays what it was for valid documents."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import SHARED
from scheduler.errors import ProblemError
from scheduler.interchange import document_from_json, load_schema, problem_from_dict

EXAMPLES = SHARED / "examples"


@pytest.mark.parametrize(("text", "key"), [
    ('{"options": {"mode": "online"}, "nodes": [], "options": {}}', "options"),
    ('{"nodes": [{"id": "n1", "hbm_gib": 80, "rack": "r1", "hbm_gib": 96}]}', "hbm_gib"),
    ('[{"a": 1}, {"b": {"c": 1, "c": 1}}]', "c"),  # equal values too: a field is given once
])
def test_a_key_given_twice_is_a_problem_naming_it(text: str, key: str) -> None:
    with pytest.raises(ProblemError) as caught:
        document_from_json(text)
    assert caught.value.value == key
    assert str(caught.value) == f"duplicate key {key!r} in an object (each key at most once)"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_shared_example_reads_as_json_loads_reads_it(path: Path) -> None:
    text = path.read_text()
    assert document_from_json(text) == json.loads(text)
    if path.name.endswith(".problem.json"):
        problem_from_dict(document_from_json(text))


def test_what_json_loads_refuses_it_refuses_alike() -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        document_from_json('{"a": 1,\n "b": }')
    assert (caught.value.lineno, caught.value.colno) == (2, 7)
    assert document_from_json(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert load_schema("problem")["$id"]  # the shipped schemas read through it too

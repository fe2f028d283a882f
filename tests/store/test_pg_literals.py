"""A statement's parameters written into its text as literals (`store/pg_literals.py`): exact
literals for what it renders, None for anything it cannot render exactly."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from controller.store.pg_literals import quoted, render


def test_text_is_an_escape_string_with_no_dollar_in_it() -> None:
    assert quoted("plain") == "E'plain'"
    assert quoted("it's") == "E'it\\'s'"
    assert quoted("back\\slash") == "E'back\\\\slash'"
    assert quoted("$1 and $$ and $tag$") == "E'\\x241 and \\x24\\x24 and \\x24tag\\x24'"
    assert "$" not in quoted("$$") and "\n" in quoted("two\nlines")


def test_each_placeholder_takes_its_own_parameter_ten_and_one_apart() -> None:
    statement = "INSERT INTO t VALUES (" + ", ".join(f"${i}::INTEGER" for i in range(1, 12)) + ")"
    rendered = render(statement, list(range(100, 111)))
    assert rendered == "INSERT INTO t VALUES (" + ", ".join(f"{v}::INTEGER" for v in range(100, 111)) + ")"


@pytest.mark.parametrize(("value", "literal"), [
    (None, "NULL"),
    (True, "TRUE"),
    (False, "FALSE"),
    (0, "0"),
    (-7, "(-7)"),
    (2.5, "2.5"),
    (-0.1, "(-0.1)"),
    ("x'y", "E'x\\'y'"),
    (datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=timezone.utc), "E'2026-12-05T01:02:03.456789+00:00'"),
    (datetime(2026, 12, 5, 1, 2, 3, tzinfo=timezone(timedelta(hours=-5))), "E'2026-12-05T01:02:03-05:00'"),
    (date(2026, 12, 5), "E'2026-12-05'"),
    (["a", None, "b'c"], "ARRAY[E'a', NULL, E'b\\'c']"),
    ([], "'{}'"),
])
def test_values_render_as_exact_literals(value: object, literal: str) -> None:
    assert render("SELECT $1", [value]) == f"SELECT {literal}"


@pytest.mark.parametrize("value", [
    datetime(2026, 12, 5, 1, 2, 3),  # naive: its meaning would be the session's time zone
    float("nan"), float("inf"),
    b"bytes",
    {"a": 1},
    ["a", b"b"],
])
def test_a_value_without_an_exact_literal_leaves_the_statement_unrendered(value: object) -> None:
    assert render("SELECT $1, $2", ["fine", value]) is None


@pytest.mark.parametrize("statement", [
    "SELECT 'a $1 inside a literal of its own', $1",
    "SELECT 'it''s $1', $1",
    "SELECT E'an escaped \\' quote', $1",
    "SELECT 'one $ sign' || 'then one plain', $1",
    "DO $body$ BEGIN PERFORM $1; END $body$",
    "SELECT $$ dollar quoted $$, $1",
])
def test_a_statement_with_quotes_that_may_hold_a_placeholder_is_not_rendered(statement: str) -> None:
    assert render(statement, [1]) is None


def test_plain_quoted_strings_of_the_statement_stay_as_they_are() -> None:
    """No `$`, backslash or quote inside: no placeholder there (an enum's member compared inline,
    `store/enumtype.py`, in a deferred write)."""
    assert render("UPDATE t SET a = $1 WHERE phase NOT IN ('deleting', 'quarantined') AND b = $2", ["x", 2]) == \
        "UPDATE t SET a = E'x' WHERE phase NOT IN ('deleting', 'quarantined') AND b = 2"
    assert render("SELECT 'it''s', $1", [1]) == "SELECT 'it''s', 1"


def test_a_placeholder_past_the_parameters_is_not_guessed() -> None:
    assert render("SELECT $1, $2", [1]) is None
    assert render("SELECT 1", None) == "SELECT 1"

"""`jsoncodec`: JSON columns' text exactly as `json.dumps` writes it and values as `json.loads`
reads them, on both databases (the engine's serializer and deserializer)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text

from controller.store import jsoncodec
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(_VALUES)
def test_dumps_writes_what_json_dumps_writes(value: Any) -> None:
    assert jsoncodec.dumps(value) == json.dumps(value)


@given(_VALUES)
def test_loads_reads_what_json_loads_reads(value: Any) -> None:
    written = json.dumps(value)
    # NaN is not equal to itself: compare what each read writes back
    assert json.dumps(jsoncodec.loads(written)) == json.dumps(json.loads(written))


def test_tuples_nan_and_infinities_as_json_dumps_writes_them() -> None:
    for value in [(1, 2), {"a": (None, math.inf)}, [math.nan, -math.inf], "é\n", {1: "x", 2.5: True}]:
        assert jsoncodec.dumps(value) == json.dumps(value)


def test_empty_containers_read_fresh_each_time() -> None:
    first, second = jsoncodec.loads("[]"), jsoncodec.loads("[]")
    first.append(1)
    assert second == [] and jsoncodec.loads("[]") == []
    mapping = jsoncodec.loads("{}")
    mapping["a"] = 1
    assert jsoncodec.loads("{}") == {}


def test_a_value_that_contains_itself_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises((RecursionError, ValueError)):
        jsoncodec.dumps(loop)


DATA = [{}, [], {"replicas": [0, 2], "nodes": ["n1", "n-é"]}, {"reasons": [{"code": "X", "message": "a \"b\""}]}]


async def test_the_engine_stores_json_dumps_text_and_reads_it_back(database: Database) -> None:
    assert database.engine.dialect._json_serializer is jsoncodec.dumps
    assert database.engine.dialect._json_deserializer is jsoncodec.loads
    async with database.unit_of_work() as uow:
        await repo.record_events(uow.session, [repo.NewEvent(actor="a", kind="k", object_kind="deployment",
                                                             object_id=f"t/d{i}", data=data)
                                               for i, data in enumerate(DATA)])
        await uow.commit()
    async with database.unit_of_work() as uow:
        stored = (await uow.session.execute(text("SELECT object_id, CAST(data AS TEXT) FROM events"))).all()
        read = (await uow.session.execute(select(m.Event.object_id, m.Event.data))).all()
    assert sorted(stored) == [(f"t/d{i}", json.dumps(data)) for i, data in enumerate(DATA)]
    assert sorted(read, key=lambda row: row[0]) == [(f"t/d{i}", data) for i, data in enumerate(DATA)]

"""`inlist.any_of`: what an IN list matches, on both databases; on PostgreSQL one statement text
(one prepare per connection) whatever the list's length, where an IN list is a text per length."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.inlist import any_of, any_of_named, dialect_of, listed
from controller.store.pg_driver import counted_trips

from .seed import TWO_RACKS, seed_problem

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])

NODES = [f"n{i}" for i in range(1, 9)]
CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": n, "rack": "rack1", "accelerators": 4} for n in NODES],
    "tenants": [{"id": "a"}, {"id": "b"}],
    "deployments": [{"id": f"{t}/web{i}", "tenant": t, "replicas": 1, "shards_per_replica": 1,
                     "shard": {"accelerators": 1}} for t in ("a", "b") for i in range(4)],
}


async def _seeded(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()


@contextmanager
def _statements(database: Database) -> Iterator[Counter[str]]:
    """The statement texts sent meanwhile, counted."""
    seen: Counter[str] = Counter()

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen[statement] += 1

    event.listen(database.engine.sync_engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", note)


@pytest.mark.parametrize("wanted", [[], ["n1"], ["n2", "n4", "missing"], NODES, {"n3", "n5"}])
async def test_any_of_matches_what_an_in_list_matches(database: Database, wanted: Any) -> None:
    await _seeded(database)
    async with database.unit_of_work() as uow:
        found = set(await uow.session.scalars(select(m.Node.id).where(any_of(uow.session, m.Node.id, wanted))))
        ids = list(await uow.session.scalars(select(m.Deployment.id).order_by(m.Deployment.id)))
        some = ids[1::3]
        by_id = set(await uow.session.scalars(select(m.Deployment.id).where(any_of(uow.session, m.Deployment.id, some))))
    assert found == set(wanted) & set(NODES)
    assert by_id == set(some)


@pytest.mark.parametrize("wanted", [[], ["n1"], ["n2", "n4", "missing", "n2"], NODES, ["é/\"x"]])
async def test_any_of_named_matches_what_an_in_list_matches(database: Database, wanted: list[str]) -> None:
    await _seeded(database)
    async with database.unit_of_work() as uow:
        dialect = dialect_of(uow.session)
        by_node = select(m.Node.id).where(any_of_named(dialect, m.Node.id, "ids"))
        by_id = select(m.Deployment.id).where(any_of_named(dialect, m.Deployment.id, "ids"))
        found = set(await uow.session.scalars(by_node, {"ids": listed(dialect, wanted)}))
        ids = list(await uow.session.scalars(select(m.Deployment.id).order_by(m.Deployment.id)))
        some = ids[1::3] + [max(ids) + 1]
        found_ids = set(await uow.session.scalars(by_id, {"ids": listed(dialect, some)}))
        none = set(await uow.session.scalars(by_id, {"ids": []}))
    assert found == set(wanted) & set(NODES)
    assert found_ids == set(ids[1::3]) and none == set()



async def test_any_of_named_matches_a_text_column_as_an_in_list_does_for_a_value_not_text(database: Database) -> None:
    """A number for a text column is compared as its text, as an IN list did on SQLite (the
    column's affinity) and as `listed` has it on PostgreSQL: `json_each` hands the number back
    as an integer, which no text equals."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, {**CLUSTER, "tenants": [{"id": "7"}, {"id": "a"}, {"id": "b"}]})
        await uow.commit()
    async with database.unit_of_work() as uow:
        dialect = dialect_of(uow.session)
        named = select(m.Tenant.id).where(any_of_named(dialect, m.Tenant.id, "ids"))
        found = set(await uow.session.scalars(named, {"ids": listed(dialect, [7, 8, "a"])}))
    assert found == {"7", "a"}

async def test_a_submit_batch_reads_its_lists_of_every_length(database: Database) -> None:
    await _seeded(database)
    async with database.unit_of_work() as uow:
        reads = await repo.submit_batch_reads(uow.session, [("a", "web1", ""), ("a", "new", ""), ("b", "web2", ""),
                                                            ("c", "web1", "")])
        one = await repo.submit_batch_reads(uow.session, [("b", "web3", "")])
    assert set(reads.tenants) == {"a", "b"}
    assert reads.taken == {(t, n) for t in ("a", "b") for n in ("web1", "web2")}  # the batch's names, in its tenants
    assert (set(one.tenants), one.taken) == ({"b"}, {("b", "web3")})


def _hot_list_reads() -> dict[str, Any]:
    """The hot list reads (an agent batch's nodes, a commit's assignment sets, a submit batch's
    tenants, names and request ids, a delete batch's deployments, the views of a report's or a
    watch's deployments, each with its placements), each with a list of `k`."""
    return {
        "nodes": lambda s, k: repo.node_rows_by_id(s, NODES[:k]),
        "assignments": lambda s, k: repo.assignment_sets(s, NODES[:k]),
        "submits": lambda s, k: repo.submit_batch_reads(s, [("a", f"web{i}", f"r{i}") for i in range(k)]),
        "deletes": lambda s, k: repo.deployments_named(s, [f"web{i % 4}" for i in range(k)] + [f"gone{k}"]),
        "views": lambda s, k: repo.list_deployment_rows(s, keys=[f"{'ab'[i % 2]}/web{i % 4}" for i in range(k)]),
    }


SQLITE_ONLY = pytest.mark.parametrize("db_backend", ["sqlite"])


@SQLITE_ONLY
async def test_one_statement_text_for_every_list_length_on_sqlite(database: Database) -> None:
    """The statements built once (`any_of_named`: a submit batch's, a delete batch's reads) take
    their lists as one JSON text: one statement text whatever the length, not one rendered again
    per length (those built per call, `any_of`, keep IN)."""
    await _seeded(database)
    reads = _hot_list_reads()
    for name in ("submits", "deletes", "assignments"):
        with _statements(database) as texts:
            for k in range(1, len(NODES) + 1):
                async with database.unit_of_work() as uow:
                    await reads[name](uow.session, k)
        assert set(texts.values()) == {len(NODES)}, (name, texts)  # every text ran at every length


@POSTGRES_ONLY
async def test_one_statement_and_one_prepare_for_every_list_length_on_postgresql(database: Database) -> None:
    """The hot list reads (an agent batch's nodes, a commit's assignment sets, a submit batch's
    tenants, names and request ids, a delete batch's deployments, the views of a report's or a
    watch's deployments, each with its placements) with lists of 2 to 8, after one of 1: each
    statement is one text, already prepared on the one connection these units of work take in
    turn (the pool's LIFO). An IN list (a selectin load's too) would be a text, and a prepare, per
    length."""
    await _seeded(database)
    for name, call in _hot_list_reads().items():
        with counted_trips() as first:
            async with database.unit_of_work() as uow:
                await call(uow.session, 1)
        # A text array: asyncpg encodes it without looking its type up on a new connection.
        assert not [t for t in first if t.statement.startswith("WITH RECURSIVE typeinfo_tree")], name
        with _statements(database) as texts, counted_trips() as trips:
            for k in range(2, len(NODES) + 1):
                async with database.unit_of_work() as uow:
                    await call(uow.session, k)
        assert set(texts.values()) == {len(NODES) - 1}, (name, texts)  # every text ran at every length
        assert [t for t in trips if t.kind == "prepare"] == [], name

"""`unnest.update_rows`: what an executemany wrote, on both databases; on PostgreSQL one statement
execution over arrays whatever the number of rows (an executemany ran the statement once per row
on the server: `pgcpu` in docs/benchmarks.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import bindparam, event, select, update

from controller.store import models as m
from controller.store import repositories as repo
from controller.store import pg_driver
from controller.store.db import Database
from controller.store.marks import deferred_writes
from controller.store.pg_driver import counted_trips
from controller.store.models import as_utc
from controller.store.unnest import InsertRows, update_rows

from .seed import TWO_RACKS, seed_problem

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])

CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": n, "rack": "rack1", "accelerators": 4} for n in ("n1", "n2", "N3")],
    "tenants": [{"id": "a"}],
    "deployments": [{"id": f"a/web{i}", "tenant": "a", "replicas": 1, "shards_per_replica": 1,
                     "shard": {"accelerators": 1}} for i in range(4)],
}
_DEPLOYMENTS = m.Deployment.__table__
# The executemany `update_rows` stands for elsewhere (the report flush's, `repo.write_deployment_phases`).
_SET_PHASE = update(_DEPLOYMENTS).where(_DEPLOYMENTS.c.id == bindparam("dep"), _DEPLOYMENTS.c.phase == bindparam("was")
                                       ).values(phase=bindparam("new"), reasons=bindparam("why"),
                                                updated_at=bindparam("at"))


async def _seeded(database: Database) -> dict[str, int]:
    """The deployments' ids by name."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    async with database.unit_of_work() as uow:
        return {name: id_ for id_, name in await uow.session.execute(select(m.Deployment.id, m.Deployment.name))}


async def test_update_rows_writes_the_rows_still_as_matched(database: Database) -> None:
    """Each listed row set while its matched column still holds the row's value; a row that
    moved on and the rows not listed keep theirs."""
    ids = await _seeded(database)
    at = datetime(2026, 12, 4, tzinfo=timezone.utc)
    async with database.unit_of_work() as uow:
        before = dict((await uow.session.execute(select(m.Deployment.name, m.Deployment.phase))).all())
        await update_rows(uow.session, _DEPLOYMENTS, _SET_PHASE, [
            {"dep": ids["web0"], "was": before["web0"], "new": m.DeploymentPhase.DEGRADED, "why": [{"code": "A"}],
             "at": at},
            {"dep": ids["web1"], "was": m.DeploymentPhase.DELETING, "new": m.DeploymentPhase.DEGRADED,
             "why": [{"code": "B"}], "at": at},  # no longer (never) in that phase: left alone
            {"dep": ids["web2"], "was": before["web2"], "new": m.DeploymentPhase.FAILED, "why": [], "at": at}],
            key=("id", "dep"), values={"phase": "new", "reasons": "why", "updated_at": "at"}, match={"phase": "was"})
        await uow.commit()
    async with database.unit_of_work() as uow:
        after = {name: (phase, reasons, as_utc(updated)) for name, phase, reasons, updated in await uow.session.execute(
            select(m.Deployment.name, m.Deployment.phase, m.Deployment.reasons, m.Deployment.updated_at))}
    assert after["web0"] == (m.DeploymentPhase.DEGRADED, [{"code": "A"}], at)  # the time with its offset, as written
    assert after["web2"] == (m.DeploymentPhase.FAILED, [], at)
    assert after["web1"][0] == after["web3"][0] == before["web1"] == before["web3"]
    assert after["web1"][2] != at


@POSTGRES_ONLY
async def test_postgres_writes_the_rows_in_one_execution_of_one_text(database: Database) -> None:
    """No executemany (the server ran it once per row), and one statement text for any number of
    rows (prepared once per connection): the report flush's phases."""
    ids = await _seeded(database)
    at = datetime(2026, 12, 4, tzinfo=timezone.utc)
    texts: list[list[str]] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        texts[-1].append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", note)
    try:
        for count in (1, 3):
            texts.append([])
            with counted_trips() as trips:
                async with database.unit_of_work() as uow:
                    await repo.write_deployment_phases(uow.session, [
                        (ids[f"web{i}"], m.DeploymentPhase.PENDING, m.DeploymentPhase.DEGRADED, [])
                        for i in range(count)], at)
                    await uow.commit()
            assert not [t for t in trips if t.kind == "executemany"], trips
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", note)
    assert texts[0] == texts[1] and len(texts[0]) == 1, texts
    async with database.unit_of_work() as uow:
        phases = set(await uow.session.scalars(select(m.Deployment.phase).where(m.Deployment.id.in_(
            [ids[f"web{i}"] for i in range(3)]))))
    assert phases == {m.DeploymentPhase.DEGRADED}


async def test_insert_returning_writes_the_rows_as_given_and_reads_back_the_columns_asked(database: Database) -> None:
    """`InsertRows.insert_returning`: each row as given (a JSON column, a time with its offset,
    a NULL, quotes), and the asked columns of each row written, the database's ids among them;
    on PostgreSQL by one execution of one text whatever the number of rows (no executemany, no
    statement to prepare for a new number of rows)."""
    await _seeded(database)
    at = datetime(2026, 12, 4, 23, 30, tzinfo=timezone.utc)
    texts: list[list[str]] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        texts[-1].append(statement)

    def rows(count: int, first: int) -> list[dict[str, Any]]:
        return [{"at": at, "actor": f"it's \"{i}\"", "kind": "k", "object_kind": "deployment", "object_id": f"a/{i}",
                 "message": "", "data": {"i": i, "none": None}} for i in range(first, first + count)]

    returned: list[tuple[Any, ...]] = []
    event.listen(database.engine.sync_engine, "before_cursor_execute", note)
    try:
        for count, first in ((1, 0), (3, 1)):
            texts.append([])
            async with database.unit_of_work() as uow:
                with counted_trips() as trips:
                    returned += await InsertRows(m.Event.__table__, rows(count, first)).insert_returning(
                        uow.session, "id", "object_id")
                await uow.commit()
            if database.engine.dialect.name == "postgresql":
                kinds = [t.kind for t in trips if "events" in t.statement]
                assert kinds == ["execute"] or not first and kinds == ["prepare", "execute"], trips  # prepared once
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", note)
    if database.engine.dialect.name == "postgresql":
        assert texts[0] == texts[1] and len(texts[0]) == 1, texts
    async with database.unit_of_work() as uow:
        written = [(e.id, e.at, e.actor, e.object_id, e.data) for e in (await uow.session.scalars(
            select(m.Event).order_by(m.Event.id))).all()]
    assert sorted(returned) == [(id_, object_id) for id_, _, _, object_id, _ in written]
    assert [(as_utc(at_), actor, object_id, data) for _, at_, actor, object_id, data in written] == [
        (row["at"], row["actor"], row["object_id"], row["data"]) for row in rows(4, 0)]


async def test_insert_writes_the_rows_as_given_and_on_postgresql_waits_as_one_statement(database: Database) -> None:
    """`InsertRows.insert`: each row as given (a JSON column, a time with its offset, a NULL,
    quotes, a dollar); on PostgreSQL one statement over arrays whatever the number of rows, which
    inside `deferred_writes(postgresql=True)` waits as one statement for the message it goes in
    (a submit batch's deployments: not one statement a row for the server to parse and plan)."""
    await _seeded(database)
    at = datetime(2026, 12, 5, 2, 40, tzinfo=timezone.utc)
    rows = [{"at": at, "actor": f"it's ${i}", "kind": "k", "object_kind": "deployment", "object_id": f"a/{i}",
             "message": "", "data": {"i": i, "none": None}} for i in range(3)]
    async with database.unit_of_work() as uow:
        with deferred_writes(postgresql=True), counted_trips() as trips:
            await InsertRows(m.Event.__table__, rows).insert(uow.session)
            if database.engine.dialect.name == "postgresql":
                assert trips == []
                assert len((await pg_driver.adapted_connection(uow.session)).deferred) == 1
        await uow.commit()
    async with database.unit_of_work() as uow:
        written = [(as_utc(e.at), e.actor, e.object_id, e.data) for e in (await uow.session.scalars(
            select(m.Event).order_by(m.Event.id))).all()]
    assert written == [(row["at"], row["actor"], row["object_id"], row["data"]) for row in rows]

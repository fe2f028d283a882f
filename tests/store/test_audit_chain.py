"""The audit chain: appends form one chain (also concurrently), and tampering with the table
directly in SQL (edit, delete, insert, reorder, truncate) is found and named by verify_chain."""

from __future__ import annotations

import asyncio
import enum
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError

from controller.identity import CONTROLLER, Principal, Role
from controller.store import audit, pg_driver
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.audit import AuditRecord, ChainReport, entry_hash
from controller.store.db import Database
from controller.store.marks import deferred_writes
from controller.store.sqlite_driver import counted_trips
from controller.usecases import audit as cases
from controller.usecases.redaction import redactor_for


def _record(i: int, tenant: str = "a") -> AuditRecord:
    return AuditRecord(actor=f"user{i}", role="tenant", tenant=tenant, action="/maia.v1.DeploymentService/Submit",
                       object_kind="deployment", object_id=f"web{i}", request_id=f"req-{i}", detail={"i": i})


async def _append(database: Database, *records: AuditRecord) -> list[int]:
    async with database.unit_of_work() as uow:
        seqs = await audit.append(uow.session, records)
        await uow.commit()
    return seqs


async def _verify(database: Database, expected_head: tuple[int, str] | None = None) -> ChainReport:
    async with database.unit_of_work() as uow:
        return await audit.verify_chain(uow.session, expected_head=expected_head)


async def _sql(database: Database, *statements: str) -> None:
    async with database.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_appends_chain_in_order_and_verify(database: Database) -> None:
    assert await _append(database, _record(1), _record(2)) == [1, 2]
    assert await _append(database, _record(3, tenant="b")) == [3]
    report = await _verify(database)
    assert report.intact and report.entries == 3 and report.head_seq == 3 and report.first_bad_seq is None
    async with database.unit_of_work() as uow:
        rows = await audit.list_entries(uow.session)
        assert [r.seq for r in rows] == [1, 2, 3]
        assert rows[0].prev_hash == audit.GENESIS_HASH and rows[1].prev_hash == rows[0].hash
        assert report.head_hash == rows[2].hash
        assert [r.seq for r in await audit.list_entries(uow.session, tenant="b")] == [3]
        assert [r.seq for r in await audit.list_entries(uow.session, after_seq=1, limit=1)] == [2]


async def test_an_empty_log_is_intact(database: Database) -> None:
    report = await _verify(database)
    assert report.intact and report.entries == 0 and report.head_seq == 0


async def test_concurrent_appends_form_one_chain(database: Database) -> None:
    seqs = await asyncio.gather(*(_append(database, _record(i), _record(100 + i)) for i in range(12)))
    assert sorted(s for pair in seqs for s in pair) == list(range(1, 25))
    assert all(pair[1] == pair[0] + 1 for pair in seqs)  # one call's records stay adjacent
    report = await _verify(database)
    assert report.intact and report.entries == 24


async def test_writers_of_two_processes_and_a_rolled_back_append_keep_one_chain(database: Database) -> None:
    # A process links its next append to the head it wrote last (audit._last_heads), which the
    # other process's appends and a rolled-back transaction move or leave behind.
    other = Database(database.url)
    ours: dict[str, tuple[int, str]] = {}
    theirs: dict[str, tuple[int, str]] = {}

    async def append_as(heads: dict[str, tuple[int, str]], db: Database, *records: AuditRecord) -> list[int]:
        audit._last_heads.clear()
        audit._last_heads.update(heads)  # what that process knows
        seqs = await _append(db, *records)
        heads.clear()
        heads.update(audit._last_heads)
        return seqs

    try:
        assert await append_as(ours, database, _record(1)) == [1]
        assert await append_as(theirs, other, _record(2), _record(3)) == [2, 3]
        async with database.unit_of_work() as uow:
            audit._last_heads.clear()
            audit._last_heads.update(ours)
            assert await audit.append(uow.session, [_record(4)]) == [4]
            await uow.rollback()
        ours.update(audit._last_heads)
        assert await append_as(ours, database, _record(5)) == [4]
        assert await append_as(theirs, other, _record(6)) == [5]
        assert await append_as(theirs, other, _record(7)) == [6]
    finally:
        await other.dispose()
    report = await _verify(database)
    assert report.intact and report.entries == 6 and report.head_seq == 6


async def test_two_engines_of_one_process_link_to_each_others_head(database: Database) -> None:
    """The reconcile thread's engine and the controller's append to one chain in turn: each
    append links to the head the other wrote (a compare-and-set that holds and the insert: two
    statements, one on PostgreSQL), not to its own engine's last one (a miss, and the head read:
    four)."""
    other = Database(database.url)
    statements: list[str] = []
    for db in (database, other):
        event.listen(db.engine.sync_engine, "before_cursor_execute",
                     lambda _c, _cur, statement, *_a: statements.append(statement.split()[0]))
    try:
        await _append(database, _record(1))
        for i, db in enumerate([other, database, other, database]):
            statements.clear()
            assert await _append(db, _record(10 + i)) == [2 + i]
            assert [s for s in statements if s in ("UPDATE", "INSERT", "SELECT", "WITH")] == \
                (["UPDATE", "INSERT"] if database.is_sqlite else ["WITH"])
    finally:
        await other.dispose()
    assert (await _verify(database)).intact


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_miss_behind_another_engine_of_this_process_links_to_its_head_by_one_more_statement(
        database: Database) -> None:
    """The other engine of this process (the reconcile thread's) appended between this append's
    reading of the head it knows and its statement (which waited for that engine's lock): the
    compare and set misses, and one more statement links to the head that engine recorded,
    instead of the three that read the head. The rows along are written once."""
    other = Database(database.url)
    url = str(database.engine.url)
    statements: list[str] = []
    events = [repo.NewEvent(actor="a", kind="deployment.submitted", object_kind="deployment", object_id="t/x")]

    def note(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        statements.append(statement.split()[0])
        if len(statements) == 1:
            audit._last_heads[url] = newer  # recorded by the other engine meanwhile

    try:
        assert await _append(database, _record(1)) == [1]
        stale = audit._last_heads[url]
        assert await _append(other, _record(2)) == [2]
        newer = audit._last_heads[url]
        audit._last_heads[url] = stale  # as this append read it, before the other engine's
        event.listen(database.engine.sync_engine, "before_cursor_execute", note)
        try:
            async with database.unit_of_work() as uow:
                assert await audit.append(uow.session, [_record(3)], along=[repo.event_rows(events)]) == [3]
                await uow.commit()
        finally:
            event.remove(database.engine.sync_engine, "before_cursor_execute", note)
    finally:
        await other.dispose()
    assert statements == ["WITH", "WITH"]
    async with database.unit_of_work() as uow:
        assert [e.object_id for e in (await uow.session.scalars(select(m.Event))).all()] == ["t/x"]
    report = await _verify(database)
    assert report.intact and report.entries == 3 and report.head_seq == 3


async def test_unprintable_and_overlong_values_are_stored_cleaned(database: Database) -> None:
    await _append(database, AuditRecord(actor="a\x00b", action="x" * 500, object_id="n\x00" * 300,
                                        detail={"message": "m\x00" * 2000}))
    async with database.unit_of_work() as uow:
        (row,) = await audit.list_entries(uow.session)
    assert "\x00" not in row.actor and len(row.action) == 128 and len(row.object_id) == 255
    assert "\x00" not in row.detail["message"]
    assert (await _verify(database)).intact


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_long_text_is_never_cut_inside_an_id(database: Database) -> None:
    """A watchdog alarm names every tenant of a rack and their deployments: past 1,024 characters
    it was cut wherever the count fell, and a cut inside another tenant's id left a prefix the
    tenant redactor (whole ids) did not know: a tenant read "northwind-" (found in review)."""
    secret = "northwind-confidential-genomics"
    head = "rack rack-07 holds tenant alpha (dedicated_rack) together with "
    message = head + ("x " * 600)[:1013 - len(head)] + f" {secret}/train-2 on rack-07-node-02"
    assert message[1014:1023] == secret[:9]  # the 1,024-character cut falls inside the id
    await _append(database, AuditRecord(actor="isolation-watchdog", action="isolation.violation", tenant="alpha",
                                        detail={"message": message, "short": "alpha bravo-labs-x y"}),
                  AuditRecord(actor="y" * 200, action="a" * 127 + " b"))
    async with database.unit_of_work() as uow:
        alarm, long_actor = [cases.AuditEventView(**row._asdict()) for row in await audit.list_entries(uow.session)]
        seen = cases.as_seen_by_tenant(alarm, redactor_for(Principal("alpha-ci", Role.TENANT, tenant="alpha"),
                                                           ("alpha", secret)))
    assert alarm.detail["message"] == message[:1014] + "…" and secret[:9] not in seen.detail["message"]
    assert alarm.detail["short"] == "alpha bravo-labs-x y"  # within the limit: as it was
    assert long_actor.actor == "y" * 127 + "…"  # a run longer than any id is cut where it falls
    assert long_actor.action == "a" * 127 + "…"
    assert (await _verify(database)).intact
    # Nor inside a deployment's key: cut in its NAME, "otherlab/…" kept its tenant whole, which the
    # redaction (a key with its name, a tenant id not before a '/') did not know (found in review).
    said = "preempted otherlab/chat-model now"
    assert [audit._clean(said, n) for n in (15, 20, 29)] == ["preempted …"] * 3
    assert audit._clean(said, 30) == "preempted otherlab/chat-model…"


async def test_a_time_in_another_zone_is_written_as_it_is_hashed(database: Database) -> None:
    """SQLite keeps a time's wall clock and drops its zone, the hash is of its UTC time: an
    `append(at=)` of another zone broke the chain there (no caller passes one yet; found in review)."""
    at = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with database.unit_of_work() as uow:
        await audit.append(uow.session, [AuditRecord(actor="a", action="x")], at=at)
        await uow.commit()
    assert (await _verify(database)).intact
    async with database.unit_of_work() as uow:
        (entry,) = await audit.list_entries(uow.session)
    assert m.as_utc(entry.at) == at


def _forged_next(seq: int, prev_hash: str) -> str:
    """An INSERT of a well-formed entry an attacker computed with the published algorithm."""
    values = {"seq": seq, "at": audit.utcnow(), "prev_hash": prev_hash, "detail": {}, "request_id": "", "actor": "evil",
              "role": "admin", "tenant": "", "action": "forged", "object_kind": "", "object_id": "", "outcome": "OK"}
    digest = entry_hash(values)
    return (f"INSERT INTO audit_log (seq, at, request_id, actor, role, tenant, action, object_kind, object_id, "
            f"outcome, detail, prev_hash, hash) VALUES ({seq}, '{values['at'].isoformat()}', '', 'evil', 'admin', '', "
            f"'forged', '', '', 'OK', '{{}}', '{prev_hash}', '{digest}')")


TAMPERING = {
    "edit a field": (["UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3"], 3),
    "edit the outcome of the first": (["UPDATE audit_log SET outcome = 'OK', object_id = 'x' WHERE seq = 1"], 1),
    "remove a middle entry": (["DELETE FROM audit_log WHERE seq = 2"], 2),
    "remove the newest entries": (["DELETE FROM audit_log WHERE seq >= 4"], 4),
    "reorder two entries": (["UPDATE audit_log SET seq = -2 WHERE seq = 2",
                             "UPDATE audit_log SET seq = 2 WHERE seq = 3",
                             "UPDATE audit_log SET seq = 3 WHERE seq = -2"], 2),
    "renumber and insert": (["UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 3",
                             "UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1000",
                             "INSERT INTO audit_log SELECT 3, at, request_id, 'evil', role, tenant, action, "
                             "object_kind, object_id, outcome, detail, prev_hash, hash FROM audit_log WHERE seq = 2"], 3),
    "remove the head record": (["DELETE FROM audit_head"], 1),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
async def test_tampering_is_found_and_the_first_bad_entry_named(database: Database, case: str) -> None:
    await _append(database, *(_record(i) for i in range(1, 6)))
    assert (await _verify(database)).intact
    statements, first_bad = TAMPERING[case]
    await _sql(database, *statements)
    report = await _verify(database)
    assert not report.intact
    assert report.first_bad_seq == first_bad, report.problem
    assert str(first_bad) in report.problem


async def test_an_appended_forgery_is_beyond_the_head(database: Database) -> None:
    await _append(database, _record(1), _record(2))
    report = await _verify(database)
    await _sql(database, _forged_next(3, report.head_hash))
    bad = await _verify(database)
    assert not bad.intact and bad.first_bad_seq == 3 and "beyond the recorded head" in bad.problem


async def test_a_rewritten_entry_with_a_recomputed_hash_breaks_the_next_link(database: Database) -> None:
    await _append(database, *(_record(i) for i in range(1, 4)))
    async with database.unit_of_work() as uow:
        row = (await audit.list_entries(uow.session, after_seq=1, limit=1))[0]
    values = {c: getattr(row, c) for c in ("seq", "at", "prev_hash", "detail", "request_id", "role", "tenant",
                                           "action", "object_kind", "object_id", "outcome")}
    values["actor"] = "someone-else"
    await _sql(database, f"UPDATE audit_log SET actor = 'someone-else', hash = '{entry_hash(values)}' WHERE seq = 2")
    report = await _verify(database)
    assert not report.intact and report.first_bad_seq == 3 and "entry 2 was rewritten" in report.problem


async def test_truncating_entries_and_head_together_needs_the_expected_head(database: Database) -> None:
    await _append(database, *(_record(i) for i in range(1, 5)))
    saved = await _verify(database)
    assert (await _verify(database, (saved.head_seq, saved.head_hash))).intact
    async with database.unit_of_work() as uow:
        (third,) = await audit.list_entries(uow.session, after_seq=2, limit=1)
    await _sql(database, "DELETE FROM audit_log WHERE seq = 4",
               f"UPDATE audit_head SET seq = 3, hash = '{third.hash}'")
    assert (await _verify(database)).intact  # the limit of a chain in the same database
    report = await _verify(database, (saved.head_seq, saved.head_hash))
    assert not report.intact and report.first_bad_seq == 4 and "expected head" in report.problem


class _Kind(enum.IntEnum):
    ONE = 1


def test_entries_hash_and_clean_as_the_canonical_form_says() -> None:
    """Known answers (computed with `json.dumps` per entry before appends shared one encoder and
    one time text): an entry's hash and cleaned detail, whatever the detail's value types."""
    at = datetime(2026, 12, 2, 13, 0, 0, 123456, tzinfo=timezone.utc)
    records = [AuditRecord(actor="controller", action="deployment.placed", role="controller", tenant="t",
                           object_kind="deployment", object_id="t/web", request_id="plan-1",
                           detail={"message": "placed\x00 1", "replicas": 2, "ratio": 0.5, "nodes": ["n1", "n2"],
                                   "moved": ("a", 1), "nested": {"ok": True, "none": None, "kind": _Kind.ONE},
                                   "when": at}),
               AuditRecord(actor="x" * 200, action="y")]
    first, second = audit._chained(records, 7, audit.GENESIS_HASH, at)
    assert first["detail"] == {"message": "placed\ufffd 1", "replicas": 2, "ratio": 0.5, "nodes": ["n1", "n2"],
                               "moved": ["a", 1], "nested": {"ok": True, "none": None, "kind": _Kind.ONE},
                               "when": "2026-12-02 13:00:00.123456+00:00"}
    assert first["hash"] == "005daec3beb9c70f12f4fdceee0a3a3b3211a8f23bc143913e6acd94454ad18a" == entry_hash(first)
    # Cut, and said so ("…"; since 2026-12-07: entries stored before hold 128 characters and no mark).
    assert second["hash"] == "8499de2959a376feae9d22914c8c61050c82f2a5160d28e18e75b39676de012c" == entry_hash(second)
    assert second["prev_hash"] == first["hash"] and second["actor"] == "x" * 127 + "…"


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_an_unread_append_goes_with_the_commit_and_a_missed_head_fails_its_transaction(
        database: Database) -> None:
    """`append(unread=True)` inside `deferred_writes` on SQLite: no trip of its own, the entries
    chained to the head this process wrote. When that head is stale (another process appended
    since), the compare and set misses and the commit fails with nothing written; an append that
    reads the head then links to the real one."""
    assert await _append(database, _record(1)) == [1]
    async with database.unit_of_work() as uow:
        with deferred_writes(), counted_trips() as trips:
            assert await audit.append(uow.session, [_record(2), _record(3)], unread=True) == [2, 3]
        await uow.commit()
    assert trips == []
    ours = dict(audit._last_heads)
    assert await _append(database, _record(4)) == [4]  # another process's append
    audit._last_heads.clear()
    audit._last_heads.update(ours)
    with pytest.raises(IntegrityError) as refused:
        async with database.unit_of_work() as uow:
            with deferred_writes():
                await audit.append(uow.session, [_record(5)], unread=True)
            await uow.commit()
    assert audit.head_missed(refused.value)
    report = await _verify(database)
    assert report.intact and report.entries == 4 and report.head_seq == 4
    assert await _append(database, _record(6)) == [5]
    report = await _verify(database)
    assert report.intact and report.entries == 5 and report.head_seq == 5


async def test_rows_along_an_append_are_written_once_and_on_postgresql_by_its_statement(database: Database) -> None:
    """`append(along=)`: the rows of another table the caller writes with the entries. With the
    head this process wrote known, on PostgreSQL they ride in the compare and set's statement (one
    trip for both) and stay written when it misses (another process appended since), the head then
    read and the entries linked to it, the rows not written twice; with no head known they go
    first by an executemany of their own. Each time, exactly the rows given, as given."""
    postgres = database.engine.dialect.name == "postgresql"
    assert await _append(database, _record(1)) == [1]

    def along(i: int) -> list[repo.NewEvent]:
        return [repo.NewEvent(actor=f"a{i}", kind="deployment.submitted", object_kind="deployment",
                              object_id=f"t/web{i}-{k}", message="it's \\ \"quoted\"", data={"k": k, "i": [i]})
                for k in range(2)]

    async def append_along(i: int) -> list[str]:
        async with database.unit_of_work() as uow:
            with pg_driver.counted_trips() as trips:
                assert len(await audit.append(uow.session, [_record(i)], along=[repo.event_rows(along(i))])) == 1
            await uow.commit()
        return [t.statement for t in trips if t.kind != "prepare"]

    statements = await append_along(2)
    if postgres:
        assert statements == ["BEGIN", "WITH along0_ AS"]
    ours = dict(audit._last_heads)
    assert await _append(database, _record(3)) == [3]  # another process's append: our head is stale
    audit._last_heads.clear()
    audit._last_heads.update(ours)
    statements = await append_along(4)
    if postgres:
        assert statements[:2] == ["BEGIN", "WITH along0_ AS"] and "INSERT INTO events" not in statements
    audit._last_heads.clear()  # none known (a new process)
    statements = await append_along(5)
    if postgres:
        assert statements[:2] == ["BEGIN", "INSERT INTO events"]
    async with database.unit_of_work() as uow:
        written = [(e.actor, e.object_id, e.message, e.data) for e in (await uow.session.scalars(
            select(m.Event).order_by(m.Event.id))).all()]
    assert written == [(e.actor, e.object_id, e.message, e.data) for i in (2, 4, 5) for e in along(i)]
    report = await _verify(database)
    assert report.intact and report.entries == 5 and report.head_seq == 5


async def test_a_rolled_back_append_forgets_the_head_it_wrote(database: Database) -> None:
    """A transaction that appended and rolled back (a failed plan commit, a failed batch) wrote a
    head that was never committed: the next append does not link to it. Unread (SQLite), linking to
    it would fail the next transaction whole (`test_an_unread_append_goes_with_...`)."""
    assert await _append(database, _record(1)) == [1]
    async with database.unit_of_work() as uow:
        assert await audit.append(uow.session, [_record(2)]) == [2]
        await uow.rollback()
    async with database.unit_of_work() as uow:
        with deferred_writes():
            assert await audit.append(uow.session, [_record(3)], unread=True) == [2]
        await uow.commit()
    report = await _verify(database)
    assert report.intact and report.entries == 2 and report.head_seq == 2


async def test_an_append_in_a_released_savepoint_is_forgotten_when_its_transaction_rolls_back(
        database: Database) -> None:
    """SQLAlchemy fires `after_commit` when a savepoint (`begin_nested`) is released: that is not
    the transaction's commit. The transaction rolls back after: the head appended in the savepoint
    was never committed and is forgotten (unread, linking to it would fail the next transaction
    whole); a transaction that commits after its savepoint keeps the head it wrote."""
    url = str(database.engine.url)
    assert await _append(database, _record(1)) == [1]
    async with database.unit_of_work() as uow:
        assert await audit.append(uow.session, [_record(2)]) == [2]  # begun before the savepoint (SQLite)
        async with uow.session.begin_nested():
            assert await audit.append(uow.session, [_record(3)]) == [3]
        rolled_back = audit._last_heads[url]
        await uow.rollback()
    assert audit._last_heads.get(url) != rolled_back
    async with database.unit_of_work() as uow:
        with deferred_writes():
            assert await audit.append(uow.session, [_record(4)], unread=True) == [2]
        await uow.commit()
    async with database.unit_of_work() as uow:
        assert await audit.append(uow.session, [_record(5)]) == [3]
        async with uow.session.begin_nested():
            assert await audit.append(uow.session, [_record(6)]) == [4]
        committed = audit._last_heads[url]
        await uow.commit()
    assert audit._last_heads.get(url) == committed
    report = await _verify(database)
    assert report.intact and report.entries == 4 and report.head_seq == 4


async def test_verify_while_entries_are_appended_reads_one_moment_and_finds_the_chain_intact(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """`maiactl audit verify` while audited calls append (every call does): it reads the head and
    the entries as of one moment. Read in separate statements, an entry appended between the
    head's read and the last batch was reported as "appended outside the controller"."""
    await _append(database, *(_record(i) for i in range(1, 31)))
    monkeypatch.setattr(audit, "_VERIFY_BATCH", 1)  # a round trip per entry: appends land between them
    stop = asyncio.Event()

    async def appending() -> int:
        appended = 0
        while not stop.is_set():
            await _append(database, _record(100 + appended))
            appended += 1
            await asyncio.sleep(0)
        return appended

    writer = asyncio.create_task(appending())
    try:
        reports = [await cases.verify(database, CONTROLLER) for _ in range(3)]
    finally:
        stop.set()
        appended = await writer
    assert appended > 0
    assert all(r.intact for r in reports), [r.problem for r in reports]
    assert (await _verify(database)).entries == 30 + appended

"""Audit retention (`--audit-ttl`): the leader deletes the oldest audit entries past their time
to live, a prefix of the chain that verifies, and records the last one deleted as the chain's
base (`audit_base`); `verify_chain` checks the chain from there, and still finds tampering."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from controller.config import parse_args
from controller.retention import AuditRetention
from controller.store import audit
from controller.store import models as m
from controller.store.audit import GENESIS_HASH, AuditRecord, ChainReport
from controller.store.db import Database

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
TTL_S = 24 * 3600.0


def _record(i: int) -> AuditRecord:
    return AuditRecord(actor=f"user{i}", role="tenant", tenant="lab", action="/maia.v1.DeploymentService/Submit",
                       object_kind="deployment", object_id=f"web{i}", request_id=f"req-{i}", detail={"i": i})


async def _append(database: Database, days_ago: float, *numbers: int) -> None:
    """Entries recorded `days_ago` days before NOW, one append (one time) for all of them."""
    async with database.unit_of_work() as uow:
        await audit.append(uow.session, [_record(i) for i in numbers], at=NOW - timedelta(days=days_ago))
        await uow.commit()


async def _prune(database: Database, limit: int = 100) -> int:
    async with database.unit_of_work() as uow:
        pruned = await audit.prune(uow.session, NOW - timedelta(seconds=TTL_S), limit)
        await uow.commit()
    return pruned.count


async def _seqs(database: Database) -> list[int]:
    async with database.unit_of_work() as uow:
        return list((await uow.session.scalars(select(m.AuditEntry.seq).order_by(m.AuditEntry.seq))).all())


async def _base(database: Database) -> tuple[int, str]:
    async with database.unit_of_work() as uow:
        row = (await uow.session.execute(select(m.AuditBase.seq, m.AuditBase.hash))).one()
        return row.seq, row.hash


async def _hash_of(database: Database, seq: int) -> str:
    async with database.unit_of_work() as uow:
        return str(await uow.session.scalar(select(m.AuditEntry.hash).where(m.AuditEntry.seq == seq)))


async def _verify(database: Database, expected_head: tuple[int, str] | None = None) -> ChainReport:
    async with database.read_snapshot() as session:
        return await audit.verify_chain(session, expected_head=expected_head)


async def _sql(database: Database, *statements: str) -> None:
    async with database.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_a_prune_deletes_the_oldest_entries_past_the_cutoff_and_the_chain_begins_at_the_last(
        database: Database) -> None:
    await _append(database, 5, 1, 2)
    await _append(database, 3, 3, 4, 5)
    await _append(database, 0.1, 6)
    assert await _base(database) == (0, GENESIS_HASH)
    fourth = await _hash_of(database, 4)
    assert await _prune(database, limit=4) == 4
    assert await _seqs(database) == [5, 6]
    assert await _base(database) == (4, fourth)
    report = await _verify(database)
    assert report.intact and report.first_seq == 5 and report.entries == 2 and report.head_seq == 6
    assert await _prune(database) == 1  # the fifth; the sixth is within the TTL
    assert await _seqs(database) == [6]
    assert (await _verify(database)).first_seq == 6
    assert await _prune(database) == 0


async def test_the_newest_entry_is_never_deleted_however_old(database: Database) -> None:
    await _append(database, 30, 1, 2, 3)
    assert await _prune(database) == 2
    assert await _seqs(database) == [3]
    report = await _verify(database)
    assert report.intact and report.first_seq == 3 and report.head_seq == 3
    await _append(database, 0, 4)  # the chain goes on from the entry kept
    assert (await _verify(database)).intact


async def test_only_a_prefix_goes_an_old_entry_after_a_recent_one_stays(database: Database) -> None:
    """Appends take their time as they run, so a chain's times are in order but for a few ms; an
    entry after one within the TTL is not deleted before it (the chain keeps no holes)."""
    await _append(database, 5, 1)
    await _append(database, 0.5, 2)
    await _append(database, 5, 3)
    await _append(database, 0, 4)
    assert await _prune(database) == 1
    assert await _seqs(database) == [2, 3, 4]
    assert (await _verify(database)).intact


async def test_retention_stops_before_an_entry_that_does_not_verify_and_verify_names_it(database: Database) -> None:
    await _append(database, 5, 1, 2, 3, 4)
    await _append(database, 0, 5)
    await _sql(database, "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3")
    assert await _prune(database) == 2  # 1 and 2; the edited third stays as evidence
    assert await _seqs(database) == [3, 4, 5]
    report = await _verify(database)
    assert not report.intact and report.first_bad_seq == 3 and "does not match its hash" in report.problem
    assert await _prune(database) == 0  # it never passes the edited entry


async def test_verify_from_the_base_finds_the_first_entry_kept_removed_and_a_deleted_base(
        database: Database) -> None:
    await _append(database, 5, 1, 2, 3)
    await _append(database, 0, 4, 5)
    assert await _prune(database) == 3
    await _sql(database, "DELETE FROM audit_log WHERE seq = 4")
    report = await _verify(database)
    assert not report.intact and report.first_bad_seq == 4 and "entry 4 is missing" in report.problem
    await _sql(database, "DELETE FROM audit_base")
    report = await _verify(database)
    assert not report.intact and "base record (audit_base id=1) was deleted" in report.problem


async def test_a_base_moved_past_entries_kept_breaks_the_link(database: Database) -> None:
    await _append(database, 5, 1, 2)
    await _append(database, 0, 3, 4)
    assert await _prune(database) == 2
    await _sql(database, "UPDATE audit_base SET seq = 3")  # the base claims entry 3 was deleted too
    report = await _verify(database)
    assert not report.intact and report.first_bad_seq == 3 and "1 entries at or before the base" in report.problem
    await _sql(database, "DELETE FROM audit_log WHERE seq = 3")
    report = await _verify(database)
    assert not report.intact and report.first_bad_seq == 4 and "does not link to entry 3" in report.problem


async def test_a_base_moved_by_hand_over_entries_kept_leaves_none_of_them_unchecked(database: Database) -> None:
    """The base pointed at an entry still stored, with its own hash and time, and an entry
    before it edited: verify began after the base and said intact, an --expect-head saved
    before too, while ListAuditEvents served the edited entry (found in review)."""
    await _append(database, 0, 1, 2, 3, 4, 5)
    head = await _verify(database)
    await _sql(database, "UPDATE audit_base SET seq = 3, hash = (SELECT hash FROM audit_log WHERE seq = 3), "
                         "at = (SELECT at FROM audit_log WHERE seq = 3)",
               "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
    report = await _verify(database, expected_head=(head.head_seq, head.head_hash))
    assert not report.intact and report.first_bad_seq == 1
    assert "3 entries at or before the base (entry 3, where the chain begins) are still stored" in report.problem


async def test_an_expected_head_at_the_base_is_checked_and_one_before_it_fails_unchecked(
        database: Database) -> None:
    await _append(database, 5, 1, 2, 3)
    await _append(database, 0, 4)
    second, third = await _hash_of(database, 2), await _hash_of(database, 3)
    assert await _prune(database) == 3
    assert (await _verify(database, expected_head=(3, third))).intact
    report = await _verify(database, expected_head=(3, "f" * 64))
    assert not report.intact and report.first_bad_seq == 3 and "expected head hash" in report.problem
    # Deleted: by retention or by someone who moved the base too, which nothing tells apart.
    report = await _verify(database, expected_head=(2, second))
    assert not report.intact and report.first_bad_seq == 2 and "cannot be checked" in report.problem


async def test_a_whole_log_rewritten_behind_a_forged_base_fails_the_expected_head(database: Database) -> None:
    """Without retention too: the log deleted, a forged entry whose prev_hash the base is set to."""
    await _append(database, 0, 1, 2, 3, 4, 5)
    fifth = await _hash_of(database, 5)
    await _append(database, 0, 6, 7)
    seventh = await _hash_of(database, 7)
    await _sql(database, "DELETE FROM audit_log WHERE seq < 7")
    forged_base = "UPDATE audit_base SET seq = 6, hash = (SELECT prev_hash FROM audit_log WHERE seq = 7)"
    await _sql(database, forged_base)
    report = await _verify(database)
    assert not report.intact and "names entry 6 but no time" in report.problem  # retention writes a time
    await _sql(database, "UPDATE audit_base SET at = CURRENT_TIMESTAMP")
    assert (await _verify(database)).intact  # what the chain alone cannot tell (docs/security.md)
    assert not (await _verify(database, expected_head=(5, fifth))).intact  # the saved head can
    assert (await _verify(database, expected_head=(7, seventh))).intact


async def test_the_retention_loop_deletes_a_batch_a_transaction(database: Database) -> None:
    await _append(database, 3, *range(1, 8))
    await _append(database, 0, 8)
    counted: list[int] = []

    async def pause(seconds: float) -> None:
        pass

    retention = AuditRetention(database, ttl_s=TTL_S, should_run=lambda: True, batch=3, on_pruned=counted.append,
                               now=lambda: NOW, sleep=pause)
    assert await retention.prune_once() == 7
    assert counted == [3, 3, 1] and retention.pruned_total == 7
    assert await _seqs(database) == [8]
    assert (await _verify(database)).intact
    assert await AuditRetention(database, ttl_s=TTL_S, should_run=lambda: False, now=lambda: NOW).prune_once() == 0


def test_audit_ttl_is_a_flag_off_by_default() -> None:
    assert parse_args([], env={}).audit_ttl_s == 0
    assert parse_args(["--audit-ttl", "86400"], env={}).audit_ttl_s == 86400
    with pytest.raises(ValueError, match="audit entries"):
        AuditRetention(None, ttl_s=0, should_run=lambda: True)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", ["-1", "3600", "1e12"])
def test_audit_ttl_refuses_less_than_a_day_and_more_than_ten_years(ttl: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--audit-ttl", ttl], env={})
    assert "a day to ten years" in capsys.readouterr().err

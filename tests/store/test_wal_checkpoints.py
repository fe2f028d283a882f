"""SQLite's WAL checkpoints off the commit path (store/checkpoints.py): the controller's commits
never copy the log into the database file (below a large bound), the checkpointer does, from its
own thread, and keeps the log from growing; its stop leaves everything in the database file."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from pathlib import Path

import pytest
from sqlalchemy import text

from controller.observability.metrics import ControllerMetrics
from controller.store import checkpoints, db as dbmod
from controller.store.checkpoints import CheckpointRound, WalCheckpointer, WalIndex, read_wal_index
from controller.store.db import Database

PAGE = 4096
ROW_BYTES = 3000  # one row a page: the log grows by about a page a row


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}")
    async with db.unit_of_work() as uow:
        await uow.session.execute(text("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)"))
        await uow.commit()
    _checkpoint_now(_path(db))  # the table in the database file: a copy of the file alone has it
    try:
        yield db
    finally:
        await db.dispose()


def _path(db: Database) -> Path:
    return Path(db.engine.url.database or "")


async def _write_pages(db: Database, pages: int, per_commit: int = 50) -> None:
    for _ in range(pages // per_commit):
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("INSERT INTO blobs (body) VALUES (randomblob(:n))"),
                                      [{"n": ROW_BYTES}] * per_commit)
            await uow.commit()


def _checkpoint_now(path: Path, mode: str = "TRUNCATE") -> int:
    """A checkpoint from a connection of its own; the frames the log held."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[1])
    finally:
        conn.close()


def _rows_in_file_alone(path: Path, into: Path) -> int:
    """The rows a copy of the database file holds without its log."""
    shutil.copyfile(path, into)
    conn = sqlite3.connect(into)
    try:
        return int(conn.execute("SELECT count(*) FROM blobs").fetchone()[0])
    finally:
        conn.close()


async def test_the_controllers_commits_never_checkpoint_the_log(database: Database, tmp_path: Path) -> None:
    path = _path(database)
    size_before = path.stat().st_size
    await _write_pages(database, 3000)  # three times SQLite's default checkpoint threshold
    # Nothing was copied into the database file: it is as it was, and its copy has none of the rows.
    assert path.stat().st_size == size_before
    assert _rows_in_file_alone(path, tmp_path / "copy.db") == 0
    assert _checkpoint_now(path, "PASSIVE") >= 3000  # all of it in the log (never started again)


async def test_past_the_bound_a_commit_checkpoints_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody checkpointing (a tool, or a checkpointer that cannot keep up): the log still stops growing."""
    monkeypatch.setattr(dbmod, "COMMIT_CHECKPOINT_PAGES", 500)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}")
    try:
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)"))
            await uow.commit()
        await _write_pages(db, 3000)
        # Started again once past 500 pages: never near 1,000 (SQLite's default) nor 3,000 pages long.
        assert (tmp_path / "maia.db-wal").stat().st_size < 750 * PAGE
        assert _rows_in_file_alone(tmp_path / "maia.db", tmp_path / "copy.db") > 0
    finally:
        await db.dispose()


class _Rounds:
    """What the checkpointer reports (from its thread)."""

    def __init__(self) -> None:
        self.seen: list[CheckpointRound] = []

    def wal_checkpointed(self, done: CheckpointRound) -> None:
        self.seen.append(done)


@asynccontextmanager
async def _checkpointing(path: Path, **settings: Any) -> AsyncIterator[tuple[WalCheckpointer, _Rounds]]:
    """A running checkpointer (polling every 10 ms) and what it reports; stopped after."""
    rounds = _Rounds()
    checkpointer = WalCheckpointer(path, poll_s=0.01, observer=rounds, **settings)
    checkpointer.start()
    try:
        yield checkpointer, rounds
    finally:
        await asyncio.to_thread(checkpointer.stop)


async def _polls_after(checkpointer: WalCheckpointer) -> None:
    """Until a poll that began after now has ended (with its round, if one was due)."""
    since = checkpointer.polls
    async with asyncio.timeout(30.0):  # a bound for a broken checkpointer, not a speed check
        while checkpointer.polls < since + 2:
            await asyncio.sleep(0.01)


async def test_the_checkpointer_copies_the_log_into_the_file_and_keeps_the_log_short(
        database: Database, tmp_path: Path) -> None:
    path = _path(database)
    async with _checkpointing(path, checkpoint_frames=1) as (checkpointer, rounds):
        for _ in range(8):
            await _write_pages(database, 500)
            await _polls_after(checkpointer)
            assert rounds.seen[-1].complete
            assert _rows_in_file_alone(path, tmp_path / "copy.db") == await _count(database)
        # 4,000 pages written; the log was started again after each checkpoint, so its file never
        # held much more than a batch of 500.
        assert (tmp_path / "maia.db-wal").stat().st_size < 1000 * PAGE
        assert all(not r.busy for r in rounds.seen)


async def test_a_round_waits_for_the_log_to_grow(database: Database, tmp_path: Path) -> None:
    """Each complete round has the next commit start the log again, and sync it: not for a few pages."""
    path = _path(database)
    async with _checkpointing(path, checkpoint_frames=1000, chase_frames=100_000) as (checkpointer, rounds):
        await _write_pages(database, 300, per_commit=300)
        await _polls_after(checkpointer)
        assert rounds.seen == [] and _rows_in_file_alone(path, tmp_path / "copy.db") == 0
        await _write_pages(database, 800, per_commit=800)  # 1,100 pages not copied
        await _polls_after(checkpointer)
        assert len(rounds.seen) == 1 and rounds.seen[0].complete
        assert _rows_in_file_alone(path, tmp_path / "copy.db") == 1100


async def test_past_the_chase_length_a_round_copies_any_news_until_the_log_starts_again(
        database: Database, tmp_path: Path) -> None:
    """Commits that never pause for a round keep the log from starting again; a long log is
    copied as it grows, so that one round ends with nothing left."""
    path = _path(database)
    async with _checkpointing(path, checkpoint_frames=100_000, chase_frames=400) as (checkpointer, rounds):
        await _write_pages(database, 300, per_commit=300)
        await _polls_after(checkpointer)
        assert rounds.seen == []
        await _write_pages(database, 200, per_commit=200)  # the log past 400 frames
        await _polls_after(checkpointer)
        assert len(rounds.seen) == 1 and rounds.seen[0].complete
        assert _rows_in_file_alone(path, tmp_path / "copy.db") == 500
        await _write_pages(database, 100, per_commit=100)  # this commit starts the log again: short
        await _polls_after(checkpointer)
        assert len(rounds.seen) == 1 and _rows_in_file_alone(path, tmp_path / "copy.db") == 500


async def _count(db: Database) -> int:
    async with db.unit_of_work() as uow:
        return int(await uow.session.scalar(text("SELECT count(*) FROM blobs")))


async def test_stop_leaves_everything_in_the_database_file(database: Database, tmp_path: Path) -> None:
    path = _path(database)
    checkpointer = WalCheckpointer(path, checkpoint_frames=100_000, chase_frames=100_000)  # no round before the stop
    checkpointer.start()
    await _write_pages(database, 300)
    assert _rows_in_file_alone(path, tmp_path / "before.db") == 0
    await asyncio.to_thread(checkpointer.stop)
    # The controller's connections are still open (SQLite checkpoints on the last close only):
    # the stop's own checkpoint copied the log and emptied it.
    assert (tmp_path / "maia.db-wal").stat().st_size == 0
    assert _rows_in_file_alone(path, tmp_path / "after.db") == 300
    await _write_pages(database, 50)  # and the database goes on as before
    assert await _count(database) == 350


def _shm_header(path: Path) -> bytes:
    with open(f"{path}-shm", "rb") as shm:
        return shm.read(136)


def _read_header(head: bytes, into: Path) -> WalIndex | None:
    into.write_bytes(head)
    fd = os.open(into, os.O_RDONLY)
    try:
        return read_wal_index(fd)
    finally:
        os.close(fd)


async def test_the_wal_index_header_is_read_only_when_sqlite_would_trust_it(database: Database, tmp_path: Path) -> None:
    """Two equal copies are not enough: SQLite's readers also want the header initialised and its
    checksum right (a copy rewritten but not yet summed, or garbage, is no header)."""
    await _write_pages(database, 100)
    head = _shm_header(_path(database))
    frames = _checkpoint_now(_path(database), "PASSIVE")
    assert _read_header(head, tmp_path / "good") == WalIndex(frames, 0)  # what SQLite says the log holds

    def both_copies(header: bytes) -> bytes:
        return header + header + head[96:]

    mxframe_changed = head[:16] + struct.pack("=I", frames + 5000) + head[20:48]  # its checksum not updated
    assert _read_header(both_copies(mxframe_changed), tmp_path / "unsummed") is None
    not_init = head[:12] + b"\0" + head[13:40]
    not_init += struct.pack("=2I", *checkpoints._checksum(not_init))  # summed right (as SQLite sums: see "good")
    assert _read_header(both_copies(not_init), tmp_path / "uninit") is None


def test_a_busy_round_leaves_the_log_gauges_as_the_last_round_saw_them() -> None:
    """A busy checkpoint (another one held the lock) reports no log length (-1): not a log emptied."""
    metrics = ControllerMetrics()
    metrics.wal_checkpointed(CheckpointRound(wal_frames=4000, checkpointed_frames=2500, seconds=0.01))
    metrics.wal_checkpointed(CheckpointRound(wal_frames=0, checkpointed_frames=0, seconds=0.0, busy=True))
    registry = metrics.registry
    assert registry.get_sample_value("maia_sqlite_wal_frames") == 4000
    assert registry.get_sample_value("maia_sqlite_wal_frames_uncopied") == 1500
    assert registry.get_sample_value("maia_sqlite_wal_checkpoint_seconds_count", {"outcome": "busy"}) == 1


class _Failing:
    """An observer that fails: what any unexpected error in a round does to the checkpointer's thread."""

    def __init__(self) -> None:
        self.calls = 0

    def wal_checkpointed(self, done: CheckpointRound) -> None:
        self.calls += 1
        raise RuntimeError("observer broken")


async def test_a_checkpointer_that_fails_still_takes_the_last_checkpoint_at_the_stop(
        database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _path(database)
    failing = _Failing()
    checkpointer = WalCheckpointer(path, checkpoint_frames=1, poll_s=0.01, observer=failing)
    checkpointer.start()
    try:
        await _write_pages(database, 100)
        async with asyncio.timeout(30.0):  # a bound for a checkpointer that never ran a round, not a speed check
            while failing.calls == 0:
                await asyncio.sleep(0.01)
        await _write_pages(database, 100)  # after its failure: only the stop's checkpoint copies these
    finally:
        await asyncio.to_thread(checkpointer.stop)
    assert failing.calls == 1  # no round after the failure
    assert "the WAL checkpointer of" in caplog.text and "observer broken" in caplog.text
    assert (tmp_path / "maia.db-wal").stat().st_size == 0
    assert _rows_in_file_alone(path, tmp_path / "after.db") == 200

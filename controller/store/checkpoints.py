"""SQLite's WAL checkpoints off the commit path: a thread of their own.

In WAL mode a commit appends its pages to the log (`<database>-wal`); a checkpoint copies them
into the database file and syncs both, after which the next writer starts the log again from its
start (and syncs its new header: one sync on that commit). By default SQLite checkpoints inside
the COMMIT that grows the log past 1,000 pages (`wal_autocheckpoint`), while that connection
holds the only writer. At 50 submits/s on 4,096 nodes one commit in 33 did, and held the writer
16 ms at the median (34 ms at most) against 0.15 ms for the others: two thirds of all the time
commits took, with every submit batch, plan commit and report flush queued behind it
(docs/benchmarks.md, 2026-12-03 evening, `walckpt`).

Here every connection `db.create_engine` opens checkpoints only once the log holds
`COMMIT_CHECKPOINT_PAGES` (a bound for when nobody else checkpoints: tools, tests, or a
checkpointer that cannot keep up), and the controller runs a `WalCheckpointer`: a thread with a
sqlite3 connection of its own that runs PASSIVE checkpoints. A PASSIVE checkpoint takes no
writer lock and waits for nobody: writers go on appending and readers reading meanwhile, and
sqlite3 lets go of the GIL during the call, so the event loop runs too. It copies what no
reader's snapshot still needs.

When: every `POLL_S` the thread reads the log's length and how much of it is copied from the
WAL-index header (`<database>-shm`, https://www.sqlite.org/walformat.html; no lock, nothing
written). A round runs once `CHECKPOINT_FRAMES` are not copied (SQLite's own threshold: the log
starts again, and a commit syncs its header, no more often than with SQLite's default; a round
every second started it again after every quiet second). Under a steady stream of commits a
round rarely ends before the next commit, so the log is not started again and grows; past
`CHASE_FRAMES` every poll copies what is new, until one round ends with nothing left and the
next writer starts the log again. Unreadable header: a round every `BLIND_EVERY_S`. The stop ends
with a TRUNCATE checkpoint: the database file holds everything and the log is empty. An unexpected
error in a poll ends the rounds (logged; commits checkpoint past `COMMIT_CHECKPOINT_PAGES`), not
the stop's checkpoint.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("maia.store.checkpoints")

# The log's length (pages) past which a commit checkpoints itself (SQLite's default: 1,000):
# ~40 MiB at 4 KiB pages, ~8 s of writes at 50 submits/s on 4,096 nodes.
COMMIT_CHECKPOINT_PAGES = 10_000
CHECKPOINT_FRAMES = 1_000
CHASE_FRAMES = 5_000
POLL_S = 0.05
BLIND_EVERY_S = 1.0
# How long the last checkpoint waits for readers and a writer to finish (SQLite's busy timeout).
FINAL_CHECKPOINT_TIMEOUT_S = 2.0

# The WAL-index header (walformat.html, 2.1): two copies of 48 bytes (iVersion first, isInit at
# 12, mxFrame at 16, a checksum of the first 40 bytes at 40), then the checkpoint information
# (nBackfill first); in the machine's byte order.
_WAL_INDEX_VERSION = 3007000
_HEADER = struct.Struct("=I8xBxxxI")  # iVersion, isInit, mxFrame
_HEADER_BYTES = 48
_SUMMED = struct.Struct("=10I")  # the header's first 40 bytes, as its checksum reads them
_CHECKSUM = struct.Struct("=2I")
_BACKFILL = struct.Struct("=I")


@dataclass(frozen=True)
class WalIndex:
    """The log's length and how much of it the database file has, as the WAL-index header says."""

    frames: int
    copied: int

    @property
    def uncopied(self) -> int:
        return max(0, self.frames - self.copied)


def read_wal_index(shm: int) -> WalIndex | None:
    """The header of the WAL-index open as `shm` (a file descriptor); None while it is being
    written (its two copies differ), before it is initialised, when its checksum is wrong (as
    SQLite's own readers check it: walIndexTryHdr), or when it is not one this code reads."""
    head = os.pread(shm, 2 * _HEADER_BYTES + _BACKFILL.size, 0)
    if len(head) < 2 * _HEADER_BYTES + _BACKFILL.size or head[:_HEADER_BYTES] != head[_HEADER_BYTES:2 * _HEADER_BYTES]:
        return None
    version, is_init, frames = _HEADER.unpack_from(head, 0)
    if version != _WAL_INDEX_VERSION or is_init != 1 or _checksum(head) != _CHECKSUM.unpack_from(head, 40):
        return None
    return WalIndex(frames, _BACKFILL.unpack_from(head, 2 * _HEADER_BYTES)[0])


def _checksum(head: bytes) -> tuple[int, int]:
    """SQLite's WAL checksum (walChecksumBytes, native byte order) of the header's first 40 bytes."""
    words = _SUMMED.unpack_from(head, 0)
    s1 = s2 = 0
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


@dataclass(frozen=True)
class CheckpointRound:
    """One checkpoint: the log's frames when it ended, and how many of them are in the database file."""

    wal_frames: int
    checkpointed_frames: int
    seconds: float
    busy: bool = False  # another checkpoint held the file's checkpoint lock: nothing done

    @property
    def complete(self) -> bool:
        """Every frame copied: the next writer starts the log again."""
        return not self.busy and self.checkpointed_frames >= self.wal_frames


class CheckpointObserver(Protocol):
    def wal_checkpointed(self, done: CheckpointRound) -> None: ...


def checkpoint(conn: sqlite3.Connection, mode: str = "PASSIVE") -> CheckpointRound:
    """One `PRAGMA wal_checkpoint(mode)` on `conn`, timed."""
    started = time.perf_counter()
    cursor = conn.execute(f"PRAGMA wal_checkpoint({mode})")
    busy, wal_frames, checkpointed = cursor.fetchone()
    cursor.close()
    seconds = time.perf_counter() - started
    # -1, -1: not in WAL mode (nothing to checkpoint), or busy.
    return CheckpointRound(max(wal_frames, 0), max(checkpointed, 0), seconds, busy=bool(busy))


class WalCheckpointer:
    """Checkpoints one SQLite file's log from a thread of its own (module docstring)."""

    def __init__(self, path: Path, *, checkpoint_frames: int = CHECKPOINT_FRAMES, chase_frames: int = CHASE_FRAMES,
                 poll_s: float = POLL_S, observer: CheckpointObserver | None = None) -> None:
        self.path = path
        self.checkpoint_frames = checkpoint_frames
        self.chase_frames = chase_frames
        self.poll_s = poll_s
        self.observer = observer
        self.polls = 0  # polls ended (each with its round if one was due)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = FINAL_CHECKPOINT_TIMEOUT_S + 1.0) -> None:
        """The last checkpoint (TRUNCATE), then the thread ends; blocks (call it from a thread of
        its own on an event loop). Safe to call twice, or without a start."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("the WAL checkpointer did not stop within %.0fs; leaving it (a daemon)", timeout_s)

    def _run(self) -> None:
        try:
            conn = _connect(self.path)
        except sqlite3.Error:
            log.exception("the WAL checkpointer cannot open %s; commits checkpoint past %d pages instead",
                          self.path, COMMIT_CHECKPOINT_PAGES)
            return
        try:
            try:
                self._rounds(conn)
            except Exception:  # a bug, or the index unreadable (EIO): no more rounds, but still the last one
                log.exception("the WAL checkpointer of %s failed; commits checkpoint past %d pages until the stop",
                              self.path, COMMIT_CHECKPOINT_PAGES)
                self._stopping.wait()
            last = checkpoint(conn, "TRUNCATE")
            if last.busy or last.wal_frames:  # a reader or a writer did not finish in time
                log.warning("the last WAL checkpoint left %d frames in %s-wal (busy); the next opening "
                            "replays them", last.wal_frames, self.path)
        except sqlite3.Error:
            log.exception("the last WAL checkpoint of %s failed; the next opening replays the log", self.path)
        finally:
            conn.close()

    def _rounds(self, conn: sqlite3.Connection) -> None:
        shm: int | None = None
        last_round = time.monotonic()
        try:
            while not self._stopping.wait(self.poll_s):
                if shm is None:
                    shm = _open_shm(self.path)
                index = None if shm is None else read_wal_index(shm)
                if self._due(index, time.monotonic() - last_round):
                    last_round = time.monotonic()
                    self._round(conn)
                self.polls += 1
        finally:
            if shm is not None:
                os.close(shm)

    def _due(self, index: WalIndex | None, since_round_s: float) -> bool:
        if index is None:
            return since_round_s >= BLIND_EVERY_S
        return index.uncopied >= self.checkpoint_frames or (index.frames >= self.chase_frames and index.uncopied > 0)

    def _round(self, conn: sqlite3.Connection) -> None:
        try:
            done = checkpoint(conn)
        except sqlite3.Error as exc:  # an I/O error, say: the next poll tries again
            log.warning("a WAL checkpoint of %s failed: %s", self.path, exc)
            return
        if self.observer is not None:
            self.observer.wal_checkpointed(done)


def _open_shm(path: Path) -> int | None:
    try:
        return os.open(f"{path}-shm", os.O_RDONLY)
    except OSError:  # not in WAL mode yet
        return None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=FINAL_CHECKPOINT_TIMEOUT_S, isolation_level=None)
    try:
        # A checkpoint syncs the log and the database file as its connection's setting says: as the
        # controller's (`db.create_engine`).
        conn.execute("PRAGMA synchronous=NORMAL")
        # A read opens the log and its index: held open from now on, the index is never started
        # anew (as when the last of the other connections closes) under `_open_shm`'s descriptor.
        conn.execute("PRAGMA schema_version").close()
    except sqlite3.Error:
        conn.close()
        raise
    return conn

"""SQLite's WAL checkpoints off the commit path: a thread of their own.

In WAL mode a commit appends its pages to the log (`<database>-wal`); a checkpoint copies them
into the database file and syncs both, after which writers reuse the log from its start. By
default SQLite checkpoints inside the COMMIT that grows the log past 1,000 pages
(`wal_autocheckpoint`), while that connection holds the only writer. At 50 submits/s on 4,096
nodes one commit in 33 did, and held the writer 16 ms at the median (34 ms at most) against
0.15 ms for the others: two thirds of all the time commits took, with every submit batch, plan
commit and report flush queued behind it (docs/benchmarks.md, 2026-12-03 evening, `walckpt`).

Here every connection `db.create_engine` opens checkpoints only once the log holds
`COMMIT_CHECKPOINT_PAGES` (a bound for when nobody else checkpoints: tools, tests, or a
checkpointer that cannot keep up), and the controller runs a `WalCheckpointer`: a thread with a
sqlite3 connection of its own that runs a PASSIVE checkpoint every `CHECKPOINT_EVERY_S`. A
PASSIVE checkpoint takes no writer lock and waits for nobody: writers go on appending and
readers reading meanwhile, and sqlite3 lets go of the GIL during the call, so the event loop runs
too. It copies what no reader's snapshot still needs; a round that had to leave frames is tried
again after `RETRY_PARTIAL_S`. Once the log is wholly copied, the next writer starts it again from
its start, so it stays near one period of writes. Its stop ends with a TRUNCATE checkpoint: the
database file holds everything and the log is empty.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("maia.store.checkpoints")

# The log's size (pages) past which a commit checkpoints itself (SQLite's default: 1,000):
# ~40 MiB at 4 KiB pages, ~8 s of writes at 50 submits/s on 4,096 nodes.
COMMIT_CHECKPOINT_PAGES = 10_000
CHECKPOINT_EVERY_S = 1.0
# A round that left frames a reader still needed goes again this much sooner.
RETRY_PARTIAL_S = 0.1
# How long the last checkpoint waits for readers and a writer to finish (SQLite's busy timeout).
FINAL_CHECKPOINT_TIMEOUT_S = 2.0


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
    busy, wal_frames, checkpointed = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    seconds = time.perf_counter() - started
    # -1, -1: not in WAL mode (nothing to checkpoint), or busy.
    return CheckpointRound(max(wal_frames, 0), max(checkpointed, 0), seconds, busy=bool(busy))


class WalCheckpointer:
    """Checkpoints one SQLite file's log from a thread of its own (module docstring)."""

    def __init__(self, path: Path, *, every_s: float = CHECKPOINT_EVERY_S,
                 observer: CheckpointObserver | None = None) -> None:
        self.path = path
        self.every_s = every_s
        self.observer = observer
        self.rounds_run = 0  # checkpoints tried, those that found nothing new too
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
            self._rounds(conn)
            last = checkpoint(conn, "TRUNCATE")
            if last.busy or last.wal_frames:  # a reader or a writer did not finish in time
                log.warning("the last WAL checkpoint left %d frames in %s-wal (busy); the next opening "
                            "replays them", last.wal_frames, self.path)
        except sqlite3.Error:
            log.exception("the last WAL checkpoint of %s failed; the next opening replays the log", self.path)
        finally:
            conn.close()

    def _rounds(self, conn: sqlite3.Connection) -> None:
        seen = (0, 0)
        wait = self.every_s
        while not self._stopping.wait(wait):
            try:
                done = checkpoint(conn)
            except sqlite3.Error as exc:  # an I/O error, say: the next round tries again
                log.warning("a WAL checkpoint of %s failed: %s", self.path, exc)
                wait = self.every_s
                continue
            finally:
                self.rounds_run += 1
            wait = self.every_s if done.complete else min(RETRY_PARTIAL_S, self.every_s)
            if (done.wal_frames, done.checkpointed_frames) != seen and self.observer is not None:
                self.observer.wal_checkpointed(done)  # a round that found nothing new is not one
            seen = (done.wal_frames, done.checkpointed_frames)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=FINAL_CHECKPOINT_TIMEOUT_S, isolation_level=None)
    try:
        # A checkpoint syncs the log and the database file as its connection's setting says: as the
        # controller's (`db.create_engine`).
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error:
        conn.close()
        raise
    return conn

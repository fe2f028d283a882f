"""`maiactl get --watch` and `maiactl wait` outlive a controller that goes away and comes back (a
restart): the real binaries, the controller stopped under them and started again on the same
address and database; each says so on stderr and goes on where it was."""
from __future__ import annotations

import asyncio
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO

from cli_harness import BIN, controller_process, maiactl_env
from controller.store.db import Database
from controller.store.repositories import NewEvent, record_events
from controller.store.retention import events_deleted_through, prune_events

WAIT_S = 60.0  # a bound on each wait below, never reached when things work


@dataclass
class Lines:
    """The lines a process writes to one of its pipes, as they come (read by a thread)."""

    pipe: IO[str]
    seen: list[str] = field(default_factory=list)
    _new: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.pipe:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def drained(self) -> list[str]:
        """Every line written so far (those not read by `until` yet taken now, without waiting)."""
        while True:
            try:
                line = self._new.get_nowait()
            except queue.Empty:
                return self.seen
            if line is not None:
                self.seen.append(line)

    def until(self, text: str) -> str:
        """The first line (seen or to come) holding `text`; AssertionError when the pipe ends first."""
        deadline = time.monotonic() + WAIT_S
        while not any(text in line for line in self.seen):
            line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"{text!r} never came; the process ended after: {self.seen}"
            self.seen.append(line)
        return next(line for line in self.seen if text in line)


def _tenant(folder: Path, name: str) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(f"kind: Tenant\nid: {name}\n")
    return str(path)


def _pending(folder: Path) -> str:
    """Deployment before/web: no nodes run, so it stays Pending until deleted."""
    path = folder / "web.yaml"
    path.write_text("kind: Deployment\nname: web\ntenant: before\nreplicas: 1\nshards_per_replica: 1\n"
                    "shard: {accelerators: 1, hbm_gib: 48, power_w: 700}\n")
    return str(path)


def _said_gone(line: str, command: str, address: str) -> None:
    """The note of an outage: the controller stopped (a poll it cancelled while stopping, or one
    that found nothing listening)."""
    assert line.startswith((f"({command}: UNAVAILABLE: cannot reach the controller at {address}",
                            f"({command}: CANCELLED: the controller at {address} ended the call unanswered")), line


@dataclass
class Watch:
    """A `maiactl` process that blocks (`get --watch`, `wait`) and what it wrote so far."""

    proc: subprocess.Popen[str]
    out: Lines
    err: Lines

    @classmethod
    def of(cls, address: str, token: str, *args: str) -> Watch:
        proc = subprocess.Popen([str(BIN / "maiactl"), "--controller", address, *args],
                                env=maiactl_env(token), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return cls(proc, Lines(proc.stdout), Lines(proc.stderr))  # type: ignore[arg-type]


def test_watches_and_a_wait_go_on_where_they_were_once_a_restarted_controller_answers(tmp_path: Path) -> None:
    """`get events --watch` (the events after the last one shown), `get tenants --watch` (the list
    again when it changed), and `wait` (its stream broken, it polls): each says the outage once
    and the return once on stderr; the wait meets its condition after the restart (exit 0)."""
    watches: list[Watch] = []
    try:
        with controller_process(tmp_path) as first:
            address, token = first.address, first.token
            assert first.ctl("apply", "-f", _tenant(tmp_path, "before"), "-f", _pending(tmp_path)).returncode == 0
            watches += [Watch.of(address, token, "get", "events", "--watch", "--interval", "0.2"),
                        Watch.of(address, token, "get", "tenants", "--watch", "--interval", "0.2"),
                        Watch.of(address, token, "wait", "deployment", "web", "-n", "before", "--for", "deleted",
                                 "--timeout", str(WAIT_S))]
            events, tenants, wait = watches
            events.out.until("tenant/before")
            tenants.out.until("before")
            wait.err.until("before/web: Pending")
        for watch in (events, tenants):  # the controller is gone: each watch says so once and polls on
            _said_gone(watch.err.until("(watch: "), "watch", address)
        said = wait.err.until("(wait: ")
        _said_gone(said, "wait", address)
        assert "; since " in said and "until --timeout (" in said, said
        with controller_process(tmp_path, listen=address) as second:
            assert second.ctl("apply", "-f", _tenant(tmp_path, "after")).returncode == 0
            events.out.until("tenant/after")
            tenants.out.until("after")
            assert "showing the events not shown yet" in events.err.until(f"the controller at {address} answers again")
            tenants.err.until(f"the controller at {address} answers again")
            wait.err.until(f"(wait: the controller at {address} answers again")
            assert second.ctl("delete", "web", "-n", "before").returncode == 0
            wait.out.until("deployment/before/web condition met (deleted)")
            assert wait.proc.wait(timeout=WAIT_S) == 0
        assert sum("tenant/before" in line for line in events.out.seen) == 1  # not shown again
        for watch in (events, tenants):
            assert watch.proc.poll() is None  # still watching
        for watch in watches:  # the outage and the return, each said once
            assert [line.startswith(("(watch: ", "(wait: ")) for line in watch.err.seen].count(True) == 2, watch.err.seen
    finally:
        for watch in watches:
            if watch.proc.poll() is None:
                watch.proc.terminate()
            watch.proc.wait(timeout=30)


def test_an_event_watch_keeps_the_output_it_was_asked_for(tmp_path: Path) -> None:
    """After the first print, `get events -w -o yaml` printed JSON lines and `-o name` table rows.
    Each goes on as it began: a YAML stream of one document an event, and event/ID lines."""
    watches: list[Watch] = []
    try:
        with controller_process(tmp_path) as running:
            assert running.ctl("apply", "-f", _tenant(tmp_path, "before")).returncode == 0
            watches += [Watch.of(running.address, running.token, "get", "events", "-w", "--interval", "0.2",
                                 "-o", output) for output in ("yaml", "name")]
            as_yaml, as_names = watches
            as_yaml.out.until("event: tenant.created")
            as_names.out.until("event/")
            newest = max(int(line.removeprefix("event/"))
                         for line in running.ctl("get", "events", "-o", "name").stdout.split())
            assert running.ctl("apply", "-f", _tenant(tmp_path, "after")).returncode == 0
            as_yaml.out.until("object: tenant/after")
            as_names.out.until(f"event/{newest + 1}")
        assert "---" in as_yaml.out.seen and not any(line.startswith("{") for line in as_yaml.out.seen)
        assert all(line.startswith("event/") for line in as_names.out.seen), as_names.out.seen
    finally:
        for watch in watches:
            if watch.proc.poll() is None:
                watch.proc.terminate()
            watch.proc.wait(timeout=30)


async def _delete_behind(url: str) -> int:
    """Two events recorded a month ago (ids after every shown one) and one of now, the two deleted
    by event retention as the controller's leader would, in one transaction (no poll sees them):
    the highest id deleted."""
    db = Database(url)
    try:
        async with db.unit_of_work() as uow:
            old = datetime.now(timezone.utc) - timedelta(days=30)
            await record_events(uow.session, [
                *(NewEvent(actor="test", kind="node.down", object_kind="node", object_id=f"gone-{i}", at=old)
                  for i in range(2)),
                NewEvent(actor="test", kind="node.up", object_kind="node", object_id="after-retention")])
            assert (await prune_events(uow.session, datetime.now(timezone.utc) - timedelta(days=1), 10)).count == 2
            through = await events_deleted_through(uow.session)
            await uow.commit()
        return through
    finally:
        await db.dispose()


def test_an_event_watch_told_that_retention_deleted_past_it_says_so_and_follows_on(tmp_path: Path) -> None:
    """Asked after an id retention had deleted past, ListEvents answers OUT_OF_RANGE: the watch
    says what was lost on stderr, once, and shows what comes after it (it used to be an error
    that ended the watch, and before the mark, a silent gap)."""
    with controller_process(tmp_path) as running:
        assert running.ctl("apply", "-f", _tenant(tmp_path, "before")).returncode == 0
        watch = Watch.of(running.address, running.token, "get", "events", "--watch", "--interval", "1")
        try:
            watch.out.until("tenant/before")
            through = asyncio.run(_delete_behind(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"))
            said = watch.err.until("(watch: ")
            assert said.endswith(f"up to {through} were deleted by the controller's event retention before they "
                                 f"were shown; following from {through})"), said
            watch.out.until("node/after-retention")
            assert not any("gone-" in line for line in watch.out.seen)
            assert watch.proc.poll() is None  # still watching
            assert [line.startswith("(watch: ") for line in watch.err.seen].count(True) == 1, watch.err.seen
        finally:
            watch.proc.terminate()
            watch.proc.wait(timeout=30)


def test_an_event_watch_whose_first_listing_reaches_past_what_retention_deleted_says_nothing_of_it(
        tmp_path: Path) -> None:
    """The events retention deleted before the watch began are older than its first listing's
    newest: nothing it promised to show is lost. Its first polls ask after the oldest event shown
    (an alarm or drain kept whatever its age sits below the mark), and said they were lost."""
    with controller_process(tmp_path) as running:
        assert running.ctl("apply", "-f", _tenant(tmp_path, "before")).returncode == 0
        asyncio.run(_delete_behind(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"))
        # The first listing: the tenant's event and the newest, the deleted ids between them.
        watch = Watch.of(running.address, running.token, "get", "events", "--watch", "--interval", "0.5",
                         "--limit", "2")
        try:
            watch.out.until("node/after-retention")
            assert running.ctl("apply", "-f", _tenant(tmp_path, "after")).returncode == 0
            watch.out.until("tenant/after")
            time.sleep(1.5)  # polls after it
            assert watch.proc.poll() is None
            assert not any(line.startswith("(watch: ") for line in watch.err.drained()), watch.err.seen
        finally:
            watch.proc.terminate()
            watch.proc.wait(timeout=30)

"""`maiactl get --watch` outlives a controller that goes away and comes back (a restart): the real
binaries, the controller stopped under a running watch and started again on the same address and
database; the watch says so on stderr and goes on where it was."""
from __future__ import annotations

import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cli_harness import BIN, controller_process, maiactl_env

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


@dataclass
class Watch:
    """A `maiactl ... --watch` process and what it wrote so far."""

    proc: subprocess.Popen[str]
    out: Lines
    err: Lines

    @classmethod
    def of(cls, address: str, token: str, *args: str) -> Watch:
        proc = subprocess.Popen([str(BIN / "maiactl"), "--controller", address, *args, "--watch", "--interval", "0.2"],
                                env=maiactl_env(token), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return cls(proc, Lines(proc.stdout), Lines(proc.stderr))  # type: ignore[arg-type]


def test_get_watches_go_on_where_they_were_once_a_restarted_controller_answers(tmp_path: Path) -> None:
    """`get events --watch` (the events after the last one shown) and `get tenants --watch` (the
    list again when it changed)."""
    watches: list[Watch] = []
    try:
        with controller_process(tmp_path) as first:
            address, token = first.address, first.token
            assert first.ctl("apply", "-f", _tenant(tmp_path, "before")).returncode == 0
            watches += [Watch.of(address, token, "get", "events"), Watch.of(address, token, "get", "tenants")]
            events, tenants = watches
            events.out.until("tenant/before")
            tenants.out.until("before")
        for watch in watches:  # the controller is gone: each watch says so once and polls on
            said = watch.err.until("(watch: ")
            assert said.startswith(f"(watch: UNAVAILABLE: cannot reach the controller at {address}"), said
        with controller_process(tmp_path, listen=address) as second:
            assert second.ctl("apply", "-f", _tenant(tmp_path, "after")).returncode == 0
            events.out.until("tenant/after")
            tenants.out.until("after")
            assert "showing the events after" in events.err.until(f"the controller at {address} answers again")
            tenants.err.until(f"the controller at {address} answers again")
        assert sum("tenant/before" in line for line in events.out.seen) == 1  # not shown again
        for watch in watches:
            assert watch.proc.poll() is None  # still watching
            assert sum("(watch: UNAVAILABLE" in line for line in watch.err.seen) == 1  # said once per outage
    finally:
        for watch in watches:
            watch.proc.terminate()
            watch.proc.wait(timeout=30)

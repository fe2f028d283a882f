"""The failed accelerators agents list in their heartbeats, handed to `usecases.faults` when they change.

Every heartbeat lists the node's failed accelerators (most often none). A stream's list is
compared with what that stream said before, and at its first heartbeat with what is stored
(`stored`: the nodes with failed accelerators, read once a term as leader, then kept by this
writer's own writes, the only ones while it leads); only a change costs a transaction. The
writes run one at a time on a task of their own: they are rare, and the heartbeat's reader must
not wait for one. A write that fails leaves the stream's list unknown, so its next heartbeat
hands it over again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from controller.agents.session import AgentSession
from controller.domain.values import AcceleratorFault
from controller.logs import one_line
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.usecases.faults import FaultsRecorded, record_faults

log = logging.getLogger("maia.agents")


def _by_index(faults: Sequence[AcceleratorFault]) -> dict[int, str]:
    return {f.index: f.reason for f in faults}


class FaultWriter:
    def __init__(self, db: Database, *, leading: Callable[[], bool],
                 on_recorded: Callable[[str, FaultsRecorded], None]) -> None:
        self._db = db
        self._leading = leading
        self._on_recorded = on_recorded
        # Node -> its failed accelerators as stored (only nodes with some); None: not read this term.
        self._stored: dict[str, dict[int, str]] | None = None
        self._due: dict[str, tuple[AgentSession, tuple[AcceleratorFault, ...], bool]] = {}
        self._task: asyncio.Task[None] | None = None

    def heard(self, session: AgentSession, faults: tuple[AcceleratorFault, ...]) -> None:
        """A heartbeat's list of the node's failed accelerators (cheap when unchanged: every beat)."""
        if session.faults == faults:
            return
        first = session.faults is None
        session.faults = faults
        if self._stored is not None and self._nothing_new(session.node_id, faults, first):
            return
        self._due[session.node_id] = (session, faults, first)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write_due(), name="accelerator-faults")

    def _nothing_new(self, node_id: str, faults: tuple[AcceleratorFault, ...], first: bool) -> bool:
        """A stream's first list, naming none, of a node with none stored (read this term): nothing
        to write. A stream's first list naming some is always handed over (what is stored here
        may be stale: the node deleted and registered again), as is any later change."""
        assert self._stored is not None
        return first and not faults and node_id not in self._stored

    async def settled(self) -> None:
        """Wait until the lists handed over so far are written (or given up)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def forget(self) -> None:
        """This controller no longer leads: what is stored is read again in its next term."""
        self._stored = None
        self._due.clear()

    async def _write_due(self) -> None:
        while self._due:
            node_id = next(iter(self._due))
            session, faults, first = self._due.pop(node_id)
            if not self._leading() or session.closed:
                continue
            try:
                if self._stored is None:
                    async with self._db.unit_of_work() as uow:
                        stored = await repo.failed_accelerators(uow.session)
                    self._stored = {n: _by_index(f) for n, f in stored.items()}
                if self._nothing_new(node_id, faults, first):
                    continue
                async with self._db.unit_of_work() as uow:
                    done = await record_faults(uow, node_id, session.session_id, faults)
            except LeaseLost:
                if self._leading():  # refused as opened in a term since lost (`LeaderElection.opened`): again
                    session.faults, self._stored = None, None
                    continue
                self.forget()
                return
            except Exception as exc:  # the database: the stream's next heartbeat hands its list over again
                session.faults = None
                log.warning("node %s: could not record its failed accelerators: %s", node_id, one_line(exc))
                continue
            if done is None or self._stored is None:  # not this stream's to say, or the lead lost meanwhile
                self._stored = None  # read again when needed
                continue
            if done.ignored:
                log.warning("node %s: its agent says accelerators %s failed, which it does not have: ignored",
                            node_id, list(done.ignored))
            kept = {f.index: f.reason for f in faults if f.index not in done.ignored}
            if kept:
                self._stored[node_id] = kept
            else:
                self._stored.pop(node_id, None)
            if done.changed:
                log.warning("node %s: accelerators failed %s, recovered %s; %d shard(s) released", node_id,
                            list(done.failed), list(done.recovered), len(done.released))
                self._on_recorded(node_id, done)

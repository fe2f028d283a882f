"""Live agent sessions: one Connect stream per node, assignment pushes, liveness, batched reports.

The hub is the only place that knows which agents are connected right now. It
- accepts a stream after its Hello matched the node's current session (a newer stream for the
  same node supersedes the older one),
- sends the node's complete AssignmentSet when the stream opens and whenever `notify` says it
  changed (coalesced: an agent gets the latest set, never a backlog),
- buffers heartbeats and shard reports and writes them in one transaction per flush interval
  (not one commit per heartbeat per node),
- marks a node down when its stream ends or its heartbeats stop for `heartbeat_timeout_s`, and
  wakes the reconciler so that node's shards are placed again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from controller.store import repositories as repo
from controller.store.db import Database
from controller.usecases import agents as agent_cases
from controller.usecases.agents import NodeBeat
from controller.usecases.domain import AssignmentSet, HeartbeatReport, ShardReport

log = logging.getLogger("maia.agents")

AgentInbound = HeartbeatReport | ShardReport


@dataclass(eq=False)
class AgentSession:
    node_id: str
    session_id: str
    last_seen: float = field(default_factory=time.monotonic)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    mark_down_on_close: bool = True

    def close(self, reason: str, *, mark_down: bool = True) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.mark_down_on_close = mark_down
            self.closed.set()


class AgentHub:
    def __init__(
        self, db: Database, *, heartbeat_timeout_s: float,
        on_liveness_change: Callable[[], None],
        on_deployments_changed: Callable[[set[str]], Awaitable[None]],
        flush_interval_s: float = 0.2,
    ) -> None:
        self._db = db
        self._timeout = heartbeat_timeout_s
        self._on_liveness_change = on_liveness_change
        self._on_deployments_changed = on_deployments_changed
        self._flush_interval = flush_interval_s
        self._sessions: dict[str, AgentSession] = {}
        self._beats: dict[str, NodeBeat] = {}
        self._reports: list[tuple[str, ShardReport]] = []
        self._started = time.monotonic()
        self._stopping = False

    # --- what others ask ---------------------------------------------------------------------
    def connected(self) -> frozenset[str]:
        return frozenset(self._sessions)

    def notify(self, node_ids: Iterable[str]) -> None:
        """The assignment sets of these nodes changed: push them to their agents."""
        for node_id in node_ids:
            session = self._sessions.get(node_id)
            if session is not None:
                session.dirty.set()

    # --- one stream --------------------------------------------------------------------------
    async def converse(
        self, node_id: str, session_id: str, inbound: AsyncIterator[AgentInbound],
    ) -> AsyncIterator[AssignmentSet]:
        """Serve one Connect stream after its Hello: yields the AssignmentSets to send."""
        async with self._db.unit_of_work() as uow:
            was_down = await agent_cases.hello(uow, node_id, session_id, datetime.now(timezone.utc))
        session = AgentSession(node_id, session_id)
        previous = self._sessions.get(node_id)
        if previous is not None:
            previous.close("superseded by a newer session", mark_down=False)
        self._sessions[node_id] = session
        session.dirty.set()  # the full set, right away
        log.info("agent connected node=%s session=%s was_down=%s", node_id, session_id, was_down)
        if was_down:
            self._on_liveness_change()
        reader = asyncio.create_task(self._read(session, inbound), name=f"agent-read-{node_id}")
        try:
            while True:
                await _first_of(session.dirty, session.closed)
                if session.closed.is_set():
                    break
                session.dirty.clear()
                async with self._db.unit_of_work() as uow:
                    current = await repo.assignment_set(uow.session, node_id)
                if current is not None:
                    yield current
        finally:
            reader.cancel()
            if self._sessions.get(node_id) is session:
                del self._sessions[node_id]
            if not session.close_reason:
                session.close("stream cancelled")
            log.info("agent disconnected node=%s reason=%s", node_id, session.close_reason)
            if session.mark_down_on_close and not self._stopping:
                await self._mark_down(node_id, session_id, session.close_reason)

    async def _read(self, session: AgentSession, inbound: AsyncIterator[AgentInbound]) -> None:
        try:
            async for message in inbound:
                session.last_seen = time.monotonic()
                if isinstance(message, HeartbeatReport):
                    self._beats[session.node_id] = NodeBeat(datetime.now(timezone.utc), message.power_draw_w)
                    self._reports.extend((session.node_id, r) for r in message.shards)
                else:
                    self._reports.append((session.node_id, message))
            session.close("stream ended by the agent")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken stream is the agent going away
            session.close(f"stream failed: {type(exc).__name__}")

    async def _mark_down(self, node_id: str, session_id: str | None, why: str) -> None:
        try:
            async with self._db.unit_of_work() as uow:
                changed = await agent_cases.mark_down(uow, node_id, session_id=session_id, why=why)
        except Exception:
            log.exception("could not mark node %s down", node_id)
            return
        if changed:
            log.warning("node down node=%s why=%s", node_id, why)
            self._on_liveness_change()

    # --- background work ---------------------------------------------------------------------
    async def run(self) -> None:
        """Flush reports and watch liveness until cancelled."""
        check_every = min(1.0, self._timeout / 4)
        next_check = time.monotonic()
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + check_every
                await self._expire()

    async def flush(self) -> None:
        if not self._beats and not self._reports:
            return
        beats, self._beats = self._beats, {}
        reports, self._reports = self._reports, []
        try:
            async with self._db.unit_of_work() as uow:
                changed = await agent_cases.flush_reports(uow, beats, reports)
        except Exception:
            log.exception("could not write %d heartbeats and %d shard reports", len(beats), len(reports))
            return
        if changed:
            await self._on_deployments_changed(changed)

    async def _expire(self) -> None:
        now = time.monotonic()
        for session in list(self._sessions.values()):
            if now - session.last_seen > self._timeout:
                session.close(f"no heartbeat for {now - session.last_seen:.1f}s (timeout {self._timeout:g}s)")
        if now - self._started <= self._timeout:
            return  # after a restart, give agents one timeout to come back
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self._timeout)
        try:
            async with self._db.unit_of_work() as uow:
                stale = await agent_cases.stale_up_nodes(uow, self._sessions, cutoff)
        except Exception:
            log.exception("liveness check failed")
            return
        for node_id in stale:
            await self._mark_down(node_id, None, "no agent stream and no heartbeat within the timeout")

    def close_all(self) -> None:
        """Shutdown: end every stream without marking nodes down (agents reconnect to the next controller)."""
        self._stopping = True
        for session in list(self._sessions.values()):
            session.close("controller shutting down", mark_down=False)


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()

"""What agents say on their streams: read, checked, buffered, and written in batched flushes.

Why a module of its own: the inbound half of a stream (reading it, the checks and the rate limit
that end it, refusing reports of shards the node was not given) and the batching of what it says
(heartbeats and shard reports written per flush interval in chunks, a failed chunk retried node by
node, a live stream's unchanged heartbeats written only now and then) are one concern with state of
its own: the buffers between two flushes. `ReportBuffer` owns that state; the hub hands it each
stream to read (`start_reading`), asks it to `flush`, and tells it when a stream ended
(`stream_ended`). It reads the hub's open streams (a live mapping it never changes). The rules it
keeps are described in `controller/agents/__init__.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from controller import limits
from controller.agents.session import AgentInbound, AgentSession, HubObserver, Message, ShardKey
from controller.aio import pushed
from controller.errors import MaiaError
from controller.logs import one_line
from controller.ratelimit import Sampler, rate_limited
from controller.store.db import Database, database_failed
from controller.store.lease import LeaseLost
from controller.usecases import agents as agent_cases
from controller.usecases.agents import NodeBeat, RefusedReports
from controller.domain.liveness import LivenessPolicy
from controller.domain.values import AcceleratorFault, DeploymentView, HeartbeatReport, ShardReport, deployment_key

log = logging.getLogger("maia.agents")

# Heartbeats a flush transaction writes at most besides its shard reports (`limits.FLUSH_CHUNK`):
# one row each in one executemany, where a report costs its deployment's read and write; each
# transaction more waits for its own turn at SQLite's writer (behind submits and passes).
BEATS_PER_CHUNK = 4 * limits.FLUSH_CHUNK
FULL_REPORTS_EVERY_S = 60.0  # a stream's heartbeats write every shard's state at least this often
REFUSED_SAMPLES = 5
# The least pause a stream ended for flooding is told: the time one report takes to refill was
# 1 ms at the default rate, and an agent that came straight back resent its flood.
FLOOD_RETRY_MIN_S = 1.0
# A node's refused reports naming only shards already recorded in this long are held (counted) to
# the window's end: an agent that keeps repeating a report of a shard it was taken (a STOPPED one
# it never forgets) wrote an event and an audit entry at every flush, for ever.
REFUSED_REPEAT_S = 60.0


class ReportBuffer:
    """The heartbeats, shard reports and refusals agents sent since the last flush, and the flush
    that writes them."""

    def __init__(
        self, db: Database, sessions: Mapping[str, AgentSession], *, observer: HubObserver,
        on_deployments_changed: Callable[[Mapping[str, DeploymentView]], Awaitable[None]],
        heartbeat_timeout_s: float, longest_silence_timeout_s: Callable[[], float],
        contact_write_every_s: float | None,
        on_failed_accelerators: Callable[[AgentSession, tuple[AcceleratorFault, ...]], None] = lambda s, f: None,
    ) -> None:
        self._db = db
        # Each heartbeat's list of failed accelerators (`FaultWriter.heard`: written when it changes).
        self._on_failed_accelerators = on_failed_accelerators
        # A database outage fails every flush: a line at most every 10 s says so, with how many did not.
        self._outage_log = Sampler(per_minute=6, burst=1)
        self._sessions = sessions  # the hub's open streams, read only
        self._observer = observer
        self._on_deployments_changed = on_deployments_changed
        self._longest_silence_timeout_s = longest_silence_timeout_s
        self._beats: dict[str, NodeBeat] = {}
        # The last heartbeat written per node. While a node's stream lives its liveness is the stream
        # (in memory: `last_seen`), so a beat that changes nothing but the time is written at most
        # every `contact_write_every_s`; a changed power draw, or a stream gone, at the next flush.
        self._written_beats: dict[str, NodeBeat] = {}
        self._held_beats: dict[str, NodeBeat] = {}
        # None: `LivenessPolicy.contact_write_every_for` the longest silence timeout told (`_due_beats`).
        self._beat_write_every = None if contact_write_every_s is None else timedelta(seconds=contact_write_every_s)
        self._policy = LivenessPolicy(heartbeat_timeout_s=heartbeat_timeout_s)
        self._reports: list[tuple[str, ShardReport]] = []
        self._received: list[float] = []  # when each of `_reports` arrived (the `flush_wait` stage)
        self._refused: dict[str, RefusedReports] = {}
        # Per node: when its refusals' window began and the shards recorded in it (`_due_refusals`).
        self._refused_told: dict[str, tuple[float, frozenset[ShardKey]]] = {}

    # --- reading a stream --------------------------------------------------------------------
    def start_reading(self, session: AgentSession, inbound: AsyncIterator[Message],
                      convert: Callable[[Message], AgentInbound | None]) -> Callable[[], None]:
        """Take the stream's messages from now on; returns what stops it. A stream that pushes
        them has each taken in the call that delivers it; another is read by a task of its own.
        Once the stream is closed (its credential revoked or expired, its node deleted...) nothing
        more is taken, though its end is still on its way (its handler's turn on the loop).
        The stream's first heartbeat is written whatever the last one written: the node's row may
        have been written since by others (registered again after a deletion: a power draw of 0 W;
        another leader's writes), so the last one written here says nothing of what is stored."""
        self._written_beats.pop(session.node_id, None)
        def take(message: Message) -> None:
            if session.closed:
                return
            report = convert(message)
            if report is not None:
                session.last_seen = time.monotonic()
                self.accept(session, report)

        source = pushed(inbound)
        if source is not None:
            return source.push_to(take, lambda error: self._read_ended(session, error))
        return asyncio.create_task(self._read(session, inbound, take), name=f"agent-read-{session.node_id}").cancel

    async def _read(self, session: AgentSession, inbound: AsyncIterator[Message],
                    take: Callable[[Message], None]) -> None:
        try:
            async for message in inbound:
                take(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._read_ended(session, exc)
        else:
            self._read_ended(session, None)

    @staticmethod
    def _read_ended(session: AgentSession, error: BaseException | None) -> None:
        """A stream's reading ended: the agent ended it (`error` None), or with `error`."""
        if error is None:
            session.close("stream ended by the agent")
        elif isinstance(error, MaiaError):  # bad input, a malformed message, too many reports: end the stream with it
            log.warning("agent stream refused node=%s: %s", session.node_id, error.message)
            session.fail(error)
        else:  # a broken stream is the agent going away
            session.close(f"stream failed: {type(error).__name__}")

    def accept(self, session: AgentSession, message: AgentInbound) -> None:
        """Check one inbound message and buffer what it says (raises to end the stream)."""
        node_id = session.node_id
        now = time.monotonic()
        wait = session.reports.take(now)
        if wait:
            raise rate_limited(f"node {node_id} sent more than {session.reports.rate:g} reports a second "
                               f"(burst {session.reports.burst})", max(wait, FLOOD_RETRY_MIN_S))
        beat = isinstance(message, HeartbeatReport)
        if beat:
            agent_cases.validate_heartbeat_header(node_id, message)
            full = now - session.said_all_at >= FULL_REPORTS_EVERY_S
            if message.shards_omitted:  # unchanged since the full state of that version, if this stream holds it
                shards: tuple[ShardReport, ...] = ()
                if full or session.state_version is None or message.shard_state_version != session.state_version:
                    session.want_state()
            elif full:
                shards = message.shards
            else:  # the shards whose state did not change since the last heartbeat are written already
                shards = tuple(r for r in message.shards if not session.unchanged(r))
        else:
            shards = (message,)
        for report in shards:  # all checked before any is used: a bad message leaves nothing behind
            agent_cases.validate_report(node_id, report)
        if session.unacknowledged:
            # Any word of a shard answers it: a heartbeat's unchanged repeats too (not written again).
            for report in message.shards if beat else shards:
                tenant = session.given_tenant(report)
                if tenant is not None:
                    session.acknowledged(tenant, report)
        refused = False
        for report in shards:
            tenant = session.given_tenant(report)
            if tenant is not None:
                session.say(report)
                self._reports.append((node_id, report if report.tenant == tenant else replace(report, tenant=tenant)))
                self._received.append(now)
                started = session.started(report, now)
                if started is not None:
                    self._observer.shard_start_stage("agent", (started,))
            else:
                refused = True
                named = deployment_key(report.tenant, report.deployment) if report.tenant else report.deployment
                self._refuse(node_id, (named, report.replica, report.shard))
        if beat:
            self._on_failed_accelerators(session, message.failed_accelerators)
            session.beat_at = datetime.now(timezone.utc)
            self._beats[node_id] = NodeBeat(session.beat_at, message.power_draw_w)
            if not message.shards_omitted:
                # A state naming shards this node was not given is judged again (they may be given by then).
                session.state_version = None if refused else message.shard_state_version or None
                session.state_asked = False
                if full:
                    session.said_all_at = now

    def not_acknowledged(self, node_id: str, reports: list[ShardReport]) -> None:
        """The shards `node_id`'s agent never took up (`AgentSession.overdue`): written FAILED at
        the next flush, as if it said so (a placement moved or placed anew meanwhile is left
        alone: the report answers an older generation, or another node)."""
        now = time.monotonic()
        self._reports.extend((node_id, report) for report in reports)
        self._received.extend(now for _ in reports)

    def _refuse(self, node_id: str, key: ShardKey) -> None:
        before = self._refused.get(node_id, RefusedReports(0, ()))
        told = self._told(node_id, time.monotonic())
        fresh = key not in told
        samples = before.samples
        if key not in samples:
            if len(samples) < REFUSED_SAMPLES:
                samples = (*samples, key)
            elif fresh:  # a shard not recorded yet is named, in the place of one that was
                at = next((i for i in reversed(range(len(samples))) if samples[i] in told), None)
                if at is not None:
                    samples = (*samples[:at], *samples[at + 1:], key)
        self._refused[node_id] = RefusedReports(before.count + 1, samples, before.fresh or fresh)

    def _told(self, node_id: str, now: float) -> frozenset[ShardKey]:
        """The shards recorded of `node_id` in its window, if the window still runs."""
        began, told = self._refused_told.get(node_id, (-REFUSED_REPEAT_S, frozenset()))
        return told if now - began < REFUSED_REPEAT_S else frozenset()

    def _due_refusals(self) -> dict[str, RefusedReports]:
        """The nodes' refusals to record now: at once where one names a shard not recorded in its
        node's window (`REFUSED_REPEAT_S`), else when the window ends, the reports held till then
        counted in (`flush` leaves the others to come)."""
        now = time.monotonic()
        due: dict[str, RefusedReports] = {}
        for node_id, refusal in self._refused.items():
            began, told = self._refused_told.get(node_id, (-REFUSED_REPEAT_S, frozenset()))
            if now - began >= REFUSED_REPEAT_S:
                began, told = now, frozenset()
            elif not refusal.fresh:
                continue
            due[node_id] = refusal
            self._refused_told[node_id] = (began, told | set(refusal.samples))
        for node_id in due:
            del self._refused[node_id]
        return due

    def stream_ended(self, node_id: str) -> None:
        """The node's stream ended: its last heartbeat, if held back (`_due_beats`), is written at
        the next flush."""
        held = self._held_beats.pop(node_id, None)
        if held is not None:  # the node's last heartbeat, not written yet: at the next flush
            self._beats.setdefault(node_id, held)

    # --- the flush ---------------------------------------------------------------------------
    async def flush(self) -> None:
        beats = self._due_beats()
        refused = self._due_refusals()
        if not beats and not self._reports and not refused:
            return
        batch = _Batch(beats, self._reports, refused)
        received: dict[str, list[float]] = {}  # when each node's reports arrived
        for (node_id, _), at in zip(self._reports, self._received):
            received.setdefault(node_id, []).append(at)
        self._reports, self._received = [], []
        began = time.monotonic()
        self._observer.shard_start_stage("flush_wait", (began - at for times in received.values() for at in times))
        # The chunks with shard reports first, each published once committed (a later chunk's view
        # of a deployment is newer): a RUNNING report is not held back by the heartbeats of nodes
        # that said nothing else, each chunk a transaction waiting for its turn at the writer.
        for chunk in batch.chunks(limits.FLUSH_CHUNK):
            changed = await self._flush_chunk(chunk)
            written = time.monotonic() - began
            self._observer.shard_start_stage(
                "flush_write", (written for node_id in {n for n, _ in chunk.reports} for _ in received[node_id]))
            if changed:
                await self._on_deployments_changed(changed)

    def _due_beats(self) -> dict[str, NodeBeat]:
        """The buffered heartbeats to write now; those that changed only the time while the last
        written one is recent and their stream lives are kept aside (`_held_beats`), written only
        if the stream ends before a due one comes."""
        due: dict[str, NodeBeat] = {}
        every = self._beat_write_every
        if every is None:
            every = timedelta(seconds=self._policy.contact_write_every_for(self._longest_silence_timeout_s()))
        for node_id, beat in self._beats.items():
            last = self._written_beats.get(node_id)
            session = self._sessions.get(node_id)
            if (last is None or beat.power_draw_w != last.power_draw_w or beat.at - last.at >= every
                    or session is None or session.closed):
                due[node_id] = self._written_beats[node_id] = beat
                self._held_beats.pop(node_id, None)
            else:
                self._held_beats[node_id] = beat
        self._beats = {}
        return due

    async def _flush_chunk(self, chunk: _Batch) -> dict[str, DeploymentView]:
        """Write one chunk; if it fails, each of its nodes alone (only the bad node's data is lost).
        Returns the views of the deployments whose shard phases it changed, as committed."""
        views: dict[str, DeploymentView] = {}
        try:
            async with self._db.unit_of_work() as uow:
                await agent_cases.flush_reports(uow, chunk.beats, chunk.reports, chunk.refused, views=views)
            self._observer.heartbeats_written(len(chunk.beats))
            return views
        except LeaseLost:  # deposed: these agents report to the new leader from now on
            return {}
        except Exception as exc:
            nodes = chunk.nodes()
            if database_failed(exc):
                # Not this chunk's doing: node by node would fail alike (a traceback a node, each
                # trying the database again). Their agents' next heartbeats write it all again.
                self._forget_states(nodes)
                left_out = self._outage_log.sample()
                if left_out is not None:
                    log.warning("could not write the heartbeats and %d shard reports of %d nodes (%s): the database "
                                "failed: %s%s", len(chunk.reports), len(nodes), _named(nodes),
                                one_line(exc), f" (flushes failed since the last line: {left_out})" if left_out else "")
                return {}
            if len(nodes) == 1:
                log.exception("could not write the heartbeat and %d shard reports of node %s",
                              len(chunk.reports), nodes[0])
                self._forget_states(nodes)
                return {}
            log.warning("could not write a chunk of %d nodes; writing them one by one", len(nodes))
            for node_id in nodes:
                views.update(await self._flush_chunk(chunk.only(node_id)))
            return views

    def _forget_states(self, nodes: list[str]) -> None:
        """What these nodes reported was not written: their next heartbeats write every shard's state
        again, and the heartbeat itself (its power draw and time: one that changed nothing since
        the beat not written would else be held back as written, for a contact write's cadence)."""
        for node_id in nodes:
            self._written_beats.pop(node_id, None)
            session = self._sessions.get(node_id)
            if session is not None:
                session.forget_state()


def _named(nodes: list[str], shown: int = 3) -> str:
    return ", ".join(nodes[:shown]) + (f" and {len(nodes) - shown} more" if len(nodes) > shown else "")


@dataclass
class _Batch:
    """Buffered heartbeats, shard reports and refusals, split by node into chunks."""

    beats: dict[str, NodeBeat]
    reports: list[tuple[str, ShardReport]]
    refused: dict[str, RefusedReports]

    def nodes(self) -> list[str]:
        """The nodes with shard reports or refusals, then those with only a heartbeat (each in id order)."""
        speaking = {*(n for n, _ in self.reports), *self.refused}
        return [*sorted(speaking), *sorted(set(self.beats) - speaking)]

    def only(self, node_id: str) -> _Batch:
        return _Batch({k: v for k, v in self.beats.items() if k == node_id},
                      [(n, r) for n, r in self.reports if n == node_id],
                      {k: v for k, v in self.refused.items() if k == node_id})

    def chunks(self, size: int, beats_size: int = BEATS_PER_CHUNK) -> list[_Batch]:
        """Whole nodes per chunk (one node's reports are never split), in the order of `nodes` (the
        heartbeat-only nodes last), each with at most about `size` shard reports and refusals and
        `beats_size` heartbeats."""
        by_node: dict[str, list[tuple[str, ShardReport]]] = {}
        for node_id, report in self.reports:
            by_node.setdefault(node_id, []).append((node_id, report))
        chunks: list[_Batch] = []
        current = _Batch({}, [], {})
        items = beats = 0
        for node_id in self.nodes():
            said = len(by_node.get(node_id, ())) + (node_id in self.refused)
            beat = int(node_id in self.beats)
            if (items or beats) and (items + said > size or beats + beat > beats_size):
                chunks.append(current)
                current, items, beats = _Batch({}, [], {}), 0, 0
            if beat:
                current.beats[node_id] = self.beats[node_id]
            if node_id in self.refused:
                current.refused[node_id] = self.refused[node_id]
            current.reports.extend(by_node.get(node_id, ()))
            items, beats = items + said, beats + beat
        if items or beats:
            chunks.append(current)
        return chunks


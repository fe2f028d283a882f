"""`AgentHub`: the live agent streams of this controller, and what opens, judges and ends them.

Why a module of its own: the hub is the one object the API and the application wire (`api/deps.py`,
`api/server.py`); it holds the open streams and runs each one's conversation (`converse`: Hello,
the pusher of assignment sets, the stream's end and the node's suspect mark), the batched reads of
assignment sets, liveness expiry and the credential checks. The Registers and Hellos are written by
its `Joins` (`joins.py`); what a stream's agent says is read, checked, buffered and written by its
`ReportBuffer` (`reports.py`); the intervals it tells agents are kept by its `HeartbeatIntervals`
(`pacing.py`); the per-stream state is `AgentSession` (`session.py`). The whole design is described
in `controller/agents/__init__.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

from controller import limits
from controller.admission import AdmissionGate, agent_admission_gate
from controller.agents.joins import Joins, shared_failure
from controller.agents.faults import FaultWriter
from controller.agents.pacing import HeartbeatIntervals
from controller.agents.reports import ReportBuffer
from controller.agents.session import (
    AgentInbound, AgentOutbound, AgentSession, HeartbeatPolicy, HubObserver, Message, ShardStateRequest, _NoObserver,
)
from controller.errors import Conflict, InvalidArgument, MaiaError, NotFound, Unavailable
from controller.groupcommit import GroupCommit
from controller.ratelimit import TokenBucket
from controller.identity import Principal
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.tokenstreams import ExpiryTimer
from controller.usecases import agents as agent_cases
from controller.usecases.faults import FaultsRecorded
from controller.domain.liveness import FlapDamper
from controller.domain.values import AssignmentSet, DeploymentView, NodeInfo

log = logging.getLogger("maia.agents")


def _as_is(message: Any) -> Any:
    """`converse`'s default `convert`: the inbound stream says reports already."""
    return message


ASSIGNMENT_READ_BATCH_MAX = 2048  # nodes whose sets one batched read fetches
EXPIRE_SLICE = 2048  # streams one step of the silence check looks at (`AgentHub._expire`)


NODE_DELETED = "the node was deleted by an administrator"  # why its stream ended (the log's)


class AgentHub:
    def __init__(
        self, db: Database, *, heartbeat_timeout_s: float,
        on_liveness_change: Callable[[], None],
        on_deployments_changed: Callable[[Mapping[str, DeploymentView]], Awaitable[None]],
        flush_interval_s: float = 0.2, reports_per_second: float = limits.REPORTS_PER_SECOND,
        reports_burst: int = limits.REPORTS_BURST, damper: FlapDamper | None = None,
        leading: Callable[[], bool] = lambda: True, admission: AdmissionGate | None = None,
        max_heartbeats_per_second: float = 0.0, observer: HubObserver | None = None,
        contact_write_every_s: float | None = None, revoked: Callable[[str], bool] = lambda token_id: False,
        ack_timeout_s: float = 0.0,
    ) -> None:
        self._db = db
        # A shard a set named that its agent says nothing of for this long fails (0: never; `_expire`).
        self._ack_timeout_s = ack_timeout_s
        # Whether a token was revoked lately (`TokenStreams.revoked_lately`): a stream authenticated
        # just before its credential's revocation, and opened just after, ends as it opens.
        self._revoked = revoked
        self._observer = observer or _NoObserver()
        # Registers and hellos (write transactions) of a join storm: bounded, the rest told when to retry.
        self.admission = admission or agent_admission_gate()
        self._leading = leading
        self._timeout = heartbeat_timeout_s
        self._on_liveness_change = on_liveness_change
        self._flush_interval = flush_interval_s
        self._report_rate = reports_per_second
        self._report_burst = reports_burst
        self._sessions: dict[str, AgentSession] = {}
        # The nodes whose Hello is being written (a stream opening), with how many: `greeting`.
        self._greeting: dict[str, int] = {}
        # The nodes whose stream ended on this leader's watch (none open now), with the last time
        # their agent was heard from: what the node lifecycle judges them by (`released`).
        self._released: dict[str, datetime] = {}
        self._streams_changed = 0  # streams opened and ended here (`streams_changed`)
        self._damper = damper or FlapDamper()
        # The intervals told to agents, and the silence each stream is judged by.
        self._intervals = HeartbeatIntervals(self._sessions, heartbeat_timeout_s=heartbeat_timeout_s,
                                             max_heartbeats_per_second=max_heartbeats_per_second)
        # The failed accelerators the streams' agents list, written when a list changes.
        self._faults = FaultWriter(db, leading=leading, on_recorded=self._faults_recorded)
        # What the streams' agents say, buffered until a flush writes it.
        self._buffer = ReportBuffer(
            db, self._sessions, observer=self._observer, on_deployments_changed=on_deployments_changed,
            heartbeat_timeout_s=heartbeat_timeout_s, longest_silence_timeout_s=self.longest_silence_timeout_s,
            contact_write_every_s=contact_write_every_s, on_failed_accelerators=self._faults.heard)
        # The Registers and Hellos, committed in batches behind the admission gate; a refused
        # Register is told when to come back (`pacer`).
        self._joins = Joins(db, self.admission, self._intervals, held_by_live_agent=self.holds_live_session)
        self.pacer = self._joins.pacer
        # The sets of the nodes a commit changed are read together: one read for all of them.
        self._assignment_reads: GroupCommit[str, _Read] = GroupCommit(
            "agent-assignment-reads", self._read_assignment_sets, batch_max=ASSIGNMENT_READ_BATCH_MAX,
            shared_failure=shared_failure)
        self._stopping = False
        self._silent: set[AgentSession] = set()  # the streams found silent at the last check (`_expire`)
        # Suspect marks under way (`_mark_suspect`): held here so that one outlives the stream's
        # task, which gRPC cancels when the connection under it died.
        self._marking: set[asyncio.Task[None]] = set()

    # --- what others ask ---------------------------------------------------------------------
    def connected(self) -> Set[str]:
        """The nodes whose agent holds a stream to this controller now: a live read-only view, not a
        copy (at 16,384 nodes a copy per call cost ~0.3 ms; most callers test a few ids or take its
        size). It changes as streams open and end: a caller that needs one moment's set across an
        await copies it then."""
        return self._sessions.keys()

    def greeting(self) -> Set[str]:
        """The nodes whose Hello is being written (their stream opening): a live read-only view, as
        `connected`. Not connected yet, and their stored contact may be old (a new leader's nodes
        coming over); their Hello writes their health, and a stream holds them once it is written."""
        return self._greeting.keys()

    @contextmanager
    def _greeted(self, node_id: str) -> Iterator[None]:
        """`node_id` is in `greeting` while this block (its Hello's write) runs."""
        self._greeting[node_id] = self._greeting.get(node_id, 0) + 1
        try:
            yield
        finally:
            left = self._greeting.pop(node_id) - 1
            if left:
                self._greeting[node_id] = left

    def restate(self, node_ids: Iterable[str]) -> None:
        """The live streams of these nodes write every shard's state with their next heartbeat
        (what their agents said is not what is stored any more: the node lifecycle marked their
        shards UNKNOWN); nodes without a stream here are passed over."""
        for node_id in node_ids:
            session = self._sessions.get(node_id)
            if session is not None:
                session.forget_state()
                session.want_state()

    def streams_changed(self) -> int:
        """How many times a stream opened or ended here (a node connected, or its stream ended and
        it was released): while it stays, no node's liveness changed through this hub (the node
        lifecycle reads no node then)."""
        return self._streams_changed

    def released(self) -> dict[str, datetime]:
        """The nodes whose stream ended while this controller led and that hold none now, with when
        their agent was last heard from (its stored time may be older: written only every
        `contact_write_every_s` while the stream lived; or newer: a Hello on another controller)."""
        return dict(self._released)

    def last_heard(self) -> dict[str, datetime]:
        """When each node this controller holds or held a stream of last heartbeated (or, for a
        stream that ended, was last heard from): later than the stored time while its stream lives."""
        return {**self._released, **{node_id: session.beat_at for node_id, session in self._sessions.items()
                                     if session.beat_at is not None}}

    def heard_from(self, node_id: str) -> datetime | None:
        """`last_heard` of one node (None: not heard from on a stream to this controller)."""
        session = self._sessions.get(node_id)
        return session.beat_at if session is not None else self._released.get(node_id)

    def holds_live_session(self, node_id: str) -> bool:
        """A stream holds the node and was heard from within its silence timeout."""
        session = self._sessions.get(node_id)
        return session is not None and time.monotonic() - session.last_seen <= session.timeout_s

    def longest_silence_timeout_s(self) -> float:
        """The longest silence timeout of an interval this controller told an agent (the heartbeat
        timeout at least): how stale a live stream's stored last contact may be is counted in it."""
        return self._intervals.longest_silence_timeout_s()

    # --- a stream's session, and what changes or ends streams ------------------------------
    def _judge(self, node_id: str, session_id: str, stated_ms: int, credential: str) -> AgentSession:
        """The session of a stream whose Hello was accepted, judged by `HeartbeatIntervals.judged`;
        an agent that stated a longer interval than that is told it (`HeartbeatPolicy`).
        `credential`: the id of the token the stream was authenticated with."""
        told_ms = self._intervals.judged(node_id, stated_ms)
        return AgentSession(node_id, session_id, told_ms, self._intervals.silence_timeout_s(told_ms),
                            credential=credential, reports=TokenBucket(self._report_rate, self._report_burst),
                            tell_due=stated_ms > told_ms)

    def notify(self, node_ids: Iterable[str]) -> None:
        """The assignment sets of these nodes changed: push them to their agents."""
        for node_id in node_ids:
            session = self._sessions.get(node_id)
            if session is not None:
                session.push_set()

    def follow(self, reason: str, told: MaiaError | None = None) -> None:
        """This controller lost the lead: end every stream (the agents go to the new leader).
        `told`: what their agents are told, as a follower answers an agent (`NotLeader`: the new
        leader's address in `maia-leader`, when known); by default UNAVAILABLE with no address."""
        told = told or Unavailable(f"this controller no longer leads ({reason}); connect to the leader")
        for session in list(self._sessions.values()):
            session.close(f"this controller no longer leads ({reason})", mark_down=False, told=told)
        self._released.clear()  # the next leader judges these nodes
        self._faults.forget()

    def _faults_recorded(self, node_id: str, recorded: FaultsRecorded) -> None:
        """A node's failed accelerators changed (`FaultWriter`): its set lost the shards released,
        and the reconciler places them again and keeps new ones off the failed accelerators."""
        if recorded.released:
            self.notify([node_id])
        self._on_liveness_change()

    def revoke(self, node_id: str, reason: str) -> None:
        """End the node's stream (if any) with UNAUTHENTICATED: the credential it connected with
        was revoked (`AgentSession.refuse_credential`)."""
        session = self._sessions.get(node_id)
        if session is not None:
            session.refuse_credential(reason)

    def stream_credentials(self) -> set[str]:
        """The ids of the tokens the open streams here were authenticated with
        (`--insecure-no-auth`'s streams have none)."""
        return {session.credential for session in self._sessions.values()
                if session.credential and not session.closed}

    def nodes_connected_with(self, token_ids: Collection[str]) -> set[str]:
        """The nodes whose open stream here was authenticated with one of these tokens."""
        token_ids = set(token_ids)
        return {node_id for node_id, session in self._sessions.items()
                if session.credential in token_ids and not session.closed}

    def revoke_credentials(self, token_ids: Collection[str], *, deleted: Collection[str] = ()) -> None:
        """End the open streams that connected with these tokens (revoked: here, or on another
        controller, which told this one: a node's agent may have its stream here and its
        credential reset through another controller) UNAUTHENTICATED, as `revoke`; a node in
        `deleted` (the revocation was its deletion's) as its deletion ends it (`NODE_DELETED`)."""
        for node_id in self.nodes_connected_with(token_ids):
            if node_id in deleted:
                self.disconnect(node_id, NODE_DELETED)
            else:
                self.revoke(node_id, f"the credential of node {node_id} was revoked; register again")

    def disconnect(self, node_id: str, reason: str, *, registered: str | None = None) -> None:
        """End the node's stream (if any) without marking it down (it no longer exists).
        `registered`: the session of a registration of the node stored since it was removed (a
        removal heard late: `PeerMessages._removed_elsewhere`); that registration is kept, its
        stream and the interval it was told, and only a stream of another (older) session ends."""
        session = self._sessions.get(node_id)
        if registered is None:
            self._intervals.forget(node_id)
        if session is not None and session.session_id != registered:
            session.close(reason, mark_down=False, told=_deleted(node_id))

    # --- Registers and hellos, committed in batches (`Joins`) --------------------------------
    def shed_register(self, time_left_s: float | None) -> MaiaError | None:
        """`Joins.shed_register`: the refusal of a Register arriving now, if the gate would refuse it."""
        return self._joins.shed_register(time_left_s)

    @property
    def shed(self) -> int:
        """Registers refused before the interceptor chain (`shed_register`)."""
        return self._joins.shed

    async def register(self, who: Principal, info: NodeInfo, *, credential_proposal: str = "",
                       time_left_s: float | None = None) -> agent_cases.Registered:
        """`Joins.register`: register a node, committed with the Registers around it."""
        return await self._joins.register(who, info, credential_proposal=credential_proposal, time_left_s=time_left_s)

    async def _hello(self, hello: agent_cases.Hello) -> bool:
        """`Joins.hello`: whether the node's liveness changed; raises what refuses the hello."""
        return await self._joins.hello(hello)

    # --- assignment sets, read in batches ----------------------------------------------------
    async def _assignment_set(self, node_id: str) -> AssignmentSet | None:
        """The node's current set (None: the node is gone), read with the other streams' that
        want theirs now (a commit wakes every node it changed at once)."""
        read = await self._assignment_reads.submit(node_id)
        if read is not None:
            return read.current
        async with self._db.unit_of_work() as uow:  # its batch failed: alone
            return (await repo.assignment_sets(uow.session, [node_id])).get(node_id)

    async def _read_assignment_sets(self, node_ids: list[str]) -> list[_Read]:
        async with self._db.unit_of_work() as uow:
            sets = await repo.assignment_sets(uow.session, node_ids)
        return [_Read(sets.get(node_id)) for node_id in node_ids]

    # --- one stream --------------------------------------------------------------------------
    async def converse(
        self, who: Principal, node_id: str, session_id: str, inbound: AsyncIterator[Message],
        convert: Callable[[Message], AgentInbound | None] = _as_is, *, heartbeat_interval_ms: int = 0,
    ) -> AsyncIterator[AgentOutbound]:
        """Serve one Connect stream after its Hello (committed with the hellos around it): yields
        the AssignmentSets to send, the requests for the agent's full shard state, and the longer
        heartbeat intervals it is told (`HeartbeatIntervals.pace`). `heartbeat_interval_ms`: the
        interval the Hello states its agent follows (0: not stated; `HeartbeatIntervals.judged`).
        `inbound` is what the agent says after its Hello, each message made a report by `convert`
        (None: nothing to act on) as the stream's reader takes it: a message crosses no generator of
        its own; an `inbound` that pushes its messages (`controller.aio.PushedStream`: a relayed
        stream's) is not read by a task at all, each message is taken as it arrives
        (`ReportBuffer.start_reading`). Refused UNAVAILABLE once `close_all` began, with no session
        opened: a session opened then would be closed by no one, and cut only when the server's grace
        ends (its agent should go to the next leader now). A hello that arrives after it is refused
        before it is written; one whose write was under way is refused when it returns."""
        self._refuse_when_stopping(node_id)
        if heartbeat_interval_ms < 0:
            raise InvalidArgument(f"hello.heartbeat_interval_ms must be 0 (not stated) or positive, got "
                                  f"{heartbeat_interval_ms}")
        damped = self._damper.returns_damped(node_id, time.monotonic())
        with self._greeted(node_id):  # left on the event loop's same turn as the session is held below
            changed = await self._hello(agent_cases.Hello(who, node_id, session_id, damped))
        self._refuse_when_stopping(node_id)
        self._refuse_when_following(node_id)
        session = self._judge(node_id, session_id, heartbeat_interval_ms, who.token_id)
        previous = self._sessions.get(node_id)
        if previous is not None:
            previous.close("superseded by a newer session", mark_down=False, told=_superseded(node_id, session_id))
        self._sessions[node_id] = session
        self._intervals.pace(session)
        self._streams_changed += 1
        self._released.pop(node_id, None)
        session.push_set()  # the full set, right away
        if who.expires_at is not None:
            session.expiry = ExpiryTimer(who.expires_at, partial(_expired, session, who.token_id, who.expires_at))
        if who.token_id and self._revoked(who.token_id):  # revoked between its authentication and now
            session.refuse_credential(f"the credential of node {node_id} was revoked; register again")
        log.info("agent connected node=%s session=%s changed=%s damped=%s", node_id, session_id, changed, damped)
        if changed:
            self._on_liveness_change()
        stop_reading: Callable[[], None] | None = None
        try:
            while True:
                if stop_reading is not None:
                    await session.dirty.wait()
                if session.closed:
                    break
                session.dirty.clear()
                if session.tell_due:
                    session.tell_due = False
                    yield HeartbeatPolicy(session.interval_ms)
                    if not (session.set_due or session.ask_state):
                        continue
                if session.ask_state:
                    session.ask_state = False
                    yield ShardStateRequest()
                    if not session.set_due:
                        continue
                session.set_due = False
                due_since, session.due_since = session.due_since, None
                current = await self._assignment_set(node_id)
                if current is None:  # the node was deleted: by another controller, whose NODE_REMOVED
                    # this one may have missed (dropped: the resync that follows pushes every set)
                    self._intervals.forget(node_id)
                    session.close(NODE_DELETED, mark_down=False, told=_deleted(node_id))
                    break
                now = time.monotonic()
                session.sent(current, now)
                if due_since is not None:
                    self._observer.shard_start_stage("push", (now - due_since,))
                if stop_reading is None:  # reports are judged against what the node was given: read after the first set
                    stop_reading = self._buffer.start_reading(session, inbound, convert)
                yield current
            if session.error is not None:
                raise session.error
        finally:
            if stop_reading is not None:
                stop_reading()
            if session.expiry is not None:
                session.expiry.cancel()
            if self._sessions.get(node_id) is session:
                del self._sessions[node_id]
                self._streams_changed += 1
                self._buffer.stream_ended(node_id)  # its last heartbeat held back is written at the next flush
                if not self._stopping and self._leading() and session.close_reason != NODE_DELETED:
                    self._released[node_id] = _wall(session.last_seen)  # a deleted node is judged no more
            if not session.close_reason:
                session.close("stream cancelled")
            log.info("agent disconnected node=%s reason=%s", node_id, session.close_reason)
            if session.mark_down_on_close and not self._stopping:
                self._damper.dropped(node_id, time.monotonic())
                # Written whatever becomes of this task: gRPC cancels a stream's handler when its
                # connection dies (a keepalive unanswered, an RST), often while this runs; cut short,
                # the node would stay up until the lifecycle found it silent for a heartbeat timeout.
                marking = asyncio.create_task(self._mark_suspect(node_id, session_id, session.close_reason),
                                              name=f"agent-suspect-{node_id}")
                self._marking.add(marking)
                marking.add_done_callback(self._marking.discard)
                await asyncio.shield(marking)

    async def _mark_suspect(self, node_id: str, session_id: str | None, why: str) -> None:
        try:
            async with self._db.unit_of_work() as uow:
                # Not once the node's agent is back: its Hello (being written, or written: the same
                # session's reconnect) owns the node's health, and the mark may have waited for the
                # writer behind it.
                changed = await agent_cases.mark_suspect(uow, node_id, session_id=session_id, why=why,
                                                         unless=partial(self._back, node_id))
        except LeaseLost:  # another controller leads now and judges this node
            return
        except Exception:
            log.exception("could not mark node %s suspect", node_id)
            return
        if changed:
            log.warning("node suspect node=%s why=%s", node_id, why)
            self._streams_changed += 1  # the node lifecycle reads the nodes again (`streams_changed`)
            self._on_liveness_change()

    def _back(self, node_id: str) -> bool:
        """The node's agent holds a stream here again, or its Hello is being written."""
        return node_id in self._sessions or node_id in self._greeting

    # --- background work ---------------------------------------------------------------------
    async def run(self) -> None:
        """Flush reports and close silent streams until cancelled. A flush begins a flush interval
        after the last one ended. (Beginning it an interval after the last one began, so that a
        report arriving during a long flush waits for that flush alone, ran flushes back to back
        under load: Running p50 at 4,096 nodes 0.1 s earlier, ~5 % fewer deployments a second.)"""
        check_every = min(1.0, self._timeout / 4)
        next_check = time.monotonic()
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()
            if time.monotonic() >= next_check and self._leading():
                next_check = time.monotonic() + check_every
                await self._expire()

    async def flush(self) -> None:
        """Write what the agents said since the last flush (`ReportBuffer.flush`)."""
        await self._buffer.flush()

    async def _expire(self) -> None:
        """End the streams silent for the heartbeat timeout at this check and at the one before.
        A stream's silence is what its reader took last, not what reached the controller: after
        the event loop stalled past the timeout (a long collection, a starved process), a check
        that runs before the readers finds every stream silent though their heartbeats are
        waiting to be read (a 2.5 s stall under a 2 s timeout ended 200 of 200 beating streams);
        by the next check the readers had their turn. A silent stream so ends a check later.

        The streams are looked at `EXPIRE_SLICE` at a time, the event loop's other work let in
        between: one pass over 16,384 of them was one ~3 ms step of the loop a second, which every
        call arriving then waited for. A stream heard from while a check is under way is not silent
        at that check; one that ended meanwhile is skipped."""
        now = time.monotonic()
        sessions = list(self._sessions.values())
        silent: set[AgentSession] = set()
        for start in range(0, len(sessions), EXPIRE_SLICE):
            if start:
                await asyncio.sleep(0)
            for session in sessions[start:start + EXPIRE_SLICE]:
                if session.closed:
                    continue
                if now - session.last_seen > session.timeout_s:
                    silent.add(session)
                    if session in self._silent:
                        continue  # ended below: its shards go with its node (suspect, then down), not failed
                if self._ack_timeout_s and session.unacknowledged:
                    self._fail_unacknowledged(session, now)
        for session in silent & self._silent:
            if not session.closed and now - session.last_seen > session.timeout_s:
                _silenced(session, f"no heartbeat for {now - session.last_seen:.1f}s (timeout {session.timeout_s:g}s)")
        self._silent = silent - self._silent

    def _fail_unacknowledged(self, session: AgentSession, now: float) -> None:
        """Shards a live stream's agent was given and has said nothing of for the ack timeout: a
        buggy or hung agent (its heartbeats still flowing) that would leave them ASSIGNED forever.
        Each is written FAILED (the restart back-off then places it again, elsewhere first). An
        agent may answer in its next heartbeat: where the stream's silence timeout (three of its
        intervals, 131 s at 65,536 nodes) is longer than the ack timeout, that is its timeout."""
        timeout_s = max(self._ack_timeout_s, session.timeout_s)
        late = session.overdue(now, timeout_s)
        if late:
            log.warning("agent did not take up shards node=%s shards=%d timeout=%gs first=%s/%s/%d/%d",
                        session.node_id, len(late), timeout_s, late[0].tenant,
                        late[0].deployment, late[0].replica, late[0].shard)
            self._buffer.not_acknowledged(session.node_id, late)

    def _refuse_when_following(self, node_id: str) -> None:
        """The lead was lost while the node's Hello was written (it committed under the lease):
        `follow` ended the streams held then, and a session opened now would be a follower's, its
        silence never checked and its reports never written, its node judged silent by the leader."""
        if not self._leading():
            raise Unavailable(f"this controller no longer leads: no stream opened for node {node_id}; connect to "
                              f"the leader")

    def _refuse_when_stopping(self, node_id: str) -> None:
        if self._stopping:
            raise Unavailable(f"controller is stopping: no stream opened for node {node_id}; connect to the "
                              f"next leader")

    def close_all(self) -> None:
        """Shutdown: end every stream without marking nodes down (agents reconnect to the next
        controller). They are told UNAVAILABLE with no leader's address: this controller led until
        now, and the next leader is not elected yet."""
        self._stopping = True
        for session in list(self._sessions.values()):
            session.close("controller shutting down", mark_down=False, told=Unavailable(
                f"controller is stopping: the stream of node {session.node_id} ended; connect to the next leader"))


@dataclass(frozen=True, slots=True)
class _Read:
    """One node's read in a batch: its set, or None when the node no longer exists."""

    current: AssignmentSet | None


# --- what an agent is told when its stream ends here (its status: `AgentSession.close`) -------------
def _superseded(node_id: str, session_id: str) -> Conflict:
    """ABORTED, no retry time: the stream's agent lost the node to the newer stream, usually its own
    reconnect (its old call gone, nobody reads this); else a second agent of the node, which must
    stop rather than take it back (each Register and Hello would end the other's stream)."""
    return Conflict(f"superseded by a newer stream of node {node_id} (session {session_id}): the process that "
                    f"held this stream must not reconnect (one agent per node)")


def _deleted(node_id: str) -> NotFound:
    """NOT_FOUND, no retry time: the node is gone, and the deletion revoked its node credentials."""
    return NotFound(f"node {node_id} was deleted by an administrator and its node credential revoked: register it "
                    f"again with a node-bootstrap token")


def _silenced(session: AgentSession, reason: str) -> None:
    """End a stream silent past its timeout, the node marked suspect: UNAVAILABLE, to connect again
    (to this controller, which still leads) after one heartbeat interval (RetryInfo: a Hello of the
    same session is still accepted)."""
    session.close(reason, told=Unavailable(
        f"{reason}: node {session.node_id} is suspect until its agent connects again; reconnect and heartbeat "
        f"every {session.interval_ms} ms", retry_after_ms=session.interval_ms))


def _expired(session: AgentSession, token_id: str, expires_at: datetime) -> None:
    """End the stream UNAUTHENTICATED: the token it was opened with expired (a call's token is
    checked as the call starts, and a stream is one call). Called by the stream's `ExpiryTimer`,
    cancelled when the stream ends; nothing is checked per message."""
    session.refuse_credential(f"token {token_id}, which this stream was opened with, expired at "
                              f"{expires_at.isoformat(timespec='seconds')}")


def _wall(monotonic: float) -> datetime:
    """A `time.monotonic()` reading of the past as a wall-clock time."""
    return datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - monotonic)

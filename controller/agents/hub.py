"""Live agent sessions: one Connect stream per node, assignment pushes, liveness, batched reports.

The hub is the only place that knows which agents are connected right now. It
- accepts a stream after its Hello matched the node's current session (a newer stream for the
  same node supersedes the older one),
- sends the node's complete AssignmentSet when the stream opens and whenever `notify` says it
  changed (coalesced: an agent gets the latest set, never a backlog); the sets of every stream
  woken together (a commit's changed nodes) are read in one batch (`repo.assignment_sets`), not
  one transaction per node,
- checks every report as it arrives (bounded fields and batch sizes, a per-stream rate limit;
  a violation ends the stream with INVALID_ARGUMENT or RESOURCE_EXHAUSTED) and refuses reports
  for shards the node was never given on this stream (an event per node and flush),
- buffers heartbeats and shard reports and writes them per flush interval in chunks of at most
  `limits.FLUSH_CHUNK` shard reports and `BEATS_PER_CHUNK` heartbeats (not one commit per
  heartbeat per node), the nodes with shard reports first, each chunk published once written;
  a chunk that fails is retried node by node, so one node's bad data never drops every other node's heartbeats; of
  the full shard state a heartbeat repeats, only the shards whose state changed since the
  stream's last heartbeat are written (all of them every `FULL_REPORTS_EVERY_S`); a heartbeat
  that omits its shards under the version of the state this stream's last full heartbeat carried
  costs no shard at all, and one that names a version the stream does not hold (never received,
  or its write failed), or comes when every shard is due again, asks the agent for its full state
  (`ShardStateRequest`) and counts for liveness meanwhile; and a node's last-heartbeat time at
  most every `LivenessPolicy.contact_write_every_for` (three of the longest silence timeouts
  told) while its stream lives (at once when its power draw changed or its stream ended): a live
  stream is the node's liveness, and the node lifecycle judges a node whose stream ended here by
  the last heartbeat the hub saw (`released`), a new leader by the restart grace,
- tells each agent its heartbeat interval (`HeartbeatPacing`: a third of the heartbeat timeout,
  longer as the connected nodes grow past `max_heartbeats_per_second`), at Register, and judges
  its stream by three of the intervals it told that agent (`AgentSession.timeout_s`, never less
  than `heartbeat_timeout_s`), or of the one its agent states in its Hello it follows (told by
  another leader, or before a restart), bounded (`HeartbeatPacing.stated`; an agent stating more
  is told the bound); once the cluster's interval grew `PACING_STEP` times past the
  shortest one told, every connected agent told less is told the cluster's on its stream
  (`HeartbeatPolicy`, `_pace_grown`), so the cluster sends at most that many times the cap. An
  agent that ignores it beats more often than it is judged by, which is safe. Intervals shrink
  when nodes leave only as agents register again;
- marks a node suspect when its stream ends or its heartbeats stop for its stream's silence
  timeout (silent at two checks in a row: `_expire`; it keeps its shards;
  `controller/nodelifecycle.py` takes it further: down, evicted), counts the drop against the
  node's flap penalty, and on Hello marks it up again (suspect while it flaps), waking the
  reconciler either way;
- says whether a live stream holds a node (`holds_live_session`): a second agent registering
  the same node id meanwhile is refused;
- ends a stream UNAUTHENTICATED when the token it was opened with is revoked (`revoke_credentials`)
  or expires (a timer per stream whose token expires), and takes nothing its agent sends after
  the stream was closed.
Only the leader talks to agents (`follow` ends every stream when it loses the lead): a
follower's hub holds no streams and judges no node's liveness.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from controller import limits
from controller.admission import AdmissionGate, agent_admission_gate, judge
from controller.agents.pacing import HeartbeatIntervals
from controller.agents.session import (
    AgentInbound, AgentOutbound, AgentSession, HeartbeatPolicy, HubObserver, Message, ShardKey, ShardStateRequest,
    _NoObserver,
)
from controller.aio import pushed
from controller.errors import InvalidArgument, MaiaError, Unavailable
from controller.groupcommit import GroupCommit, RetryPacer
from controller.ratelimit import TokenBucket, rate_limited
from controller.identity import Principal
from controller.store import audit
from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork, database_failed
from controller.store.lease import LeaseLost
from controller.usecases import agents as agent_cases
from controller.usecases.agents import NodeBeat, RefusedReports
from controller.domain.liveness import FlapDamper, LivenessPolicy
from controller.domain.values import (
    AssignmentSet, DeploymentView, HeartbeatReport, NodeInfo, ShardReport, deployment_key,
)

log = logging.getLogger("maia.agents")


def _as_is(message: Any) -> Any:
    """`converse`'s default `convert`: the inbound stream says reports already."""
    return message


ASSIGNMENT_READ_BATCH_MAX = 2048  # nodes whose sets one batched read fetches

# Heartbeats a flush transaction writes at most besides its shard reports (`limits.FLUSH_CHUNK`):
# one row each in one executemany, where a report costs its deployment's read and write; each
# transaction more waits for its own turn at SQLite's writer (behind submits and passes).
BEATS_PER_CHUNK = 4 * limits.FLUSH_CHUNK
FULL_REPORTS_EVERY_S = 60.0  # a stream's heartbeats write every shard's state at least this often
REFUSED_SAMPLES = 5


NODE_DELETED = "the node was deleted by an administrator"  # why its stream ended


class AgentHub:
    def __init__(
        self, db: Database, *, heartbeat_timeout_s: float,
        on_liveness_change: Callable[[], None],
        on_deployments_changed: Callable[[Mapping[str, DeploymentView]], Awaitable[None]],
        flush_interval_s: float = 0.2, reports_per_second: float = limits.REPORTS_PER_SECOND,
        reports_burst: int = limits.REPORTS_BURST, damper: FlapDamper | None = None,
        leading: Callable[[], bool] = lambda: True, admission: AdmissionGate | None = None,
        max_heartbeats_per_second: float = 0.0, observer: HubObserver | None = None,
        contact_write_every_s: float | None = None,
    ) -> None:
        self._db = db
        self._observer = observer or _NoObserver()
        # Registers and hellos (write transactions) of a join storm: bounded, the rest told when to retry.
        self.admission = admission or agent_admission_gate()
        self._leading = leading
        self._timeout = heartbeat_timeout_s
        self._on_liveness_change = on_liveness_change
        self._on_deployments_changed = on_deployments_changed
        self._flush_interval = flush_interval_s
        self._report_rate = reports_per_second
        self._report_burst = reports_burst
        self._sessions: dict[str, AgentSession] = {}
        # The nodes whose Hello is being written (a stream opening), with how many: `greeting`.
        self._greeting: dict[str, int] = {}
        self._beats: dict[str, NodeBeat] = {}
        # The last heartbeat written per node. While a node's stream lives its liveness is the stream
        # (in memory: `last_seen`), so a beat that changes nothing but the time is written at most
        # every `contact_write_every_s`; a changed power draw, or a stream gone, at the next flush.
        self._written_beats: dict[str, NodeBeat] = {}
        self._held_beats: dict[str, NodeBeat] = {}
        # None: `LivenessPolicy.contact_write_every_for` the longest silence timeout told (`_due_beats`).
        self._beat_write_every = None if contact_write_every_s is None else timedelta(seconds=contact_write_every_s)
        self._policy = LivenessPolicy(heartbeat_timeout_s=heartbeat_timeout_s)
        # The nodes whose stream ended on this leader's watch (none open now), with the last time
        # their agent was heard from: what the node lifecycle judges them by (`released`).
        self._released: dict[str, datetime] = {}
        self._streams_changed = 0  # streams opened and ended here (`streams_changed`)
        self._reports: list[tuple[str, ShardReport]] = []
        self._received: list[float] = []  # when each of `_reports` arrived (the `flush_wait` stage)
        self._refused: dict[str, RefusedReports] = {}
        self._damper = damper or FlapDamper()
        # The intervals told to agents, and the silence each stream is judged by.
        self._intervals = HeartbeatIntervals(self._sessions, heartbeat_timeout_s=heartbeat_timeout_s,
                                             max_heartbeats_per_second=max_heartbeats_per_second)
        # Hellos and Registers that arrive together are committed together (controller/groupcommit.py).
        # A batch that fails for want of the database or the lease fails its members alike.
        # A refused Register is told to come back at the next slot of the rate Registers are written
        # (groupcommit.RetryPacer), whoever refuses it: the shedding check, the gate, the group commit.
        self.pacer = RetryPacer()
        self.shed = 0  # Registers refused before the interceptor chain (`shed_register`)
        self.admission.pace = self.pacer.retry_after_s
        self._hellos: GroupCommit[agent_cases.Hello, bool] = GroupCommit(
            "agent-hellos", self._write_hellos, batch_max=limits.HELLO_BATCH_MAX, shared_failure=_shared_failure)
        self._registers: GroupCommit[agent_cases.Register, agent_cases.Registered] = GroupCommit(
            "agent-registers", self._write_registers, batch_max=limits.REGISTER_BATCH_MAX,
            key=lambda r: r.info.node_id, shared_failure=_shared_failure,
            writers=1 if db.is_sqlite else limits.REGISTER_WRITERS_POSTGRES,
            answer_reserve=self.admission.answer_reserve_s, pacer=self.pacer)
        # The sets of the nodes a commit changed are read together: one read for all of them.
        self._assignment_reads: GroupCommit[str, _Read] = GroupCommit(
            "agent-assignment-reads", self._read_assignment_sets, batch_max=ASSIGNMENT_READ_BATCH_MAX,
            shared_failure=_shared_failure)
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

    def follow(self, reason: str) -> None:
        """This controller lost the lead: end every stream (the agents go to the new leader)."""
        for session in list(self._sessions.values()):
            session.close(f"this controller no longer leads ({reason})", mark_down=False)
        self._released.clear()  # the next leader judges these nodes

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
        removal heard late: `ControllerApp._removed_elsewhere`); that registration is kept, its
        stream and the interval it was told, and only a stream of another (older) session ends."""
        session = self._sessions.get(node_id)
        if registered is None:
            self._intervals.forget(node_id)
        if session is not None and session.session_id != registered:
            session.close(reason, mark_down=False)

    # --- Registers and hellos, committed in batches ------------------------------------------
    def shed_register(self, time_left_s: float | None) -> MaiaError | None:
        """The refusal of a Register arriving now with `time_left_s` until its deadline, if the
        admission gate would refuse it (its queue is full, or it would wait past its deadline),
        else None. Asked before the interceptor chain (`api.interceptors.LoadShedInterceptor`):
        a refusal then costs no token check, audit entry or log line. The retry time is the
        pacer's next slot."""
        if judge(self.admission.state(), time_left_s) is None:
            return None
        self.shed += 1
        wait_s = self.pacer.retry_after_s()
        return Unavailable(f"the controller is busy with agent registrations ({self.admission.waiting} waiting, "
                           f"about {self.pacer.rate():.0f} written a second); nothing was written; retry in "
                           f"{wait_s:.3g}s", retry_after_ms=math.ceil(wait_s * 1000))

    async def register(self, who: Principal, info: NodeInfo, *, credential_proposal: str = "",
                       time_left_s: float | None = None) -> agent_cases.Registered:
        """Register a node (`usecases.agents.register_nodes`), committed with the Registers around
        it; raises what refuses it. Each Register is one caller of the admission gate (`time_left_s`
        until its deadline): the gate bounds how many wait for the batches, and refuses with a retry
        time those that would wait past their deadline; its batch answers before the deadline too."""
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        async with self.admission.admit(time_left_s):
            ask = agent_cases.Register(who, info, credential_proposal, call=audit.current_call())
            outcome = await self._registers.submit(ask, None if deadline is None else deadline - time.monotonic())
            if outcome is not None:
                return outcome
            async with self._db.unit_of_work() as uow:  # the batch could not decide it: alone
                [alone] = await self._register_nodes(uow, [replace(ask, call=None)])
        if isinstance(alone, MaiaError):
            raise alone
        return alone

    async def _write_registers(self, batch: list[agent_cases.Register]) -> list[agent_cases.Registered | MaiaError]:
        async with self._db.unit_of_work() as uow:
            return await self._register_nodes(uow, batch)

    async def _register_nodes(self, uow: UnitOfWork, batch: list[agent_cases.Register]
                              ) -> list[agent_cases.Registered | MaiaError]:
        """`usecases.agents.register_nodes`, telling the batch the interval of the connected nodes
        with its own, and remembering what each registered agent was told."""
        interval_ms = self._intervals.interval_for(ask.info.node_id for ask in batch)
        outcomes = await agent_cases.register_nodes(uow, batch, heartbeat_interval_ms=interval_ms,
                                                    held_by_live_agent=self.holds_live_session)
        for outcome in outcomes:
            if not isinstance(outcome, MaiaError):
                self._intervals.registered(outcome.registration.node_id, interval_ms)
        return outcomes

    async def _hello(self, hello: agent_cases.Hello) -> bool:
        """Whether the node's liveness changed; raises what refuses the hello."""
        outcome = await self._hellos.submit(hello)
        if outcome is not None:
            return outcome
        async with self.admission.admit(), self._db.unit_of_work() as uow:  # its batch failed: alone
            [alone] = await agent_cases.hellos(uow, [hello], datetime.now(timezone.utc))
        if isinstance(alone, MaiaError):
            raise alone
        return alone

    async def _write_hellos(self, batch: list[agent_cases.Hello]) -> list[bool | MaiaError]:
        """One batch of hellos: one caller of the admission gate (without a deadline: the streams
        have none), taking its turn with the Registers; but never refused for a full queue: a hello
        completes a join whose Register was written (refused, its agent had to register again),
        and one writer at a time bounds the batches anyway."""
        async with self.admission.admit(pass_when_full=True), self._db.unit_of_work() as uow:
            return await agent_cases.hellos(uow, batch, datetime.now(timezone.utc))

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
        (`_start_reading`). Refused UNAVAILABLE once `close_all` began, with no session
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
        session = self._judge(node_id, session_id, heartbeat_interval_ms, who.token_id)
        previous = self._sessions.get(node_id)
        if previous is not None:
            previous.close("superseded by a newer session", mark_down=False)
        self._sessions[node_id] = session
        self._intervals.pace(session)
        self._streams_changed += 1
        self._released.pop(node_id, None)
        session.push_set()  # the full set, right away
        if who.expires_at is not None:
            self._end_at_expiry(session, who.token_id, who.expires_at)
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
                    session.close(NODE_DELETED, mark_down=False)
                    break
                now = time.monotonic()
                session.sent(current, now)
                if due_since is not None:
                    self._observer.shard_start_stage("push", (now - due_since,))
                if stop_reading is None:  # reports are judged against what the node was given: read after the first set
                    stop_reading = self._start_reading(session, inbound, convert)
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
                held = self._held_beats.pop(node_id, None)
                if held is not None:  # the node's last heartbeat, not written yet: at the next flush
                    self._beats.setdefault(node_id, held)
                if not self._stopping and self._leading():
                    self._released[node_id] = _wall(session.last_seen)
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

    def _end_at_expiry(self, session: AgentSession, token_id: str, expires_at: datetime) -> None:
        """End the stream UNAUTHENTICATED when the token it was opened with expires (a call's token
        is checked as the call starts, and a stream is one call): a timer per such stream,
        cancelled when it ends, and nothing per message. Never before the expiry: the loop's clock
        and the wall clock may drift apart, so the timer looks at the wall clock when it fires,
        and waits again if it came early."""
        left_s = (expires_at - datetime.now(timezone.utc)).total_seconds()
        if left_s > 0:
            session.expiry = asyncio.get_running_loop().call_later(
                left_s, self._end_at_expiry, session, token_id, expires_at)
            return
        session.expiry = None
        session.refuse_credential(f"token {token_id}, which this stream was opened with, expired at "
                                  f"{expires_at.isoformat(timespec='seconds')}")

    def _start_reading(self, session: AgentSession, inbound: AsyncIterator[Message],
                       convert: Callable[[Message], AgentInbound | None]) -> Callable[[], None]:
        """Take the stream's messages from now on; returns what stops it. A stream that pushes
        them has each taken in the call that delivers it; another is read by a task of its own.
        Once the stream is closed (its credential revoked or expired, its node deleted...) nothing
        more is taken, though its end is still on its way (its handler's turn on the loop)."""
        def take(message: Message) -> None:
            if session.closed:
                return
            report = convert(message)
            if report is not None:
                session.last_seen = time.monotonic()
                self._accept(session, report)

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

    def _accept(self, session: AgentSession, message: AgentInbound) -> None:
        """Check one inbound message and buffer what it says (raises to end the stream)."""
        node_id = session.node_id
        now = time.monotonic()
        wait = session.reports.take(now)
        if wait:
            raise rate_limited(f"node {node_id} sent more than {self._report_rate:g} reports a second "
                               f"(burst {self._report_burst})", wait)
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
            session.beat_at = datetime.now(timezone.utc)
            self._beats[node_id] = NodeBeat(session.beat_at, message.power_draw_w)
            if not message.shards_omitted:
                # A state naming shards this node was not given is judged again (they may be given by then).
                session.state_version = None if refused else message.shard_state_version or None
                session.state_asked = False
                if full:
                    session.said_all_at = now

    def _refuse(self, node_id: str, key: ShardKey) -> None:
        before = self._refused.get(node_id, RefusedReports(0, ()))
        samples = before.samples if len(before.samples) >= REFUSED_SAMPLES else (*before.samples, key)
        self._refused[node_id] = RefusedReports(before.count + 1, samples)

    async def _mark_suspect(self, node_id: str, session_id: str | None, why: str) -> None:
        try:
            async with self._db.unit_of_work() as uow:
                changed = await agent_cases.mark_suspect(uow, node_id, session_id=session_id, why=why)
        except LeaseLost:  # another controller leads now and judges this node
            return
        except Exception:
            log.exception("could not mark node %s suspect", node_id)
            return
        if changed:
            log.warning("node suspect node=%s why=%s", node_id, why)
            self._on_liveness_change()

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
        beats = self._due_beats()
        if not beats and not self._reports and not self._refused:
            return
        batch = _Batch(beats, self._reports, self._refused)
        received: dict[str, list[float]] = {}  # when each node's reports arrived
        for (node_id, _), at in zip(self._reports, self._received):
            received.setdefault(node_id, []).append(at)
        self._reports, self._received, self._refused = [], [], {}
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
            every = timedelta(seconds=self._policy.contact_write_every_for(self.longest_silence_timeout_s()))
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
        except Exception:
            nodes = chunk.nodes()
            if len(nodes) == 1:
                log.exception("could not write the heartbeat and %d shard reports of node %s",
                              len(chunk.reports), nodes[0])
                session = self._sessions.get(nodes[0])
                if session is not None:  # its next heartbeat writes every shard's state again
                    session.forget_state()
                return {}
            log.warning("could not write a chunk of %d nodes; writing them one by one", len(nodes))
            for node_id in nodes:
                views.update(await self._flush_chunk(chunk.only(node_id)))
            return views

    async def _expire(self) -> None:
        """End the streams silent for the heartbeat timeout at this check and at the one before.
        A stream's silence is what its reader took last, not what reached the controller: after
        the event loop stalled past the timeout (a long collection, a starved process), a check
        that runs before the readers finds every stream silent though their heartbeats are
        waiting to be read (a 2.5 s stall under a 2 s timeout ended 200 of 200 beating streams);
        by the next check the readers had their turn. A silent stream so ends a check later."""
        now = time.monotonic()
        silent = {session for session in self._sessions.values() if now - session.last_seen > session.timeout_s}
        for session in silent & self._silent:
            session.close(f"no heartbeat for {now - session.last_seen:.1f}s (timeout {session.timeout_s:g}s)")
        self._silent = silent - self._silent

    def _refuse_when_stopping(self, node_id: str) -> None:
        if self._stopping:
            raise Unavailable(f"controller is stopping: no stream opened for node {node_id}; connect to the "
                              f"next leader")

    def close_all(self) -> None:
        """Shutdown: end every stream without marking nodes down (agents reconnect to the next controller)."""
        self._stopping = True
        for session in list(self._sessions.values()):
            session.close("controller shutting down", mark_down=False)


@dataclass(frozen=True, slots=True)
class _Read:
    """One node's read in a batch: its set, or None when the node no longer exists."""

    current: AssignmentSet | None


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


def _wall(monotonic: float) -> datetime:
    """A `time.monotonic()` reading of the past as a wall-clock time."""
    return datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - monotonic)


def _shared_failure(exc: Exception) -> bool:
    """A batch failed for a reason each of its members would meet alone: the lease, the database."""
    return isinstance(exc, LeaseLost) or database_failed(exc)


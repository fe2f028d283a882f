"""One simulated node over its own gRPC channel: Register, a Connect stream, heartbeats, reconnects.

`SimulatedNode.run()` loops until `stop()`: register (NodeInfo), open Connect, send Hello (stating
the interval it beats at now) and a first heartbeat, then heartbeat every interval (the Register's,
or the one a later HeartbeatPolicy on the stream tells: the cluster grew; `--heartbeat-interval`
overrides both) while applying each
AssignmentSet to the `NodeAgent` and sending a ShardStatus for every phase change. When the stream or the
registration fails it waits a jittered, exponentially growing delay and starts over (the
shards it runs survive a reconnect, as processes on a real host would). `controller` may list
several controllers ("A,B,C"): the node talks to the leader; a follower answers UNAVAILABLE
with the leader's address (`maia-leader` metadata), which the node follows at once, and a
controller that is gone, hung (a Register that ended at its deadline) or knows no leader yet
sends it on to the next one in the list.

How a stream the controller ended is acted on (its status; docs/agent-protocol.md): ABORTED with
no retry time, superseded by a newer stream of the node (a second agent of it, usually a
misconfiguration): the node stops reconnecting, leaving the node to the newer stream, until
`revive()`; NOT_FOUND, the node deleted: its node credential is forgotten and it registers again
with its bootstrap token; UNAUTHENTICATED, its credential revoked or expired: the same; UNAVAILABLE
with a retry time (silent past its timeout), back to the same controller after it; UNAVAILABLE
with the leader's address (the controller stepped down), to that leader; UNAVAILABLE without
(the controller stops, or knows no leader), the next controller.

Failure injection (driven by `controller/simnode/faults.py`): `crash()` drops the stream
abruptly and forgets all shards, back after a while; `kill()` does the same until `revive()`;
`drop()` ends the stream but keeps the shards (a flap); `partition()` keeps the stream open but
silent both ways (the controller notices only by the missing heartbeats) and stops reconnects
until `heal()`; `heartbeat_delay_s` stretches the time between heartbeats. Each is undone on its
own (`restart()` ends a kill, not a partition; `heal()` a partition, not a kill).
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from controller import limits
from controller.aio import cancel_and_wait, wait_event
from controller.ratelimit import RETRY_AFTER_METADATA_KEY
from controller.retryinfo import controller_answered
from controller.bearer import aio_channel, bearer_metadata
from controller.simnode import protocol
from controller.simnode.agent import NodeAgent, Phase, ShardKey, ShardReport
from controller.simnode.credentials import CredentialFile
from controller.simnode.protocol import NodeSpec
from controller.tokens import mint as mint_token
from maia.v1 import agent_pb2, agent_pb2_grpc

DEFAULT_HEARTBEAT_S = 1.0
LEADER_METADATA_KEY = "maia-leader"  # controller.leadership: where a follower says the leader is
STATE_METADATA_KEY = "maia-controller-state"  # controller.leadership: "starting" while it starts
REDIRECT_DELAY_S = (0.05, 0.25)  # jittered pause before following a redirect
NO_LEADER_DELAY_S = (0.3, 0.8)   # a controller is gone or knows no leader yet: the next one, soon
REGISTER_TIMEOUT_S = 10.0
REGISTER_SAMPLES = 64  # Register latencies a node keeps (for `status` and the join benchmark)
STOP_GRACE_S = 2.0


@dataclass
class Backoff:
    """Equal-jitter exponential backoff: the n-th delay is uniform in [d/2, d], d = initial*factor^n
    capped at `maximum_s` (never shorter than half its step, unlike full jitter's [0, d])."""

    initial_s: float = 0.5
    maximum_s: float = 15.0
    factor: float = 2.0
    retry_jitter: float = 0.25  # a pause the controller asked for is stretched by up to this share of it
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum_s, self.initial_s * self.factor ** self.attempt)
        if ceiling < self.maximum_s:  # past the cap it grows no more: factor ** 1024 overflowed (~3 h
            self.attempt += 1         # without a controller), and every node ended with OverflowError
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    def told(self, pause_s: float) -> float:
        """The pause a controller asked for (retry-after), stretched at random so that the agents it
        told the same time do not all come back in the same instant."""
        return pause_s * self.rng.uniform(1.0, 1.0 + self.retry_jitter)


def _trailer(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    """The value of one trailing-metadata entry of a failed call, as text (None if absent)."""
    for name, value in exc.trailing_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


def leader_hint(exc: grpc.aio.AioRpcError) -> str:
    """The leader's address a follower put in its UNAVAILABLE answer ('' if none)."""
    return _trailer(exc, LEADER_METADATA_KEY) or ""


def starting(exc: grpc.aio.AioRpcError) -> bool:
    """The controller said it is starting: it leads no one yet, whatever its retry time."""
    return _trailer(exc, STATE_METADATA_KEY) == "starting"


def status_lost(exc: grpc.aio.AioRpcError) -> bool:
    """Whether grpcio's asyncio client replaced the controller's answer with its own INTERNAL: a
    message written as the controller ended the call fails, and the client overwrites the status
    the controller had sent (grpc/grpc#36066), its code, details and trailing metadata (a leader
    hint, a retry time) with it. The node then does what it does for a stream that broke."""
    return (exc.code() == grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core"
            and "SendMessageOperation" in (exc.debug_error_string() or ""))


def superseded(exc: grpc.aio.AioRpcError) -> bool:
    """The controller ended the stream for a newer one of this node: ABORTED, with no time to
    retry after (an ABORTED with one is a transaction the database rolled back: retried)."""
    return (exc.code() == grpc.StatusCode.ABORTED and retry_after_s(exc) is None
            and controller_answered(exc.trailing_metadata()))


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The pause the controller asked for (`retry-after-ms`: a busy or rate-limited answer), or None."""
    value = _trailer(exc, RETRY_AFTER_METADATA_KEY)
    try:
        return None if value is None else max(0.0, int(value) / 1000)
    except ValueError:
        return None


class _Crashed(Exception):
    pass


_CLOSE = object()  # outbox sentinel: half-close the stream


class SimulatedNode:
    """A node agent process, simulated: one state machine, one channel, one stream at a time."""

    def __init__(self, spec: NodeSpec, controller: str, *, token: str | None = None, load_delay_s: float = 1.0,
                 heartbeat_interval_s: float | None = None, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 credentials: grpc.ChannelCredentials | None = None,
                 node_credentials: CredentialFile | None = None,
                 register_timeout_s: float = REGISTER_TIMEOUT_S,
                 shared_channels: dict[str, grpc.aio.Channel] | None = None) -> None:
        self.spec = spec
        # Channels by controller address shared with the rest of the fleet (one connection for
        # all its nodes, their calls multiplexed on it), or None: this node's own, closed when it stops.
        self._shared_channels = shared_channels
        self.controllers = [c.strip() for c in controller.split(",") if c.strip()]
        self.controller = self.controllers[0]  # the one talked to now
        self.credentials = credentials  # TLS (and this node's client certificate); None: plaintext
        self.token = token  # node-bootstrap: registers the node the first time
        # This node's own credential, issued by Register: Connect and later Registers use it.
        self.node_credentials = node_credentials
        self.node_credential = node_credentials.get(spec.node_id) if node_credentials is not None else None
        self._pending_proposal: str | None = None
        self.agent = NodeAgent(spec.node_id, spec.idle_power_w, load_delay_s)
        self.heartbeat_override_s = heartbeat_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s or DEFAULT_HEARTBEAT_S  # what the pump beats at now
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.log = logging.getLogger(f"simnode.{spec.node_id}")
        self.session_id = ""
        self.connected = False
        self.sessions = 0
        self.heartbeats_sent = 0
        self.register_timeout_s = register_timeout_s
        self.register_latencies_s: deque[float] = deque(maxlen=REGISTER_SAMPLES)  # of the Registers that succeeded
        self.register_failures: Counter[str] = Counter()  # status code name -> Registers that failed so
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._crash_offline_s: float | None = None  # the stream was cut on purpose: back after this
        self._crash_reason = ""
        self._online = asyncio.Event()  # cleared while killed or partitioned: no (re)connecting
        self._online.set()
        self.killed = False
        self.partitioned = False
        # A newer stream of this node superseded ours (another agent holds the node): no reconnect until `revive()`.
        self.superseded = False
        self._heartbeat_delay_s = 0.0
        # Accelerators that failed (index -> why): listed in every heartbeat (`fail_accelerator`).
        self.failed_accelerators: dict[int, str] = {}
        self._beat_now = False  # the next heartbeat goes at once (the failed accelerators changed)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._outbox: asyncio.Queue | None = None
        # The controller asked for the full shard state (ShardStateRequest): the next heartbeat carries it.
        self._state_asked = False

    # --- control --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish cleanly: half-close the stream, let run() return."""
        self._stopping.set()
        self._online.set()  # a killed or partitioned node stops waiting to come back
        if self._outbox is not None:
            self._outbox.put_nowait(_CLOSE)

    def crash(self, offline_s: float = 5.0) -> None:
        """Fail abruptly: cancel the stream, lose every shard, come back after `offline_s`."""
        self.agent.crash()
        self._cut(offline_s, "crashed: all shards lost")

    def kill(self) -> None:
        """The host dies: the stream is cut, every shard lost, nothing until `revive()`."""
        self.killed = True
        self._online.clear()
        self.agent.crash()
        self._cut(0.0, "killed: all shards lost, offline until revived")

    def revive(self) -> None:
        """Undo `kill()`, `partition()` and a superseded stream: the node registers and connects again."""
        self.killed = self.superseded = False
        self.heal()

    def restart(self) -> None:
        """Undo `kill()` alone (a timed kill's end): the host is back, but a partition set apart
        still cuts it off until `heal()`."""
        if self.partitioned:
            self.killed = self.superseded = False
        else:
            self.revive()

    def drop(self, offline_s: float) -> None:
        """The network blips: the stream ends, the shards keep running, back after `offline_s`."""
        self._cut(offline_s, "stream dropped (flap)")

    def partition(self) -> None:
        """Cut off from the controller: nothing sent, nothing read, no reconnect until `heal()`;
        an open stream stays open (the controller notices only the missing heartbeats)."""
        self.partitioned = True
        self._online.clear()

    def heal(self) -> None:
        """End a partition: a stream that stayed open through it is replaced by a new session
        (what was sent meanwhile is lost), so the controller and the node agree again."""
        was_partitioned, self.partitioned = self.partitioned, False
        if self.killed or self.superseded:
            return
        self._online.set()
        if was_partitioned and self._call is not None:
            self._cut(0.0, "partition healed: new session")
        self._wake.set()

    @property
    def muted(self) -> bool:
        return self.partitioned or self.killed

    def fail_accelerator(self, index: int, reason: str) -> None:
        """Accelerator `index` failed: said in every heartbeat from now on, the next one at once."""
        self.failed_accelerators[index] = reason
        self._beat_now = True
        self._wake.set()

    def repair_accelerator(self, index: int | None = None) -> bool:
        """Accelerator `index` (None: every one) works again; False if none of those had failed."""
        gone = [i for i in self.failed_accelerators if index is None or i == index]
        for i in gone:
            del self.failed_accelerators[i]
        if gone:
            self._beat_now = True
            self._wake.set()
        return bool(gone)

    def fail_shard(self, key: ShardKey, message: str) -> bool:
        """The shard fails: FAILED with `message` is reported (False if this node does not hold it)."""
        report = self.agent.fail(key, message, self.clock())
        if report is None:
            return False
        self._send_reports([report])
        return True

    def _cut(self, offline_s: float, reason: str) -> None:
        """End the open stream on purpose (none open: nothing to cut; `kill` also stops the
        registration under way, see `_session`)."""
        if self._call is not None:
            self._crash_offline_s, self._crash_reason = offline_s, reason
            self._call.cancel()

    def _own_connection(self) -> tuple[tuple[str, int], ...]:
        """A channel of its own has a connection of its own, as a real agent on its server: gRPC
        core shares one connection among the channels of a process with the same target and
        options (its global subchannel pool), and a fleet of 2,000 nodes ran on one connection,
        with or without --shared-channel."""
        return () if self._shared_channels is not None else (("grpc.use_local_subchannel_pool", 1),)

    @property
    def heartbeat_delay_s(self) -> float:
        """Stretches the time between heartbeats (fault injection: `delay-heartbeats`)."""
        return self._heartbeat_delay_s

    @heartbeat_delay_s.setter
    def heartbeat_delay_s(self, delay_s: float) -> None:
        self._heartbeat_delay_s = delay_s
        self._wake.set()  # the pump reckons its next heartbeat again

    # --- main loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        channels: dict[str, grpc.aio.Channel] = self._shared_channels if self._shared_channels is not None else {}
        try:
            while not self._stopping.is_set():
                if not self._online.is_set():
                    await self._online.wait()  # revive(), heal() or stop() sets it
                    continue
                if self.controller not in channels:
                    channels[self.controller] = aio_channel(
                        self.controller, None, credentials=self.credentials,
                        options=(*limits.GRPC_CLIENT_OPTIONS, *limits.GRPC_FAILOVER_OPTIONS,
                                 *limits.AGENT_KEEPALIVE.client_options(), *self._own_connection()))
                stub = agent_pb2_grpc.NodeAgentServiceStub(channels[self.controller])
                delay: float | None = None
                problem = ""
                was_connected = unanswered = False
                try:
                    await self._session(stub)
                    problem = "stream closed by the controller"
                except grpc.aio.AioRpcError as exc:
                    was_connected = self.connected
                    unanswered = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    what = "register failed"
                    if self.connected:  # the controller's answer carries its Status (`retryinfo`); a break none
                        answered = controller_answered(exc.trailing_metadata())
                        what = "stream ended by the controller" if answered else "stream broke"
                    problem = f"{what}: {exc.code().name}: {exc.details()}"
                    if status_lost(exc):
                        problem = f"{what}: ended by the controller, its answer lost to grpcio's client (grpc#36066)"
                    if was_connected and superseded(exc):
                        self._give_way(problem)
                        continue
                    deleted = was_connected and exc.code() == grpc.StatusCode.NOT_FOUND
                    if (exc.code() == grpc.StatusCode.UNAUTHENTICATED or deleted) and self.node_credential:
                        await self._forget_credential()  # revoked (an admin reset it, or deleted the node): register afresh
                    # A controller busy with a join storm says when to come back; one starting, too,
                    # but with others to try the agent goes on to them (it leads no one yet).
                    told = retry_after_s(exc)
                    if told is None or (starting(exc) and len(self.controllers) > 1):
                        delay = self._follow(exc)
                    else:
                        delay = self.backoff.told(told)
                except _Crashed:
                    pass
                finally:
                    self.connected = False
                    self._call = None
                if self._stopping.is_set():
                    break
                if self._crash_offline_s is not None:
                    delay, self._crash_offline_s = self._crash_offline_s, None
                    if self._online.is_set():
                        self.log.warning("%s; reconnecting in %.2fs", self._crash_reason, delay)
                    else:
                        self.log.warning("%s", self._crash_reason)
                elif delay is None:
                    if was_connected or unanswered or problem == "stream closed by the controller":
                        # It may have died, hung (a Register it never answered) or stepped down:
                        # another first.
                        self._next_controller()
                    delay = self.backoff.next_delay()
                    self.log.warning("%s; reconnecting in %.1fs", problem, delay)
                else:
                    self.log.info("%s; trying %s in %.2fs", problem, self.controller, delay)
                await wait_event(self._stopping, delay)
        finally:
            if self._shared_channels is None:
                for channel in channels.values():
                    await channel.close(grace=None)
            self.log.info("stopped")

    def _give_way(self, problem: str) -> None:
        """A newer stream of this node took over (another agent of it): stop, not to take the node
        back (each Register and Hello of ours would end the other's stream, and its ours), until
        `revive()` or `stop()`."""
        self.superseded = True
        self._online.clear()
        self.log.error("%s; not reconnecting: another agent holds node %s (revive to take it back)",
                       problem, self.spec.node_id)

    def _follow(self, exc: grpc.aio.AioRpcError) -> float | None:
        """After an UNAVAILABLE with several controllers: switch to the leader a follower named, or
        to the next controller; the pause before trying (None: the usual back-off, same one)."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        leader = leader_hint(exc)
        if leader:
            if leader not in self.controllers:
                self.controllers.append(leader)  # the leader advertises an address we were not given
            self.controller = leader
            return self.backoff.rng.uniform(*REDIRECT_DELAY_S)
        if len(self.controllers) == 1:
            return None
        self._next_controller()
        return self.backoff.rng.uniform(*NO_LEADER_DELAY_S)

    def _next_controller(self) -> None:
        self.controller = self.controllers[(self.controllers.index(self.controller) + 1) % len(self.controllers)]

    def _auth(self) -> tuple[tuple[str, str], ...]:
        token = self.node_credential or self.token
        return bearer_metadata(token) if token else ()

    async def _keep_credential(self, credential: str) -> None:
        self.node_credential = credential
        if self.node_credentials is not None:
            await self.node_credentials.keep(self.spec.node_id, credential)

    async def _forget_credential(self) -> None:
        self.node_credential = None
        if self.node_credentials is not None:
            await self.node_credentials.drop(self.spec.node_id)

    async def _proposal(self) -> str:
        """The node credential this agent proposes while it has none. Minted once and kept until a
        Register succeeds, so a retry after a lost reply proves it is the same agent; written to the
        credential file before it is sent, so a restart in between recovers it too (a proposal the
        controller never stored is refused UNAUTHENTICATED and forgotten)."""
        if self._pending_proposal is None:
            self._pending_proposal = mint_token().text
            if self.node_credentials is not None:
                await self.node_credentials.keep(self.spec.node_id, self._pending_proposal)
        return self._pending_proposal

    async def _before_stop(self, call: asyncio.Future) -> bool:
        """Whether `call` ended before a stop; else it is cancelled (and waited for)."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({call, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this task cancelled: the call too (`asyncio.wait` leaves it running)
            call.cancel()
            raise
        finally:
            stopping.cancel()
        if call.done():
            return True
        await cancel_and_wait([call])
        return False

    async def _session(self, stub: agent_pb2_grpc.NodeAgentServiceStub) -> None:
        proposal = "" if self.node_credential else await self._proposal()
        asked = self.clock()
        register = asyncio.ensure_future(stub.Register(
            agent_pb2.RegisterRequest(node=self.spec.to_proto(), credential_proposal=proposal),
            timeout=self.register_timeout_s, metadata=self._auth()))
        if not await self._before_stop(register):  # a stop waited out --register-timeout of a hung controller
            raise _Crashed()
        try:
            registration = register.result()
        except grpc.aio.AioRpcError as exc:
            self.register_failures[exc.code().name] += 1
            raise
        self.register_latencies_s.append(self.clock() - asked)
        if registration.node_credential or proposal:  # a controller that minted one itself says it
            await self._keep_credential(registration.node_credential or proposal)
            self._pending_proposal = None
        if not self._online.is_set():  # killed or partitioned while registering
            raise _Crashed()
        self.session_id = registration.session_id
        interval = self.heartbeat_override_s or (registration.heartbeat_interval_ms / 1000) or DEFAULT_HEARTBEAT_S
        self.heartbeat_interval_s = interval
        self.agent.begin_session()
        self.sessions += 1
        outbox: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox
        outbox.put_nowait(protocol.hello(self.spec.node_id, self.session_id, self.heartbeat_interval_s))
        if self._stopping.is_set():
            outbox.put_nowait(_CLOSE)
        call = stub.Connect(self._outbound(outbox), metadata=self._auth())
        self._call = call
        self.connected = True
        self.log.info("registered and connected (session %s, heartbeat every %.1fs)", self.session_id, interval)
        started = self.clock()
        pump = asyncio.create_task(self._pump(outbox), name=f"pump-{self.spec.node_id}")
        reader = asyncio.create_task(self._read(call), name=f"read-{self.spec.node_id}")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set() and not reader.done():
                # Half-closed by stop(): give the controller a moment to end the stream itself.
                await asyncio.wait({reader}, timeout=STOP_GRACE_S)
            if reader.done():
                reader.result()
        except asyncio.CancelledError:
            if self._crash_offline_s is not None:
                raise _Crashed() from None
            raise
        finally:
            for task in (pump, reader, stopping):
                task.cancel()
            await asyncio.gather(pump, reader, stopping, return_exceptions=True)
            if not call.done():
                call.cancel()
            # gRPC reads the requests from `_outbound(outbox)` in a task of its own, which a call
            # the controller ended (it died, it failed over) does not stop: closed, it ends, rather
            # than waiting on the outbox until destroyed pending at a collection.
            outbox.put_nowait(_CLOSE)
            self._outbox = None
            if self.clock() - started > 10 * interval:
                self.backoff.reset()
        if self._crash_offline_s is not None:
            raise _Crashed()

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        sets = 0
        async for message in call:
            if self.muted:
                continue
            body = message.WhichOneof("body")
            if body == "assignments":
                # A second set: the controller took what the stream sent (its first comes before it
                # reads a report). Reset at the first, a stream ended at once for what the agent
                # reports (a heartbeat refused) was tried again every half second for ever.
                sets += 1
                if sets > 1:
                    self.backoff.reset()
                self._apply(message.assignments)
            elif body == "shard_state_request":
                self._state_asked = True
            elif body == "heartbeat_policy":
                self._adopt(message.heartbeat_policy.heartbeat_interval_ms)

    def _adopt(self, interval_ms: int) -> None:
        """The controller tells a new heartbeat interval (the cluster grew): beat at it from the
        next heartbeat on, unless `--heartbeat-interval` fixed ours."""
        if self.heartbeat_override_s or interval_ms <= 0:
            return
        self.heartbeat_interval_s = interval_ms / 1000
        self.log.debug("heartbeat every %.1fs from now on (told by the controller)", self.heartbeat_interval_s)

    def _apply(self, message: agent_pb2.AssignmentSet) -> None:
        desired = protocol.desired_from_proto(message)
        before = self.agent.stale_ignored
        reports = self.agent.apply(desired, self.clock())
        if self.agent.stale_ignored > before:
            self.log.info("ignored stale assignment set generation %d (have %s)",
                          desired.generation, self.agent.last_generation)
            return
        self.log.debug("assignment set generation %d: %d shards", desired.generation, len(desired.shards))
        self._send_reports(reports)
        self._wake.set()

    def _send_reports(self, reports: list[ShardReport]) -> None:
        logged = self.log.isEnabledFor(logging.INFO)
        for report in reports:
            if logged:
                self.log.info("%s %s%s (generation %d)", report.key, report.phase.value,
                              self._where(report), report.generation)
            if self._outbox is not None and not self.muted:
                self._outbox.put_nowait(protocol.shard_status(report))

    def _where(self, report: ShardReport) -> str:
        """' on accelerators 0,1' or ' on accelerator 2 (500m)' for loading shards."""
        desired = self.agent.desired_of(report.key)
        if report.phase is not Phase.LOADING or desired is None or not desired.accelerator_indices:
            return ""
        noun = "accelerators" if len(desired.accelerator_indices) > 1 else "accelerator"
        share = f" ({desired.accelerator_milli}m)" if 0 < desired.accelerator_milli < 1000 else ""
        return f" on {noun} {','.join(map(str, desired.accelerator_indices))}{share}"

    async def _outbound(self, outbox: asyncio.Queue) -> AsyncIterator[agent_pb2.AgentMessage]:
        while True:
            message = await outbox.get()
            if message is _CLOSE:
                return
            yield message

    async def _pump(self, outbox: asyncio.Queue) -> None:
        """Heartbeats every `heartbeat_interval_s` (as it is now), and load completions as soon as
        they are due. A heartbeat
        carries the full shard state first on a stream, when it changed since the last one that
        carried it, and when the controller asked for it; else it names that state's version."""
        seq = 0
        sent_version: int | None = None
        self._state_asked = False
        last_beat: float | None = None
        while True:
            now = self.clock()
            self._send_reports(self.agent.tick(now))
            # From the last heartbeat, with the interval and the delay as they are now: a delay
            # ended (revive, its --for run out) counted only from the heartbeat it had put off.
            next_heartbeat = now if last_beat is None else \
                last_beat + self.heartbeat_interval_s + self.heartbeat_delay_s
            if now >= next_heartbeat or self._beat_now:
                self._beat_now = False
                if not self.muted:
                    seq += 1
                    version = self.agent.state_version
                    full = self._state_asked or version != sent_version
                    outbox.put_nowait(protocol.heartbeat(seq, self.agent.power_draw_w(),
                                                         self.agent.reports() if full else None, version,
                                                         self.failed_accelerators))
                    if full:
                        sent_version, self._state_asked = version, False
                    self.heartbeats_sent += 1
                last_beat = now
                next_heartbeat = now + self.heartbeat_interval_s + self.heartbeat_delay_s
            due = self.agent.next_deadline()
            wake_at = min(next_heartbeat, due if due is not None else math.inf)
            self._wake.clear()
            await wait_event(self._wake, wake_at - self.clock())

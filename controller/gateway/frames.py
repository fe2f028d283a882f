"""What both ends of a gateway's link share: the frame batching, the flow control of a relayed
call's requests, and the metadata and status conversions of `proto/maia/v1/relay.proto`.

Both directions of a relayed call are flow-controlled as gRPC's HTTP/2 windows control a call on
the controller's port, so that an agent the controller does not keep up with waits in its own
transport, not in a buffer of the gateway or the controller. Responses: the controller sends a
call at most `relay.RELAY_WINDOW` of them ahead of those the gateway says the agent's transport
took. Requests: the gateway reads no more of an agent's stream while `REQUEST_WINDOW_BYTES` of it
are ahead of what the controller says the call's handler took (`RelayEvent.taken` on the call,
in bytes, told each `REQUEST_TAKEN_TOLD_BYTES`), nor while its link is behind (the gateway's
`Outbox` over `OUTBOX_BYTES_MAX` or `OUTBOX_EVENTS_MAX`: its pumps wait their turn,
`Outbox.message_in_turn`); HTTP/2 then holds the agent back at the gateway's port.

None of this can deadlock, because what frees each wait never waits on what it frees: each end
reads its side of the link without ever waiting (a frame's events are queued, pushed or counted
in the call that reads it), so the link drains whatever its calls do, and with it a full outbox;
control events (a call's opening, its end or cancel, `taken` both ways, statuses) are added
without waiting, so a pump waiting for the outbox never holds back the credit that would free a
call's window (at worst they queue behind the messages, which leave; the link's pings and their
answers do not even queue: `Outbox.add_first`); the controller tells what a handler took before
what it has not told reaches a window (`REQUEST_TAKEN_TOLD_BYTES` is at most
`REQUEST_WINDOW_BYTES`), so a call's window is never closed on requests its handler already took;
and one call's window waits only on its own handler, the outbox on the link alone."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import fields
from typing import NamedTuple

import grpc

from controller import limits
from controller.aio import Wakeup
from maia.v1 import relay_pb2

RELAY_METHOD = "/maia.v1.AgentRelay/Relay"
GATEWAY_METADATA_KEY = "maia-gateway"  # the Relay call's metadata: the gateway's name
GATEWAY_PID_METADATA_KEY = "maia-gateway-pid"  # ... and its process id (the controller kills a hung one)
# The link's own call id (the gateway numbers agent calls from 1). The controller's `end` event on
# it closes the link: every relayed call's status was sent before it, and the gateway answers by
# ending its side of the stream; the controller's stream ends only then, so the relay server's
# stop cannot close the connection on frames the gateway has not read yet.
LINK_CALL = 0
# A frame is sent once it holds this many events or bytes of messages, whatever the linger.
FRAME_EVENTS_MAX = 1024
FRAME_BYTES_MAX = 4 * 1024 * 1024
# The link's messages may be large (many sets a frame); it is private to one host.
LINK_MESSAGE_BYTES_MAX = 256 * 1024 * 1024
LINK_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", LINK_MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", LINK_MESSAGE_BYTES_MAX),
)
# Each end of the link also pings the other (HTTP/2 keepalive, the agents' settings: the controller's
# `agent_keepalive`, given to its gateways with `--keepalive`): a peer that stopped answering (a
# process stopped or hung, not exited: its socket stays open) is found in `*_time_ms + *_timeout_ms`
# and the link ends as for one that died. The controller then kills a gateway that does not exit
# (`children.GatewayProcesses.link_lost`); a gateway whose controller hung exits (its agents go on
# to the next controller). A server of the link must permit the gateway's pings (the same
# `Keepalive`'s `server_options()`): gRPC's default, one every 5 min, ends a quiet link with
# GOAWAY too_many_pings after ~1 min.

KEEPALIVE_FIELDS = tuple(field.name for field in fields(limits.Keepalive))

# --- the link's own pings (`RelayEvent.ping`, answered `pong`, on `LINK_CALL`) --------------------
# gRPC's core answers HTTP/2 pings while its process's event loop is stuck (a blocking call, a task
# that never yields): a gateway so stuck kept its link, and its agents' streams hung until their
# heartbeats timed out (nodes suspect, then down, then their work evicted). So the controller also
# pings each link in the relay protocol, and the gateway's loop answers: a gateway that leaves a
# ping unanswered past the timeout loses its link as one whose transport stopped answering (killed
# if it does not exit, and started again: `children.GatewayProcesses.link_lost`); a gateway that
# hears no ping for as long ends its link and exits, as for a controller gone (its agents go on to
# the next controller). Both ends take the times from the same `Keepalive` (the controller's
# `agent_keepalive`, the gateway's `--keepalive`), `link_ping_times`: the timeout is the keepalive's
# `server_timeout_ms` (10 s: what the controller gives any peer's transport to answer a ping), at
# least `LINK_PING_TIMEOUT_MIN_S`, 5 s (a loop's own pauses, a collection over a heap of 16,384
# streams or a loaded host, are no stuck loop, whatever keepalive timeout an operator shortened),
# and a ping goes every quarter of it (2.5 s; an event of a few bytes). A wait is judged at each
# ping, and lost only when it reached the timeout at two in a row (the link's reader had a turn
# between, as `AgentHub._expire` judges its streams' silence); a judge whose own turn came half an
# interval late or more (`late`: its loop stalled, and what it waits for may have arrived unread)
# gives no verdict then, and its next judgement counts as a first (`_Overdue.excused`). Found
# 12.5-15 s after the loop stuck. The gateway is then killed after `children.STUCK_GRACE_S` (1 s:
# its loop cannot use the stop's grace, which grows to 20 s with its streams) and started again
# (1 s): its agents are back within ~20 s, before `--node-down-grace` (30 s) marks their nodes down.
# A ping and its answer go ahead of the events waiting in the outbox, whatever its bounds
# (`Outbox.add_first`): a link's backlog of data never makes a live peer look stuck.
#
# Events an end does not know (a field of a later relay.proto): protobuf keeps them as unknown
# fields, and `WhichOneof("body")` is None. The controller ignores them (as any event on a call it
# does not hold); the gateway ignores them on an agent's call and on `LINK_CALL` (where it acts on
# `end` and `ping` only; gateways before the pings ended the link on any event there, so they must
# not be sent a ping). And a gateway exits when no ping comes, so a controller that does not ping
# cannot keep one. Neither arises: the controller starts its gateways from its own install
# (`python -m controller.gateway` of its interpreter), giving them its keepalive as `--keepalive`.
LINK_PINGS_PER_TIMEOUT = 4
LINK_PING_TIMEOUT_MIN_S = 5.0


class PingTimes(NamedTuple):
    interval_s: float  # the controller pings each link this often (the gateway judges its silence as often)
    timeout_s: float   # an unanswered ping, or no ping heard, for this long (at two judgements in a row): lost


def link_ping_times(keepalive: limits.Keepalive = limits.AGENT_KEEPALIVE) -> PingTimes:
    """The link's ping times at both ends, from the keepalive both are given (the note above)."""
    timeout_s = max(keepalive.server_timeout_ms / 1000, LINK_PING_TIMEOUT_MIN_S)
    return PingTimes(interval_s=timeout_s / LINK_PINGS_PER_TIMEOUT, timeout_s=timeout_s)

# --- a relayed call's requests (gateway -> controller) ------------------------------------------
# A request counts for its bytes and this many more: about what holding one costs beyond its bytes
# (its bytes object and queue slot, its event in a frame), so that a window of tiny messages (an
# omitted-shards heartbeat is ~20 bytes) does not let hundreds of thousands of them go ahead.
REQUEST_OVERHEAD_BYTES = 64
# A call's requests the gateway sends ahead of those its handler in the controller took, in the
# bytes `request_weight` counts. The gateway reads the agent's next message only while less than
# this is ahead (so at most this and one message, <= limits.MAX_RECEIVE_MESSAGE_BYTES, are: under
# limits.RELAYED_UNREAD_BYTES_MAX, which a well-behaved gateway never reaches); past it HTTP/2
# holds the agent back at the gateway's port as it does at the controller's (~4.6 MiB there).
# A normal agent never waits on it: the hub takes a stream's messages as their frame arrives
# (`relay.RelayedRequests.push_to`), so only those in flight are ahead, and even the largest burst
# the hub accepts at once (limits.REPORTS_BURST: a full node's 4,096 shards reported LOADING and
# then RUNNING, ~60-175 bytes each, and a full heartbeat, ~0.2-0.7 MiB: at most ~2.6 MiB weighed,
# names at their longest) fits beside what the controller has not told yet (< REQUEST_TAKEN_TOLD_BYTES).
REQUEST_WINDOW_BYTES = 8 * 1024 * 1024
# The controller tells the gateway what a call's handler took once it weighs this much (one
# `taken` event per MiB of a stream, not one per message: an idle agent's heartbeats add none).
# At most the window: a gateway whose call's handler took everything is never held back.
REQUEST_TAKEN_TOLD_BYTES = 1024 * 1024
# The gateway's outbox (events for its link) past which its agents' streams wait their turn
# (`Outbox.message_in_turn`): a link slower than its agents (the controller's loop busy) holds
# the agents back instead of growing the gateway's memory. Four full frames, or sixteen of events.
OUTBOX_BYTES_MAX = 4 * FRAME_BYTES_MAX
OUTBOX_EVENTS_MAX = 16 * FRAME_EVENTS_MAX


def request_weight(data: bytes) -> int:
    """What a request counts for in its call's window (`REQUEST_WINDOW_BYTES`), at both ends."""
    return len(data) + REQUEST_OVERHEAD_BYTES


def link_server_options(keepalive: limits.Keepalive = limits.AGENT_KEEPALIVE) -> tuple[tuple[str, int], ...]:
    """The options of a server of the link (the controller's), its gateways pinging as `keepalive` says."""
    return (*LINK_OPTIONS, *keepalive.server_options())

Metadata = tuple[tuple[str, str | bytes], ...]
_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class Arrivals:
    """One relayed call's messages as they arrive from the link, taken in order by the task that
    serves the call, until the call ends (at either end of the link: a call's requests in the
    controller, its responses in the gateway).

    The queue exists only while messages wait in it: an agent stream is idle between its messages
    (and a pushed one's requests never wait), and an empty deque is ~0.6 KiB, ~10 MiB at 16,384
    streams at each end of the link."""

    __slots__ = ("_messages", "_ended", "_arrived", "waiting_bytes")

    def __init__(self) -> None:
        self._messages: deque[bytes] | None = None
        self._ended = False
        self._arrived = Wakeup()
        self.waiting_bytes = 0  # of the messages not taken yet

    @property
    def ended(self) -> bool:
        return self._ended

    def put(self, data: bytes) -> None:
        if self._messages is None:
            self._messages = deque()
        self._messages.append(data)
        self.waiting_bytes += len(data)
        self._arrived.set()

    def end(self) -> None:
        self._ended = True
        self._arrived.set()

    def take_waiting(self) -> list[bytes]:
        """The messages not taken yet, all taken now."""
        waiting, self._messages = list(self._messages or ()), None
        self.waiting_bytes = 0
        return waiting

    async def next(self) -> bytes | None:
        """The next message, or None once the call has ended and every message was taken."""
        while not self._messages:
            if self._ended:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        data = self._messages.popleft()
        self.waiting_bytes -= len(data)
        if not self._messages:
            self._messages = None
        return data


class Outbox:
    """Events to send on a link, sent as frames: the first event of a frame waits at most
    `linger_s` for others to join it (0: those added in the same turn of the event loop), and a
    frame of `FRAME_EVENTS_MAX` events or `FRAME_BYTES_MAX` bytes goes at once. A frame holds no
    more (or a single event past the bytes): the events added while the link was busy go as as
    many frames as they fill. One frame of all of them could pass the link's message limit, and
    the link failed: every agent on the gateway lost its stream (agents without a token sending
    4 MiB messages at once did it; the gateway reads no message).

    Bounded (`bytes_max`, `events_max`: the gateway's, `OUTBOX_BYTES_MAX`), the messages of
    producers that wait their turn (`message_in_turn`: the gateway's pumps of its agents'
    streams, and a Register's one request) go in only while the events not yet sent are under
    both bounds, in the order the producers came (one woken at a time as frames leave, not every
    waiter at each frame); so a slow link holds the agents back, and the outbox holds at most its
    bounds and one message. Events added otherwise (`add`, `message`: a call's opening, its end
    or cancel, `taken`) never wait, so nothing that frees the link or a window is ever held
    behind the producers it would free; the link's pings and their answers (`add_first`) go
    ahead of every event waiting."""

    def __init__(self, linger_s: float, *, bytes_max: int | None = None, events_max: int | None = None) -> None:
        self._linger_s = linger_s
        self._events: deque[tuple[relay_pb2.RelayEvent, int]] = deque()  # with its message's size
        self._bytes = 0
        self._bytes_max = bytes_max
        self._events_max = events_max
        # The messages of the producers waiting their turn (`message_in_turn`), each with its future.
        self._waiting: deque[tuple[asyncio.Future[None], relay_pb2.RelayEvent, int]] = deque()
        self._ready = Wakeup()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.frames_sent = 0
        self.events_sent = 0

    @property
    def over_bound(self) -> bool:
        """The events not yet sent reach `bytes_max` or `events_max`."""
        return ((self._bytes_max is not None and self._bytes >= self._bytes_max)
                or (self._events_max is not None and len(self._events) >= self._events_max))

    @property
    def producers_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queued_bytes(self) -> int:
        """The bytes of the messages added and not yet sent (those waiting their turn aside)."""
        return self._bytes

    def add(self, event: relay_pb2.RelayEvent, size: int = 0) -> None:
        if self._closed:
            return
        self._events.append((event, size))
        self._bytes += size
        if len(self._events) >= FRAME_EVENTS_MAX or self._bytes >= FRAME_BYTES_MAX:
            self._send_now()
        elif self._timer is None and not self._ready.is_set:
            loop = asyncio.get_running_loop()
            self._timer = (loop.call_later(self._linger_s, self._send_now) if self._linger_s > 0
                           else loop.call_soon(self._send_now))

    def add_first(self, event: relay_pb2.RelayEvent) -> None:
        """An event of the link itself (a ping, its answer): in the next frame, ahead of the
        events waiting, whatever the bounds, and without lingering; nothing once closed."""
        if self._closed:
            return
        self._events.appendleft((event, 0))
        self._send_now()

    def message(self, call: int, data: bytes) -> None:
        self.add(relay_pb2.RelayEvent(call=call, message=data), len(data))

    async def message_in_turn(self, call: int, data: bytes) -> None:
        """`message`, once the outbox is under its bounds and the messages that waited before this
        one went in: the caller reads no more of its source meanwhile. Cancelled while it waits,
        its message is not sent (its call is gone); once the outbox is closed, nothing is."""
        if self._closed:
            return
        self._let_in_waiting()  # (those of cancelled producers gone: none left ahead of it for nothing)
        if not self._waiting and not self.over_bound:
            self.message(call, data)
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((turn, relay_pb2.RelayEvent(call=call, message=data), len(data)))
        await turn

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more frames: `frames` ends once the events added before are sent (the messages still
        waiting their turn are dropped, their producers let go)."""
        self._closed = True
        for turn, _, _ in self._waiting:
            if not turn.done():
                turn.set_result(None)
        self._waiting.clear()
        self._send_now()

    def _let_in_waiting(self) -> None:
        """The messages waiting their turn, in order, while the outbox is under its bounds."""
        waiting = self._waiting
        while waiting and not self.over_bound:
            turn, event, size = waiting.popleft()
            if turn.done():  # its producer was cancelled: its call is gone
                continue
            self._events.append((event, size))
            self._bytes += size
            turn.set_result(None)

    def _send_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ready.set()

    def _take_frame(self) -> list[relay_pb2.RelayEvent]:
        """The oldest events that fit a frame (at least one), taken (from the left of a deque: a
        backlog of many frames drains in time linear in its events)."""
        events: list[relay_pb2.RelayEvent] = []
        size = 0
        queued = self._events
        while queued and len(events) < FRAME_EVENTS_MAX and (not events or size + queued[0][1] <= FRAME_BYTES_MAX):
            event, event_size = queued.popleft()
            events.append(event)
            size += event_size
        self._bytes -= size
        if self._waiting:
            self._let_in_waiting()
        return events

    async def frames(self) -> AsyncIterator[relay_pb2.RelayFrame]:
        while True:
            await self._ready.wait()
            self._ready.clear()
            events = self._take_frame()
            if self._events:  # more than a frame was waiting: the next goes at once
                self._ready.set()
            if events:
                self.frames_sent += 1
                self.events_sent += len(events)
                yield relay_pb2.RelayFrame(events=events)
            if self._closed and not self._events:
                return


def to_relayed(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[relay_pb2.RelayMetadatum]:
    return [relay_pb2.RelayMetadatum(key=key, value=value if isinstance(value, bytes) else value.encode())
            for key, value in metadata or ()]


def from_relayed(metadata: Sequence[relay_pb2.RelayMetadatum]) -> Metadata:
    """Back to gRPC's pairs: binary keys (`-bin`) keep bytes, the others are text."""
    return tuple((m.key, m.value if m.key.endswith("-bin") else m.value.decode(errors="replace")) for m in metadata)


def status_event(call: int, code: grpc.StatusCode, details: str = "",
                 trailing_metadata: Iterable[tuple[str, str | bytes]] | None = None) -> relay_pb2.RelayEvent:
    return relay_pb2.RelayEvent(call=call, status=relay_pb2.RelayStatus(
        code=code.value[0], details=details, trailing_metadata=to_relayed(trailing_metadata)))


def link_end_event() -> relay_pb2.RelayEvent:
    return relay_pb2.RelayEvent(call=LINK_CALL, end=relay_pb2.RelayEnd())


def ping_event(number: int) -> relay_pb2.RelayEvent:
    return relay_pb2.RelayEvent(call=LINK_CALL, ping=number)


def pong_event(number: int) -> relay_pb2.RelayEvent:
    return relay_pb2.RelayEvent(call=LINK_CALL, pong=number)


class _Overdue:
    """A wait judged against a timeout: lost when it reached it at this judgement and the one
    before (between them the link's reader had a turn: after the judge's own loop stalled, what it
    waits for may have arrived and not been read yet)."""

    __slots__ = ("timeout_s", "_before")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._before = False

    def judged(self, waited_s: float) -> bool:
        overdue = waited_s >= self.timeout_s
        lost, self._before = overdue and self._before, overdue
        return lost

    def excused(self) -> None:
        """The judge's own loop stalled (its turn came late by half an interval or more: `late`):
        this turn is no judgement, and the next counts as a first (the reader has had no turn since
        what it waits for may have arrived). A judge lagging that much at every turn never finds the
        other end lost: it is itself in trouble, and its peer's verdict on it is the one to trust."""
        self._before = False


def late(expected: float | None, now: float, interval_s: float) -> bool:
    """Whether a judge's turn due at `expected` (None: its first) came half an interval late or more."""
    return expected is not None and now - expected >= interval_s / 2


class LinkPings:
    """The controller's pings on one link: those its gateway has not answered yet (an answer
    answers every ping up to its number), and whether the gateway is lost (`lost`: its oldest
    unanswered ping waited the timeout at two judgements in a row)."""

    __slots__ = ("_overdue", "_sent", "_unanswered")

    def __init__(self, timeout_s: float) -> None:
        self._overdue = _Overdue(timeout_s)
        self._sent = 0
        self._unanswered: deque[tuple[int, float]] = deque()  # number, sent at

    def send(self, now: float) -> int:
        """The next ping's number, sent at `now`."""
        self._sent += 1
        self._unanswered.append((self._sent, now))
        return self._sent

    def answered(self, number: int) -> None:
        unanswered = self._unanswered
        while unanswered and unanswered[0][0] <= number:
            unanswered.popleft()

    def waited_s(self, now: float) -> float:
        """How long the oldest unanswered ping has waited (0: none)."""
        return now - self._unanswered[0][1] if self._unanswered else 0.0

    def lost(self, now: float) -> bool:
        """Judge the link at `now` (once a ping interval)."""
        return self._overdue.judged(self.waited_s(now))

    def excused(self) -> None:
        self._overdue.excused()


class PingsHeard:
    """The gateway's watch on its controller's pings: lost when none was heard for the timeout at
    two judgements in a row (a link's start counts as one heard)."""

    __slots__ = ("_overdue", "_heard_at")

    def __init__(self, timeout_s: float, now: float) -> None:
        self._overdue = _Overdue(timeout_s)
        self._heard_at = now

    def heard(self, now: float) -> None:
        self._heard_at = now

    def silent_s(self, now: float) -> float:
        return now - self._heard_at

    def lost(self, now: float) -> bool:
        """Judge the link at `now` (once a ping interval)."""
        return self._overdue.judged(self.silent_s(now))

    def excused(self) -> None:
        self._overdue.excused()


def status_code(status: relay_pb2.RelayStatus) -> grpc.StatusCode:
    return _CODES.get(status.code, grpc.StatusCode.UNKNOWN)


def keepalive_text(keepalive: limits.Keepalive) -> str:
    """The gateway's `--keepalive`: `limits.Keepalive`'s fields in order, in ms, comma-separated."""
    return ",".join(str(getattr(keepalive, name)) for name in KEEPALIVE_FIELDS)


def keepalive_from_text(text: str) -> limits.Keepalive:
    """`keepalive_text`'s inverse; ValueError for anything else."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(KEEPALIVE_FIELDS) or min(values) <= 0:
        raise ValueError(f"expected {len(KEEPALIVE_FIELDS)} positive integers ({','.join(KEEPALIVE_FIELDS)}), "
                         f"got {text!r}")
    return limits.Keepalive(*values)

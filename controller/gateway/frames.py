"""What both ends of a gateway's link share: the frame batching and the metadata and status
conversions of `proto/maia/v1/relay.proto`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import fields

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
    4 MiB messages at once did it; the gateway reads no message)."""

    def __init__(self, linger_s: float) -> None:
        self._linger_s = linger_s
        self._events: deque[tuple[relay_pb2.RelayEvent, int]] = deque()  # with its message's size
        self._bytes = 0
        self._ready = Wakeup()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.frames_sent = 0
        self.events_sent = 0

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

    def message(self, call: int, data: bytes) -> None:
        self.add(relay_pb2.RelayEvent(call=call, message=data), len(data))

    def close(self) -> None:
        """No more frames: `frames` ends once the events added before are sent."""
        self._closed = True
        self._send_now()

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

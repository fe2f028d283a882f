"""The controller's end of a gateway's link: each relayed call served as if it had come to the port.

`RelayServicer.Relay` is one gateway's link. A relayed call (`RelayOpen`: the method, the agent's
metadata, its peer, its time left) is handed to the method's handler as built by the controller's
interceptor chain (`method_handlers`: load shedding, authentication, metrics, logging, errors,
audit, around `NodeAgentServicer`), with a `RelayedContext` standing for gRPC's: the chain reads
the agent's metadata and peer from it, and its aborts become the call's status. So an agent without
a valid token is refused UNAUTHENTICATED with today's message, a follower answers UNAVAILABLE with
the leader's address, and a Connect stream feeds `AgentHub.converse` as on the port, its requests
pushed to the hub as each frame arrives (`RelayedRequests.push_to`: no task woken a message). What
a call's handler took of its requests (read or pushed) is told to the gateway (`RelayEvent.taken`,
each `REQUEST_TAKEN_TOLD_BYTES`), whose window keeps the agent from sending more than
`REQUEST_WINDOW_BYTES` ahead of it: a handler that reads slowly holds its agent back as on the port
(`limits.RELAYED_UNREAD_BYTES_MAX`, past which the call ends RESOURCE_EXHAUSTED, stays as a
backstop no gateway that keeps its window reaches). A call the gateway says is gone
(`RelayEnd.cancelled`) is cancelled as gRPC cancels the handler of a call whose connection died;
the link ending cancels every call of its gateway. The controller's stop ends the links itself
(`RelayServicer.end_links`): once a link's calls have sent their statuses (the hub ended their
streams) it sends the link's end (`LINK_CALL`), and its stream ends when the gateway, having read
it, ended its side: every status reached the gateway before the relay server's stop closes the
connection (ending the stream at once let that close drop the last frames: the gateway then ended
its agents' streams UNAVAILABLE instead of with the controller's status). The gateway ends what is
left of its agents' calls as for a controller gone and exits, and the relay server's stop does not
wait out its grace for links that would otherwise end only when cancelled. A link lost otherwise
(its gateway died, or hung and stopped answering the link's keepalive pings, or its event loop
stuck and stopped answering the relay's own pings, `RelayEvent.ping`, which gRPC's core does not
answer for it: `frames.link_ping_times`) is told to `RelayServicer.link_lost` with the gateway's
pid, which its Relay call's metadata carries: the controller kills a gateway that does not exit
then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from grpc import aio

from controller import limits
from controller.aio import Wakeup
from controller.gateway.frames import (
    GATEWAY_METADATA_KEY,
    GATEWAY_PID_METADATA_KEY,
    LINK_CALL,
    REQUEST_TAKEN_TOLD_BYTES,
    Arrivals,
    LinkPings,
    Metadata,
    Outbox,
    PingTimes,
    from_relayed,
    late,
    link_end_event,
    link_ping_times,
    ping_event,
    request_weight,
    status_event,
)
from maia.v1 import agent_pb2_grpc, relay_pb2, relay_pb2_grpc

log = logging.getLogger("maia.gateway")

# Responses of one relayed call sent ahead of those its gateway says the agent's transport took
# (`RelayEvent.taken`): past them the call's handler waits, as gRPC's write waits on the port for
# an agent that does not read (the hub's stream then coalesces its sets). Without it every set was
# pulled at once and queued in the gateway for as long as the agent did not read.
RELAY_WINDOW = 8
# How long the link's end waits for its gateway to end its side of the stream (it does as soon as
# it reads the end; bounded for a gateway that is stuck: the relay server's stop grace bounds it too).
LINK_END_READ_TIMEOUT_S = 5.0
# The status of the Relay call of a gateway that left a ping unanswered past the timeout (`_ping`).
PINGS_UNANSWERED = "the agent gateway answered no ping on its link in time: its event loop is stuck"


class _Details(NamedTuple):
    """What an interceptor is told of a call when it builds the method's handler."""

    method: str
    invocation_metadata: Metadata = ()


class _Collector:
    """Takes the method handlers a generated `add_*Servicer_to_server` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.handlers.update({f"/{service}/{name}": handler for name, handler in handlers.items()})


async def method_handlers(servicer: agent_pb2_grpc.NodeAgentServiceServicer,
                          interceptors: Sequence[aio.ServerInterceptor]) -> dict[str, grpc.RpcMethodHandler]:
    """NodeAgentService's handlers, each wrapped by `interceptors` (outermost first) as the gRPC
    server wraps them for a call on the port (every interceptor of the controller builds a
    method's handler from its name alone: `interceptors.BuiltOncePerMethod`)."""
    collector = _Collector()
    agent_pb2_grpc.add_NodeAgentServiceServicer_to_server(servicer, collector)

    async def built(level: int, details: Any, raw: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if level == len(interceptors):
            return raw
        return await interceptors[level].intercept_service(lambda inner: built(level + 1, inner, raw), details)

    return {method: await built(0, _Details(method), raw) for method, raw in collector.handlers.items()}


class RelayedContext:
    """What the chain and the servicer read of a relayed call (a `grpc.aio.ServicerContext`'s
    part they use): the agent's metadata and peer, the time left, and the status an abort sets."""

    def __init__(self, opened: relay_pb2.RelayOpen, gateway: str) -> None:
        self._metadata = from_relayed(opened.metadata)
        self._peer = f"{opened.peer} (via {gateway})"
        self._deadline = time.monotonic() + opened.timeout_s if opened.timeout_s > 0 else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificate crosses a gateway (mutual TLS is refused with gateways)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise aio.AbortError(f"relayed call aborted with {code.name}")

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing


class RelayedRequests:
    """A relayed call's requests, each parsed by the chain's deserializer (a malformed one reaches
    the chain's check as on the port): read by its handler (an async iterator), or pushed to it as
    the link takes them (`push_to`, `controller.aio.PushedStream`: the agent hub takes a stream's
    messages so, with no task woken a message). `told`, if given, is told the `request_weight` of
    those its handler took, once they weigh `REQUEST_TAKEN_TOLD_BYTES` (the gateway's window)."""

    __slots__ = ("arrivals", "_parse", "_take", "_ended", "_told", "_untold")

    def __init__(self, parse: Callable[[bytes], Any] | None, told: Callable[[int], None] | None = None) -> None:
        self.arrivals = Arrivals()
        self._parse = parse
        self._take: Callable[[Any], None] | None = None  # pushing to it (None: read)
        self._ended: Callable[[BaseException | None], None] = _ignored
        self._told = told
        self._untold = 0  # the weight of those taken and not told yet

    def __aiter__(self) -> RelayedRequests:
        return self

    async def __anext__(self) -> Any:
        data = await self.arrivals.next()
        if data is None:
            raise StopAsyncIteration
        self._taken(data)
        return data if self._parse is None else self._parse(data)

    def _taken(self, data: bytes) -> None:
        if self._told is not None:
            self._untold += request_weight(data)
            if self._untold >= REQUEST_TAKEN_TOLD_BYTES:
                self._told(self._untold)
                self._untold = 0

    def put(self, data: bytes) -> None:
        """A request from the link."""
        take = self._take
        if take is None:
            self.arrivals.put(data)
        elif take is not _ignored:
            self._taken(data)
            try:
                take(data if self._parse is None else self._parse(data))
            except Exception as exc:  # the consumer's refusal ends its reading, as a read's would
                self._finish(exc)

    def end(self) -> None:
        """The agent half-closed the call."""
        if self._take is None:
            self.arrivals.end()
        elif self._take is not _ignored:
            self._finish(None)

    def push_to(self, take: Callable[[Any], None], ended: Callable[[BaseException | None], None]) -> Callable[[], None]:
        self._take, self._ended = take, ended
        for data in self.arrivals.take_waiting():
            if self._take is _ignored:
                break
            self.put(data)
        if self.arrivals.ended and self._take is not _ignored:
            self._finish(None)
        return self._stop

    def _finish(self, error: BaseException | None) -> None:
        ended = self._ended
        self._stop()
        ended(error)

    def _stop(self) -> None:
        self._take, self._ended = _ignored, _ignored


def _ignored(_: Any) -> None:
    """What a stream's requests go to once its consumer stopped taking them."""


class _Credit:
    """A relayed call's responses sent and not yet taken by the agent's transport."""

    __slots__ = ("ahead", "taken")

    def __init__(self) -> None:
        self.ahead = 0
        self.taken = Wakeup()

    def take(self, count: int) -> None:
        self.ahead = max(0, self.ahead - count)
        self.taken.set()

    async def sent(self) -> None:
        """One more response sent: wait while `RELAY_WINDOW` are ahead."""
        self.ahead += 1
        while self.ahead >= RELAY_WINDOW:
            self.taken.clear()
            await self.taken.wait()


class _Call(NamedTuple):
    requests: RelayedRequests
    credit: _Credit
    task: asyncio.Task[None]
    context: RelayedContext


class _Link:
    """One gateway's link: its relayed calls by the gateway's ids."""

    def __init__(self, name: str, handlers: Mapping[str, grpc.RpcMethodHandler], outbox: Outbox,
                 ping_timeout_s: float = link_ping_times().timeout_s) -> None:
        self.name = name
        self._handlers = handlers
        self._outbox = outbox
        self.pings = LinkPings(ping_timeout_s)
        self.stuck = False  # lost to its pings left unanswered (`RelayServicer._ping`)
        self._calls: dict[int, _Call] = {}
        self.frames_taken = 0
        self.events_taken = 0
        self.ending = False
        self.closed = False  # the link's end was sent: every call's status before it

    def end_when_idle(self) -> None:
        """End the link once its calls are over: their statuses, then the link's end, sent."""
        self.ending = True
        if not self._calls:
            self._close()

    def _forget(self, call_id: int) -> None:
        self._calls.pop(call_id, None)
        if self.ending and not self._calls:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.add(link_end_event())
            self._outbox.close()

    def ping(self, now: float) -> None:
        """Ping the gateway's event loop (ahead of the responses waiting: `Outbox.add_first`); none
        is counted as sent once the outbox is closed (the link ending)."""
        if not self._outbox.closed:
            self._outbox.add_first(ping_event(self.pings.send(now)))

    def take(self, frame: relay_pb2.RelayFrame) -> None:
        if self.closed:  # what the gateway sent before it read the link's end: no call opens after it
            return
        calls = self._calls
        self.frames_taken += 1
        self.events_taken += len(frame.events)
        for event in frame.events:
            if self.closed:  # a call's overflow ended the link (`_overflowed`): nothing after it opens
                return
            body = event.WhichOneof("body")
            if body == "message":
                call = calls.get(event.call)
                if call is not None:
                    call.requests.put(event.message)
                    if call.requests.arrivals.waiting_bytes > limits.RELAYED_UNREAD_BYTES_MAX:
                        self._overflowed(event.call, call)
            elif body == "taken":
                call = calls.get(event.call)
                if call is not None:
                    call.credit.take(event.taken)
            elif body == "pong":
                if event.call == LINK_CALL:
                    self.pings.answered(event.pong)
            elif body == "open":
                self._open(event.call, event.open)
            elif body == "end":
                call = calls.get(event.call)
                if call is None:
                    continue
                if event.end.cancelled:
                    call.task.cancel()
                else:
                    call.requests.end()

    def _overflowed(self, call_id: int, call: _Call) -> None:
        """A call whose agent sent more than `limits.RELAYED_UNREAD_BYTES_MAX` that its handler has
        not read ends RESOURCE_EXHAUSTED. A backstop: the gateway's window for the call's requests
        (`REQUEST_WINDOW_BYTES` and one message, less than it) holds such an agent back, as
        HTTP/2's flow control does on the port; only a gateway that does not keep it gets here.
        Its later events are ignored."""
        log.warning("relayed call %s on %s: its agent sent over %d bytes not read yet; ended", call_id, self.name,
                    limits.RELAYED_UNREAD_BYTES_MAX)
        details = (f"the agent sent over {limits.RELAYED_UNREAD_BYTES_MAX} bytes before the controller read its "
                   "stream; send the Hello and wait for the first AssignmentSet before more")
        call.requests.arrivals.take_waiting()
        call.context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)  # what the call's metrics and log record
        call.context.set_details(details)
        call.task.cancel()  # cancelled, it sends no status of its own
        self._outbox.add(status_event(call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, details))
        self._forget(call_id)  # after its status: an ending link with no call left ends with it

    def _open(self, call_id: int, opened: relay_pb2.RelayOpen) -> None:
        handler = self._handlers.get(opened.method)
        if handler is None or call_id in self._calls:
            self._outbox.add(status_event(call_id, grpc.StatusCode.UNIMPLEMENTED,
                                          f"method {opened.method} is not relayed"))
            return
        outbox = self._outbox
        requests = RelayedRequests(handler.request_deserializer,
                                   lambda weight: outbox.add(relay_pb2.RelayEvent(call=call_id, taken=weight)))
        context = RelayedContext(opened, self.name)
        credit = _Credit()
        serve = self._serve_unary if handler.unary_unary is not None else self._serve_stream
        task = asyncio.create_task(serve(call_id, handler, requests, context, credit),
                                   name=f"relayed-{self.name}-{call_id}")
        self._calls[call_id] = _Call(requests, credit, task, context)
        task.add_done_callback(lambda _: self._forget(call_id))

    async def _serve_unary(self, call_id: int, handler: grpc.RpcMethodHandler, requests: RelayedRequests,
                           context: RelayedContext, credit: _Credit) -> None:
        async def respond() -> AsyncIterator[Any]:
            request = await anext(requests, None)
            if request is None:
                raise _NoRequest()
            yield await handler.unary_unary(request, context)

        await self._serve(call_id, handler, respond(), context, credit)

    async def _serve_stream(self, call_id: int, handler: grpc.RpcMethodHandler, requests: RelayedRequests,
                            context: RelayedContext, credit: _Credit) -> None:
        await self._serve(call_id, handler, handler.stream_stream(requests, context), context, credit)

    async def _serve(self, call_id: int, handler: grpc.RpcMethodHandler, responses: AsyncIterator[Any],
                     context: RelayedContext, credit: _Credit) -> None:
        """Send the call's responses (at most `RELAY_WINDOW` ahead of those taken), then its status
        (none when cancelled: the agent is gone)."""
        serialize = handler.response_serializer
        outbox = self._outbox
        try:
            async for response in responses:
                outbox.message(call_id, response if serialize is None else serialize(response))
                await credit.sent()
            outbox.add(status_event(call_id, grpc.StatusCode.OK))
        except aio.AbortError:
            outbox.add(status_event(call_id, context.code() or grpc.StatusCode.UNKNOWN, context.details(),
                                    context.trailing_metadata()))
        except _NoRequest:
            outbox.add(status_event(call_id, grpc.StatusCode.INTERNAL, "the relayed unary call carried no request"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the chain translates every error: this is a bug, answered as gRPC would
            log.exception("relayed call %s on %s failed", call_id, self.name)
            outbox.add(status_event(call_id, grpc.StatusCode.UNKNOWN, f"Unexpected error: {type(exc).__name__}"))

    def cancel_all(self) -> None:
        for call in list(self._calls.values()):
            call.task.cancel()

    def open_calls(self) -> int:
        return len(self._calls)


class _NoRequest(Exception):
    pass


class RelayServicer(relay_pb2_grpc.AgentRelayServicer):
    """AgentRelay: one `Relay` call per gateway (on the controller's private unix socket).
    `handlers`: `method_handlers` (built once the server's chain exists). `link_lost`, if set, is
    told of each link lost (not ended by the controller's stop): the gateway's pid (None when its
    call did not say) and the calls the link held (`GatewayProcesses.link_lost`). Each link is
    pinged as `pings` says (`frames.link_ping_times` of the controller's `agent_keepalive`, which
    its gateways are given): a gateway that leaves a ping unanswered past its timeout has its link
    ended (its Relay call cancelled) and told to `link_lost` with `stuck` (killed after a short
    grace: `children.STUCK_GRACE_S`)."""

    def __init__(self, linger_s: float, pings: PingTimes | None = None) -> None:
        self._linger_s = linger_s
        self.pings = pings or link_ping_times()
        self.handlers: Mapping[str, grpc.RpcMethodHandler] = {}
        self.links: dict[str, _Link] = {}
        self._ending = False
        self.link_lost: Callable[[int | None, int, bool], None] | None = None

    def open_calls(self) -> int:
        """The relayed calls open on every link (the agent streams the gateways hold, mostly)."""
        return sum(link.open_calls() for link in self.links.values())

    def end_links(self) -> None:
        """The controller is stopping: end every link (and any that links from now on) once its
        calls are over."""
        self._ending = True
        for link in list(self.links.values()):
            link.end_when_idle()

    async def Relay(self, request_iterator: AsyncIterator[relay_pb2.RelayFrame],
                    context: aio.ServicerContext) -> AsyncIterator[relay_pb2.RelayFrame]:
        metadata = dict(context.invocation_metadata() or ())
        name = metadata.get(GATEWAY_METADATA_KEY, "gateway")
        pid = _pid(metadata.get(GATEWAY_PID_METADATA_KEY))
        outbox = Outbox(self._linger_s)
        link = _Link(str(name), self.handlers, outbox, self.pings.timeout_s)
        self.links[link.name] = link
        log.info("agent gateway %s linked", link.name)
        if self._ending:
            link.end_when_idle()

        async def read() -> None:
            try:
                async for frame in request_iterator:
                    link.take(frame)
            finally:
                outbox.close()

        reader = asyncio.create_task(read(), name=f"relay-read-{link.name}")
        relay = asyncio.current_task()  # gRPC's task of this call: cancelled, the call ends as one lost
        assert relay is not None
        pinger = asyncio.create_task(self._ping(link, relay, context), name=f"relay-ping-{link.name}")
        ended = False
        try:
            async for frame in outbox.frames():
                yield frame
            ended = link.closed
            if ended:  # the stream ends once the gateway ended its side: it read every frame by then
                await asyncio.wait([reader], timeout=LINK_END_READ_TIMEOUT_S)
        finally:
            reader.cancel()
            pinger.cancel()
            if ended:
                log.info("agent gateway %s unlinked: the controller is stopping", link.name)
            else:
                log.warning("agent gateway %s unlinked: its %d calls end as lost connections (relayed: %d events in "
                            "%d frames from it, %d events in %d frames to it)", link.name, link.open_calls(),
                            link.events_taken, link.frames_taken, outbox.events_sent, outbox.frames_sent)
                if self.link_lost is not None:
                    self.link_lost(pid, link.open_calls(), link.stuck)
            link.cancel_all()
            if self.links.get(link.name) is link:
                del self.links[link.name]

    async def _ping(self, link: _Link, relay: asyncio.Task[Any], context: aio.ServicerContext) -> None:
        """Ping `link` every ping interval until it closes. A gateway whose event loop no longer
        answers (`LinkPings.lost`: its gRPC core may still answer HTTP/2's pings) loses its link:
        its Relay call's task, `relay`, is cancelled at once, whatever its write waits on (the call's
        end tells `link_lost` and cancels the link's calls), and the call ends UNAVAILABLE (the
        status goes as soon as the stream's window lets it: a gateway that comes back reads it and
        exits; one that does not is killed, which closes the stream)."""
        interval_s, due = self.pings.interval_s, None
        while not link.closed:
            now = time.monotonic()
            if late(due, now, interval_s):  # this controller's own loop stalled: no verdict on the gateway
                link.pings.excused()
            elif link.pings.lost(now):
                log.error("agent gateway %s answered no ping on its link for %.1fs (timeout %gs): its event loop is "
                          "stuck; its link is lost", link.name, link.pings.waited_s(now), self.pings.timeout_s)
                link.stuck = True
                relay.cancel()
                # The status's send begins before the abort's first wait; `relay`'s end then cancels this task.
                with contextlib.suppress(Exception):  # AbortError, or an error: the call ended meanwhile
                    await context.abort(grpc.StatusCode.UNAVAILABLE, PINGS_UNANSWERED)
                return
            link.ping(now)
            due = now + interval_s
            await asyncio.sleep(interval_s)


def _pid(value: str | bytes | None) -> int | None:
    """The gateway's pid from its Relay call's metadata (None: not said, or not a number)."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None

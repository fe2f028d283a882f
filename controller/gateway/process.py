"""The gateway process: NodeAgentService for agents, relayed to the controller over one link.

`python -m controller.gateway --listen HOST:PORT --link unix:PATH` (the controller starts it:
`children.GatewayProcesses`). It serves Register and Connect with the messages as bytes (it parses
none), opens one `AgentRelay.Relay` stream to the controller and relays each agent call there:
its opening (method, the agent's metadata, peer, time left), its requests, its end, and each of
its responses the agent's transport took (the controller sends a call only a few ahead); it
answers each call with what the controller sends back, ending it with the controller's status and
trailing metadata. A stream's requests are read by a pump of its own, which reads no more of the
agent while `REQUEST_WINDOW_BYTES` of them are ahead of those the controller says the call's
handler took (`RelayEvent.taken`), nor while the link is behind (the outbox over its bounds,
`OUTBOX_BYTES_MAX`): HTTP/2 then holds the agent back at this port, as at the controller's
without a gateway (frames.py says why it cannot deadlock). A call whose deadline already passed
is answered DEADLINE_EXCEEDED here and not relayed (the link's "no time left" would read as no
deadline). It exits when the link ends: with status 0 when its controller ended it (its stop:
every call's status came before the link's end, `LINK_CALL`), with `EXIT_LINK_LOST` when the link
was lost (the controller died, or stopped answering the link's keepalive pings, `--keepalive`, or
its event loop stopped sending the relay's own pings, `RelayEvent.ping`, which this gateway's loop
answers: `frames.link_ping_times` of `--keepalive`), ending every agent call still open UNAVAILABLE
first; it exits too when the link does not come up (`--link-ready-timeout`, `LINK_READY_TIMEOUT_S`),
and on SIGTERM/SIGINT. Prints "maia-gateway listening on HOST:PORT" once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from grpc import aio

from controller import limits
from controller.aio import Wakeup, on_stop_signals, stopped_ignoring_sigterm
from controller.gateway.frames import (
    GATEWAY_METADATA_KEY, GATEWAY_PID_METADATA_KEY, KEEPALIVE_FIELDS, LINK_CALL, LINK_OPTIONS, OUTBOX_BYTES_MAX,
    OUTBOX_EVENTS_MAX, REQUEST_WINDOW_BYTES, Arrivals, Outbox, PingsHeard, PingTimes, from_relayed, keepalive_from_text,
    late, link_ping_times, pong_event, request_weight, status_code, to_relayed)
from controller.logs import configure_logging
from controller.tlsfiles import CertificateFiles
from maia.v1 import relay_pb2, relay_pb2_grpc

log = logging.getLogger("maia.gateway")

SERVICE = "maia.v1.NodeAgentService"
LINK_LOST = "the agent gateway lost its controller; connect again"
DEADLINE_PASSED = "the call's deadline passed before the agent gateway could relay it"
EXIT_LINK_LOST = 4
# The controller serves the link before it starts a gateway: a link not up within this long means
# the controller is gone (SIGKILLed while this gateway started), and the gateway exits rather than
# wait for it forever, an orphan no one stops.
LINK_READY_TIMEOUT_S = 10.0


class _Pending(Arrivals):
    """One relayed call's answer as it arrives: messages, then its status (None: the link ended);
    and its requests' window: what was sent of them and not yet told taken by the controller."""

    __slots__ = ("status", "requests_ahead", "_requests_taken")

    def __init__(self) -> None:
        super().__init__()
        self.status: relay_pb2.RelayStatus | None = None
        self.requests_ahead = 0  # in `request_weight`s
        self._requests_taken = Wakeup()

    def finish(self, status: relay_pb2.RelayStatus | None) -> None:
        self.status = status
        self.end()

    def requests_taken(self, weight: int) -> None:
        """The controller's `taken`: the call's handler took requests weighing this much more."""
        self.requests_ahead = max(0, self.requests_ahead - weight)
        self._requests_taken.set()

    async def window_open(self, window: int) -> None:
        """Return once less than `window` of the call's requests are ahead of those taken."""
        while self.requests_ahead >= window:
            self._requests_taken.clear()
            await self._requests_taken.wait()


class Gateway:
    def __init__(self, name: str, linger_s: float, pings: PingTimes | None = None) -> None:
        self.name = name
        self.pings = pings or link_ping_times()  # the controller's (from the same keepalive)
        self.outbox = Outbox(linger_s, bytes_max=OUTBOX_BYTES_MAX, events_max=OUTBOX_EVENTS_MAX)
        self.request_window_bytes = REQUEST_WINDOW_BYTES
        self._calls: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.linked = False
        self.ended_by_controller = False  # it sent the link's end (`LINK_CALL`): it is stopping
        self.controller_silent = False  # it sent no ping for the ping timeout: the link was given up

    def open_calls(self) -> int:
        return len(self._calls)

    # --- the link ----------------------------------------------------------------------------
    async def run_link(self, channel: aio.Channel) -> None:
        """Relay until the link ends (or the controller's pings stop: `_watch_pings`); then every
        open agent call ends UNAVAILABLE."""
        stub = relay_pb2_grpc.AgentRelayStub(channel)
        call = stub.Relay(self.outbox.frames(), metadata=((GATEWAY_METADATA_KEY, self.name),
                                                          (GATEWAY_PID_METADATA_KEY, str(os.getpid()))))
        self.linked = True
        heard = PingsHeard(self.pings.timeout_s, time.monotonic())
        watch = asyncio.create_task(self._watch_pings(call, heard), name="gateway-pings")
        try:
            async for frame in call:
                for event in frame.events:
                    if event.call == LINK_CALL:
                        body = event.WhichOneof("body")
                        if body == "ping":  # answered by this loop: the controller knows it runs
                            heard.heard(time.monotonic())
                            self.outbox.add_first(pong_event(event.ping))
                        elif body == "end":  # the controller ends the link: every status came before
                            self._link_ended()
                        continue
                    pending = self._calls.get(event.call)
                    if pending is None:
                        continue
                    body = event.WhichOneof("body")
                    if body == "message":
                        pending.put(event.message)
                    elif body == "taken":
                        pending.requests_taken(event.taken)
                    elif body == "status":
                        pending.finish(event.status)
        except grpc.RpcError as exc:
            if self.ended_by_controller:  # what it had to say was read: how the connection closed is moot
                log.info("gateway %s: link closed after its end: %s", self.name, exc.code())
            else:
                log.warning("gateway %s: link to the controller failed: %s", self.name, exc.code())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.controller_silent or (task is not None and task.cancelling()):
                raise
            # `_watch_pings` cancelled the call: a link given up, as one that failed
        finally:
            watch.cancel()
            self.linked = False
            for pending in list(self._calls.values()):
                if not pending.ended:  # one whose status came has it (the controller ends the link right after)
                    pending.finish(None)

    async def _watch_pings(self, call: aio.StreamStreamCall, heard: PingsHeard) -> None:
        """Give the link up (cancel its call) once the controller's pings stop (`PingsHeard.lost`):
        its event loop is stuck though its gRPC core may still answer HTTP/2's pings; this gateway
        then exits as for a controller gone, and its agents go on to the next controller."""
        interval_s = self.pings.interval_s
        while not self.ended_by_controller:
            due = time.monotonic() + interval_s
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            if late(due, now, interval_s):  # this gateway's own loop stalled: pings may wait unread
                heard.excused()
            elif heard.lost(now) and not self.ended_by_controller:
                log.warning("gateway %s: the controller sent no ping on the link for %.1fs (timeout %gs): its event "
                            "loop is stuck; giving the link up", self.name, heard.silent_s(now), self.pings.timeout_s)
                self.controller_silent = True
                call.cancel()
                return

    def _link_ended(self) -> None:
        """No call opens from now on, and this side of the stream ends (after what is queued): the
        controller's stream ends when it sees that."""
        self.ended_by_controller = True
        self.linked = False
        self.outbox.close()

    # --- agent calls -------------------------------------------------------------------------
    def _open(self, method: str, context: aio.ServicerContext) -> tuple[int, _Pending]:
        """Relay the call's opening; raises `_NotRelayed` for a call that cannot be (the link is
        down, or its deadline passed: `RelayOpen.timeout_s` 0 means no deadline, so a call with
        no time left would run unbounded in the controller)."""
        if not self.linked:
            raise _NotRelayed(grpc.StatusCode.UNAVAILABLE, LINK_LOST)
        time_left = context.time_remaining()
        if time_left is not None and time_left <= 0:
            raise _NotRelayed(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_PASSED)
        call_id = next(self._ids)
        pending = self._calls[call_id] = _Pending()
        self.outbox.add(relay_pb2.RelayEvent(call=call_id, open=relay_pb2.RelayOpen(
            method=method, metadata=to_relayed(context.invocation_metadata()), peer=context.peer(),
            timeout_s=0.0 if time_left is None else time_left)))
        return call_id, pending

    def _end(self, call_id: int, *, cancelled: bool) -> None:
        if call_id in self._calls:
            self.outbox.add(relay_pb2.RelayEvent(call=call_id, end=relay_pb2.RelayEnd(cancelled=cancelled)))

    async def _finish(self, pending: _Pending, context: aio.ServicerContext) -> None:
        """End the agent's call with the controller's status."""
        status = pending.status
        if status is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, LINK_LOST)
            return
        code = status_code(status)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, status.details, trailing_metadata=from_relayed(status.trailing_metadata))

    async def register(self, request: bytes, context: aio.ServicerContext) -> bytes:
        try:
            call_id, pending = self._open(f"/{SERVICE}/Register", context)
        except _NotRelayed as refused:
            await context.abort(refused.code, refused.details)
        try:
            await self.outbox.message_in_turn(call_id, request)  # within the outbox's bounds, as a stream's
            self._end(call_id, cancelled=False)
            response = await pending.next()
            while await pending.next() is not None:  # to the status
                pass
            await self._finish(pending, context)
            if response is None:
                await context.abort(grpc.StatusCode.INTERNAL, "the controller answered the call with no response")
            return response  # type: ignore[return-value]
        except asyncio.CancelledError:  # the agent's call is gone
            self._end(call_id, cancelled=True)
            raise
        finally:
            self._calls.pop(call_id, None)

    async def connect(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            call_id, pending = self._open(f"/{SERVICE}/Connect", context)
        except _NotRelayed as refused:
            await context.abort(refused.code, refused.details)
        pump = asyncio.create_task(self._pump(call_id, pending, requests), name=f"gateway-pump-{call_id}")
        ended = False
        try:
            while (message := await pending.next()) is not None:
                yield message  # back once the agent's transport took it: the controller may send one more
                self.outbox.add(relay_pb2.RelayEvent(call=call_id, taken=1))
            ended = True
            await self._finish(pending, context)
        finally:
            pump.cancel()
            if not ended:  # the agent's call is gone (cancelled, its connection died)
                self._end(call_id, cancelled=True)
            self._calls.pop(call_id, None)

    async def _pump(self, call_id: int, pending: _Pending, requests: AsyncIterator[bytes]) -> None:
        """Relay the agent's requests, reading the next only once the last went in the outbox (its
        turn, the link not behind) and the call's window is open (the controller's handler not
        behind): meanwhile HTTP/2 holds the agent back at this port."""
        outbox, window = self.outbox, self.request_window_bytes
        try:
            async for data in requests:
                pending.requests_ahead += request_weight(data)
                await outbox.message_in_turn(call_id, data)
                await pending.window_open(window)
        except Exception:  # the agent's side of the call broke
            self._end(call_id, cancelled=True)
            return
        self._end(call_id, cancelled=False)

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Register": grpc.unary_unary_rpc_method_handler(self.register),
            "Connect": grpc.stream_stream_rpc_method_handler(self.connect),
        })


class _NotRelayed(Exception):
    """A call the gateway answers itself, with this status, relaying nothing of it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maia-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="where agents connect (SO_REUSEPORT)")
    parser.add_argument("--link", required=True, metavar="unix:PATH", help="the controller's relay socket")
    parser.add_argument("--name", default="gateway", help="this gateway's name in the controller's logs")
    parser.add_argument("--linger-ms", type=float, default=5.0, help="how long a frame waits for more events")
    parser.add_argument("--tls-cert", type=Path, help="serve TLS to agents with this certificate (chain)")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    parser.add_argument("--link-ready-timeout", type=float, default=LINK_READY_TIMEOUT_S, metavar="SECONDS",
                        help="exit when the controller's relay socket is not served within this long")
    parser.add_argument("--keepalive", type=keepalive_flag, default=limits.AGENT_KEEPALIVE,
                        metavar="MS,MS,MS,MS,MS", help="HTTP/2 keepalive for the agents and the link, in ms: "
                        + ", ".join(KEEPALIVE_FIELDS) + " (the controller's agent settings)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def keepalive_flag(text: str) -> limits.Keepalive:
    try:
        return keepalive_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


async def serve(args: argparse.Namespace) -> int:
    gateway = Gateway(args.name, args.linger_ms / 1000, link_ping_times(args.keepalive))
    channel = aio.insecure_channel(args.link, options=(*LINK_OPTIONS, *args.keepalive.client_options()))
    try:
        async with asyncio.timeout(args.link_ready_timeout):
            await channel.channel_ready()
    except TimeoutError:
        log.error("gateway %s: no controller on %s within %.3gs (it stopped or died); exiting", args.name,
                  args.link, args.link_ready_timeout)
        await channel.close()
        return EXIT_LINK_LOST
    server = aio.server(options=[*limits.GRPC_MESSAGE_OPTIONS, ("grpc.so_reuseport", 1),
                                 *args.keepalive.server_options()])
    server.add_generic_rpc_handlers((gateway.handlers(),))
    if args.tls_cert is not None:
        port = server.add_secure_port(args.listen, CertificateFiles(args.tls_cert, args.tls_key).server_credentials())
    else:
        port = server.add_insecure_port(args.listen)
    link = asyncio.create_task(gateway.run_link(channel), name="gateway-link")
    await server.start()
    # Handlers before the line that says it serves: a SIGTERM as soon as it is read stops it cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    on_stop_signals(loop, lambda _: stop.set())
    host, _, _ = args.listen.rpartition(":")
    print(f"maia-gateway listening on {host}:{port}", flush=True)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([link, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopped_ignoring_sigterm(loop)  # it stops on its own from here (its parent's SIGTERM may race a lost link)
    lost = link.done() and not stop.is_set() and not gateway.ended_by_controller
    if lost:
        log.warning("gateway %s: the link to the controller ended; stopping", args.name)
    elif not stop.is_set():
        log.info("gateway %s: the controller ended the link (it is stopping); stopping", args.name)
    began, calls = time.monotonic(), gateway.open_calls()
    await server.stop(1.0)
    link.cancel()
    stopping.cancel()
    await channel.close()
    log.info("gateway %s: stopped in %.2fs (%d agent calls were still open)", args.name, time.monotonic() - began,
             calls)
    return EXIT_LINK_LOST if lost else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level.upper())
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

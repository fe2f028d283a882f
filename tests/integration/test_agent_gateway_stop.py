"""A real gateway process holding many agent streams stops with its controller: every agent gets
the controller's status (its clean end of stream), and the gateway exits on its own before its
deadline (not killed). The controller's end is the real relay (`RelayServicer`), with a Connect
handler that answers each stream once and holds it until the stop, as the hub does."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc import aio

from controller.gateway.children import GatewayProcesses, GatewaySettings
from controller.gateway.frames import GATEWAY_METADATA_KEY, LINK_CALL, LINK_OPTIONS, link_server_options, status_code
from controller.gateway.process import EXIT_LINK_LOST
from controller.gateway.relay import RelayServicer
from maia.v1 import relay_pb2, relay_pb2_grpc

CONNECT = "/maia.v1.NodeAgentService/Connect"
STREAMS = 300
CHANNELS = 3


class Holder:
    def __init__(self) -> None:
        self.open = 0
        self.released = asyncio.Event()

    async def connect(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        self.open += 1
        yield b"first set"
        await self.released.wait()  # then OK, as the hub's `close_all` ends a stream


async def test_every_stream_of_a_gateway_gets_the_controllers_goodbye_and_the_gateway_exits_itself() -> None:
    holder = Holder()
    relay = RelayServicer(0.005)
    relay.handlers = {CONNECT: grpc.stream_stream_rpc_method_handler(holder.connect)}
    gateways = GatewayProcesses(GatewaySettings(count=1, listen="127.0.0.1:0", linger_ms=5.0))
    relay_server = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(relay, relay_server)
    relay_server.add_insecure_port(gateways.link_address)
    await relay_server.start()
    channels: list[aio.Channel] = []
    try:
        address = await gateways.start()
        channels = [aio.insecure_channel(address) for _ in range(CHANNELS)]
        opening = asyncio.Semaphore(32)

        async def stream(index: int) -> str:
            async with opening:
                call = channels[index % CHANNELS].stream_stream(CONNECT)()
                await call.write(b"hello")
                assert await call.read() == b"first set"
            try:
                while await call.read() is not aio.EOF:
                    pass
                return (await call.code()).name
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"

        streams = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
        while holder.open < STREAMS:
            await asyncio.sleep(0.05)
        assert relay.open_calls() == STREAMS
        # The controller's stop, in its order: the streams end, the links end once their statuses went.
        gateways.stopping(relay.open_calls())
        holder.released.set()
        relay.end_links()
        await relay_server.stop(30.0)  # returns once the links ended: a loaded host may take a while to end 300 streams
        await gateways.stop()
        ends = Counter(await asyncio.gather(*streams))
    finally:
        for channel in channels:
            await channel.close()
        await relay_server.stop(None)
    assert ends == {"OK": STREAMS}
    [code] = [p.returncode for p in gateways.processes]
    assert code == 0  # it exited itself when its controller ended the link (or on its SIGTERM): a kill is -9


# A gateway whose serve() returned, then signalled as its parent's stop does when it races the
# gateway's own (a lost link's) stop: the loop has closed and given its handlers back by then.
_SIGNALLED_AFTER_SERVE = """
import os, signal, sys, time
from controller.gateway import process
code = process.main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
sys.exit(code)
"""


@asynccontextmanager
async def one_gateway(script: str) -> AsyncIterator[tuple[aio.Server, asyncio.subprocess.Process]]:
    """A relay server (the controller's end of the link) and a gateway process run by `script`
    (its arguments: one gateway's) linked to it."""
    gateways = GatewayProcesses(GatewaySettings(count=1, listen="127.0.0.1:0", linger_ms=5.0))  # its link directory
    relay_server = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(RelayServicer(0.005), relay_server)
    relay_server.add_insecure_port(gateways.link_address)
    await relay_server.start()
    try:
        yield relay_server, await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, "--listen", "127.0.0.1:0", "--link",
            gateways.link_address, "--name", "gateway-t", stdout=asyncio.subprocess.PIPE)
    finally:
        await relay_server.stop(None)
        gateways.link_directory.remove()


async def test_a_sigterm_that_arrives_after_the_gateway_stopped_itself_does_not_kill_it() -> None:
    async with one_gateway(_SIGNALLED_AFTER_SERVE) as (relay_server, child):
        assert child.stdout is not None
        assert (await child.stdout.readline()).startswith(b"maia-gateway listening on")
        await relay_server.stop(None)  # the link is lost: the gateway stops itself
        code = await asyncio.wait_for(child.wait(), 30)
    assert code == EXIT_LINK_LOST  # not -15 (SIGTERM's default action)


# A gateway signalled the moment it says it serves (its parent's stop, racing its start).
_SIGNALLED_AS_IT_SERVES = """
import os, signal, sys
from controller.gateway import process

def print_then_signalled(*args, **kwargs):
    print(*args, **kwargs)
    if str(args[0]).startswith("maia-gateway listening on"):
        os.kill(os.getpid(), signal.SIGTERM)

process.print = print_then_signalled
sys.exit(process.main(sys.argv[1:]))
"""


async def test_a_sigterm_as_soon_as_the_gateway_says_it_serves_stops_it_cleanly() -> None:
    async with one_gateway(_SIGNALLED_AS_IT_SERVES) as (_, child):
        code = await asyncio.wait_for(child.wait(), 30)
    assert code == 0  # its own stop, not -15 (SIGTERM's default action)


async def test_a_link_ends_only_once_its_gateway_read_the_statuses_and_the_links_end() -> None:
    """The controller's end of the link sends each call's status, then the link's end, and keeps
    its stream open until the gateway ends its side: the relay server's stop (right after, in the
    controller's stop) cannot close the connection on frames the gateway has not read."""
    holder = Holder()
    relay = RelayServicer(0.005)
    relay.handlers = {CONNECT: grpc.stream_stream_rpc_method_handler(holder.connect)}
    relay_server = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(relay, relay_server)
    port = relay_server.add_insecure_port("127.0.0.1:0")
    await relay_server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}", options=LINK_OPTIONS)
    try:
        link = relay_pb2_grpc.AgentRelayStub(channel).Relay(metadata=((GATEWAY_METADATA_KEY, "g"),))
        await link.write(relay_pb2.RelayFrame(events=[
            relay_pb2.RelayEvent(call=1, open=relay_pb2.RelayOpen(method=CONNECT)),
            relay_pb2.RelayEvent(call=1, message=b"hello")]))
        first = await _read_relayed(link)
        assert [(e.call, e.message) for e in first] == [(1, b"first set")]
        holder.released.set()  # the stream ends as the hub's close_all ends it
        relay.end_links()
        events: list[relay_pb2.RelayEvent] = []
        while not any(e.call == LINK_CALL for e in events):
            events.extend(await _read_relayed(link))
        assert [(e.call, e.WhichOneof("body")) for e in events] == [(1, "status"), (LINK_CALL, "end")]
        assert status_code(events[0].status) is grpc.StatusCode.OK
        await asyncio.sleep(0.3)
        assert not link.done() and "g" in relay.links  # open until the gateway ends its side
        await link.done_writing()
        assert await link.read() is aio.EOF
        assert await link.code() is grpc.StatusCode.OK and "g" not in relay.links
    finally:
        await channel.close()
        await relay_server.stop(None)


async def _read_relayed(link: Any) -> list[relay_pb2.RelayEvent]:
    """The events of the link's next frame with any besides the link's pings (`RelayEvent.ping`)."""
    while True:
        frame = await link.read()
        assert frame is not aio.EOF, "the link ended before its end was sent"
        if events := [e for e in frame.events if e.WhichOneof("body") != "ping"]:
            return events

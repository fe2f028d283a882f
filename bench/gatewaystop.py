"""An agent gateway's stop with many agent streams: how long it takes, and what its agents see.

This process stands for the controller: the real relay end (`RelayServicer` on a unix socket) and
the real gateway process (`GatewayProcesses`, `python -m controller.gateway`), but a Connect
handler that parses nothing (it answers each stream one response, then holds it until the stop).
The agents are a child process: `--streams` Connect streams, `--per-channel` a channel (as
`maia-simnode --shared-channel` fleets hold them), each reading its stream to its end.

The stop is `ControllerApp.stop`'s order for the gateways: the streams' handlers end (the hub's
`close_all`), the links are told to end once their calls sent their statuses (`end_links`), the
relay server stops (`grace`), then `GatewayProcesses.stop` (SIGTERM, the grace, a kill; a tree
whose deadline grows with the streams is told them first, `GatewayProcesses.stopping(streams)`). Printed:
the time from the stop's start to the relay server's end, to the gateway's exit, whether it was
killed, the gateway's CPU over the stop, and the agents' ends by status (and when they came).

It imports nothing from `bench`, so it runs against another tree alike:

    PYTHONPATH=<tree>:<tree>/proto python bench/gatewaystop.py --streams 4096
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CONNECT = "/maia.v1.NodeAgentService/Connect"


# --- the agents (child process) ------------------------------------------------------------------

async def _agents(args: argparse.Namespace) -> None:
    import grpc
    from grpc import aio

    from controller import limits

    channels = [aio.insecure_channel(args.address, options=limits.AGENT_KEEPALIVE.client_options())
                for _ in range(-(-args.streams // args.per_channel))]
    ends: list[tuple[float, str]] = []

    opening = asyncio.Semaphore(64)  # thousands opened at once saw CANCELLED at their first write

    async def stream(index: int) -> None:
        async with opening:
            call = channels[index // args.per_channel].stream_stream(CONNECT)()
            await call.write(b"hello")
            await call.read()  # the first response: the stream is open at the controller
        try:
            while await call.read() is not aio.EOF:
                pass
            code = await call.code()
            what = code.name
        except grpc.RpcError as exc:
            what = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 (what the agent saw, whatever it is)
            what = type(exc).__name__
        ends.append((time.monotonic(), what))

    await asyncio.gather(*(stream(index) for index in range(args.streams)))
    print(json.dumps({"ends": ends}), flush=True)
    for channel in channels:
        await channel.close()


# --- the controller's end (this process) ---------------------------------------------------------

class _Holder:
    """The Connect handler: one response, then held until `release`."""

    def __init__(self) -> None:
        self.open = 0
        self.released = asyncio.Event()

    async def connect(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        self.open += 1
        try:
            yield b"first set"
            await self.released.wait()
        finally:
            self.open -= 1


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


async def _controller(args: argparse.Namespace) -> dict[str, object]:
    import grpc
    from grpc import aio

    from controller.gateway import children
    from controller.gateway.children import GatewayProcesses, GatewaySettings
    from controller.gateway.frames import link_server_options
    from controller.gateway.relay import RelayServicer
    from maia.v1 import relay_pb2_grpc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.grace is not None:
        children.STOP_GRACE_S = args.grace
    holder = _Holder()
    relay = RelayServicer(args.linger_ms / 1000)
    relay.handlers = {CONNECT: grpc.stream_stream_rpc_method_handler(holder.connect)}
    gateways = GatewayProcesses(GatewaySettings(count=1, listen="127.0.0.1:0", linger_ms=args.linger_ms,
                                                log_level="INFO"))
    relay_server = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(relay, relay_server)
    relay_server.add_insecure_port(gateways.link_address)
    await relay_server.start()
    address = await gateways.start()
    [pid] = gateways.pids()
    agents = subprocess.Popen([sys.executable, __file__, "--agents", "--address", address,
                               "--streams", str(args.streams), "--per-channel", str(args.per_channel)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert agents.stdout is not None
        opened = time.monotonic()
        while holder.open < args.streams:
            if agents.poll() is not None:
                raise RuntimeError(f"the agents exited with {agents.returncode} ({holder.open} streams open)")
            await asyncio.sleep(0.1)
        opened = time.monotonic() - opened
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        await asyncio.sleep(args.settle)
        ticks_before = _cpu_ticks(pid) or 0
        last_ticks = ticks_before

        async def sample() -> None:
            nonlocal last_ticks
            while (ticks := _cpu_ticks(pid)) is not None:
                last_ticks = ticks
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        began = time.monotonic()
        if "streams" in inspect.signature(gateways.stopping).parameters:  # a tree whose deadline grows with them
            gateways.stopping(relay.open_calls())
        holder.released.set()  # the hub ends every stream
        relay.end_links()
        await relay_server.stop(args.relay_grace)
        relay_stopped = time.monotonic() - began
        await gateways.stop()
        gateway_exited = time.monotonic() - began
        code = gateways.processes[0].returncode
        sampler.cancel()
        lines = await asyncio.to_thread(agents.stdout.read)
        agents.wait(60)
    finally:
        if agents.poll() is None:
            agents.kill()
        if any(p.poll() is None for p in gateways.processes):  # an error before the stop: none left behind
            await gateways.stop()
        await relay_server.stop(None)
    ends = json.loads(lines.strip().splitlines()[-1])["ends"]
    times = sorted(t - began for t, _ in ends)
    return {"streams": args.streams, "per_channel": args.per_channel, "opened_s": round(opened, 1),
            "gateway_rss_mib": round(rss / 2**20, 1),
            "relay_stopped_s": round(relay_stopped, 3), "gateway_exited_s": round(gateway_exited, 3),
            "gateway_exit_code": code, "killed": code == -9,
            "gateway_cpu_s_over_stop": round((last_ticks - ticks_before) / os.sysconf("SC_CLK_TCK"), 2),
            "agents_ends": dict(Counter(what for _, what in ends)),
            "agents_end_s_p50_p99_max": [round(times[len(times) // 2], 3), round(times[len(times) * 99 // 100], 3),
                                         round(times[-1], 3)] if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4096)
    parser.add_argument("--per-channel", type=int, default=512, help="streams an agents' channel carries")
    parser.add_argument("--linger-ms", type=float, default=5.0, help="the link's frame linger, both ends")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after every stream opened before the stop")
    parser.add_argument("--relay-grace", type=float, default=2.0, help="the relay server's stop grace (the controller's)")
    parser.add_argument("--grace", type=float, help="the gateway's stop grace (default: the tree's own)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--agents", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agents:
        asyncio.run(_agents(args))
        return
    result = asyncio.run(_controller(args))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

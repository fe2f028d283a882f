"""Agent stream messages: the controller's CPU per heartbeat message and its memory per stream.

A real controller (`ControllerApp`: gRPC on 127.0.0.1, the production interceptor chain, the hub,
SQLite) in this process; the agents in a child process (one channel, `--streams` Connect streams
after their Registers, as `maia-simnode --shared-channel` holds them), so that this process's CPU
time (`time.process_time`: the event loop and gRPC's threads) is the controller's alone.

- `--mode cpu`: every stream sends a full heartbeat (no shards) and then `--beats` heartbeats that
  omit their unchanged shard state (as the simulated nodes do), `--rate` messages a second in all;
  the CPU of the window they are sent in (plus a drain second), less the mean of a window as long
  before and after it with the streams open and silent (the controller's own loops), divided by
  the messages sent.
- `--mode memory`: the streams are opened after every node registered; what they hold is the
  difference in Python's traced memory (tracemalloc, after a collection) and in RSS between
  before and after, divided by the streams; the top lines by allocation site are printed. With
  `--gateways`, the gateways' RSS before and after too (their processes', summed).

It imports nothing from `bench`, so it runs against another tree alike:

    PYTHONPATH=<tree>:<tree>/proto python bench/agentstreams.py --streams 1000 --beats 20
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

RACKS = 16


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- the agents (child process) ------------------------------------------------------------------

async def _agents(args: argparse.Namespace) -> None:
    from controller.bearer import aio_channel, bearer_metadata
    from maia.v1 import agent_pb2, agent_pb2_grpc

    channel = aio_channel(args.address, None)
    stub = agent_pb2_grpc.NodeAgentServiceStub(channel)
    bootstrap = bearer_metadata(os.environ["MAIA_BENCH_TOKEN"])
    nodes = [f"rack-{i % RACKS:02d}-n{i:05d}" for i in range(args.streams)]
    sessions: dict[str, agent_pb2.RegisterResponse] = {}
    gate = asyncio.Semaphore(64)

    async def register(node_id: str) -> None:
        info = agent_pb2.NodeInfo(node_id=node_id, hostname=node_id, rack=f"rack-{int(node_id[-5:]) % RACKS:02d}",
                                  accelerators=4, accelerator_model="maia-100", hbm_gib=64, idle_power_w=500)
        async with gate:
            while True:
                try:
                    sessions[node_id] = await stub.Register(agent_pb2.RegisterRequest(node=info), timeout=60,
                                                            metadata=bootstrap)
                    return
                except Exception:  # busy: again
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(register(n) for n in nodes))
    _say("registered")
    await _heard("connect")
    calls = {}
    for node_id in nodes:
        registered = sessions[node_id]
        call = stub.Connect(metadata=bearer_metadata(registered.node_credential))
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_id=node_id,
                                                                      session_id=registered.session_id)))
        calls[node_id] = call
    await asyncio.gather(*(call.read() for call in calls.values()))  # every stream's first set
    # The first heartbeat carries the (empty) shard state of version 1; the others omit it.
    await asyncio.gather(*(call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(
        seq=1, power_draw_w=500.0, shard_state_version=1))) for call in calls.values()))
    _say("connected")
    await _heard("beat")
    period = len(calls) / args.rate

    async def beat(index: int, call: object) -> None:
        await asyncio.sleep(period * index / len(calls))
        for seq in range(2, args.beats + 2):
            await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(  # type: ignore[attr-defined]
                seq=seq, power_draw_w=500.0, shard_state_version=1, shards_omitted=True)))
            await asyncio.sleep(period)

    await asyncio.gather(*(beat(i, call) for i, call in enumerate(calls.values())))
    _say("sent")
    await _heard("quit")
    for call in calls.values():
        call.cancel()
    await channel.close()


def _say(word: str) -> None:
    print(word, flush=True)


async def _heard(word: str) -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != word:
        raise SystemExit(f"expected {word!r}, got {line!r}")


# --- the controller (this process) ---------------------------------------------------------------

class _Agents:
    """The child process, spoken to by lines."""

    def __init__(self, args: argparse.Namespace, address: str, token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--agents", "--address", address, "--streams", str(args.streams),
             "--beats", str(args.beats), "--rate", str(args.rate)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "MAIA_BENCH_TOKEN": token})

    async def heard(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)
        if line.strip() != word:
            raise RuntimeError(f"agents: expected {word!r}, got {line!r}")

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def _controller(args: argparse.Namespace) -> dict[str, object]:
    from controller.api.server import ControllerApp
    from controller.bearer import aio_channel
    from controller.config import Config
    from maia.v1 import admin_pb2, admin_pb2_grpc

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="maia-bench-agentstreams-") as root:
        config = replace(Config(), listen="127.0.0.1:0", db_url=f"sqlite+aiosqlite:///{Path(root) / 'maia.db'}",
                         bootstrap_admin_token_file=str(Path(root) / "admin.token"), decide_process=False,
                         heartbeat_timeout_s=args.heartbeat_timeout, log_level="WARNING",
                         **({"agent_gateways": args.gateways, "agent_listen": "127.0.0.1:0",
                            "agent_gateway_linger_ms": args.gateway_linger_ms} if args.gateways else {}))
        app = ControllerApp(config)
        address = await app.start()
        agents = None
        try:
            channel = aio_channel(address, Path(root, "admin.token").read_text().strip())
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            await admin.ApplyTopology(admin_pb2.Topology(
                zones=[admin_pb2.Zone(id="z1")], rows=[admin_pb2.Row(id="row-0", zone="z1")],
                racks=[admin_pb2.Rack(id=f"rack-{r:02d}", row="row-0") for r in range(RACKS)]))
            token = (await admin.CreateToken(admin_pb2.CreateTokenRequest(role="node-bootstrap"))).secret
            await channel.close()
            agents = _Agents(args, app.agent_address or address, token)
            await agents.heard("registered")
            gateways = app.gateways.pids() if app.gateways is not None else []
            if args.mode == "memory":
                return await _memory(args, agents, gateways)
            return await _cpu(args, agents, gateways)
        finally:
            if agents is not None:
                agents.say("quit")
                agents.stop()
            await app.stop(grace_s=1.0)


async def _settled() -> None:
    await asyncio.sleep(2.0)
    gc.collect()


async def _memory(args: argparse.Namespace, agents: _Agents, gateways: list[int]) -> dict[str, object]:
    tracemalloc.start(args.frames)
    await _settled()
    before, rss_before, gateways_before = tracemalloc.take_snapshot(), _rss_bytes(), _rss_of(gateways)
    agents.say("connect")
    await agents.heard("connected")
    await _settled()
    after, rss_after, gateways_after = tracemalloc.take_snapshot(), _rss_bytes(), _rss_of(gateways)
    diff = after.compare_to(before, "traceback" if args.frames > 1 else "lineno")
    traced = sum(d.size_diff for d in diff)
    for d in diff[:args.top]:
        print(f"{d.size_diff / args.streams:8.0f} B/stream {d.count_diff / args.streams:6.2f} blocks/stream  "
              + " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in d.traceback), file=sys.stderr)
    return {"streams": args.streams, "traced_bytes_per_stream": round(traced / args.streams),
            "rss_bytes_per_stream": round((rss_after - rss_before) / args.streams),
            **({"gateways": len(gateways), "gateway_rss_mib": round(gateways_after / 2**20, 1),
                "gateway_rss_bytes_per_stream": round((gateways_after - gateways_before) / args.streams)}
               if gateways else {})}


async def _cpu(args: argparse.Namespace, agents: _Agents, gateways: list[int]) -> dict[str, object]:
    agents.say("connect")
    await agents.heard("connected")
    await asyncio.sleep(args.settle)  # the joins' own work done (the nodes' first writes, the passes)
    window = args.beats * args.streams / args.rate + 1.0
    spy = _profiler(args, window) if args.py_spy_window == "idle" else None
    idle_before = await _cpu_over(window)
    if spy is not None:
        spy.wait(30)
    spy = _profiler(args, window) if args.py_spy_window == "beats" else None
    agents.say("beat")
    cpu, wall, gateway_cpu = time.process_time(), time.perf_counter(), _cpu_of(gateways)
    await agents.heard("sent")
    await asyncio.sleep(max(0.0, window - (time.perf_counter() - wall)))
    cpu, wall, gateway_cpu = time.process_time() - cpu, time.perf_counter() - wall, _cpu_of(gateways) - gateway_cpu
    if spy is not None:
        spy.wait(30)
    idle_after = await _cpu_over(window)
    idle = (idle_before + idle_after) / 2 * wall / window  # the streams open and silent, as long as the beats took
    messages = args.beats * args.streams
    return {"streams": args.streams, "messages": messages, "wall_s": round(wall, 2), "cpu_s": round(cpu, 3),
            "idle_cpu_s_before_after": [round(idle_before, 3), round(idle_after, 3)],
            "us_per_message": round((cpu - idle) * 1e6 / messages, 1),
            "us_per_message_gross": round(cpu * 1e6 / messages, 1),
            **({"gateways": len(gateways), "gateway_cpu_s": round(gateway_cpu, 3),
                "gateway_us_per_message_gross": round(gateway_cpu * 1e6 / messages, 1)} if gateways else {})}


def _rss_of(pids: list[int]) -> int:
    """The resident memory of these processes (the agent gateways), summed, bytes."""
    return sum(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) for pid in pids) * os.sysconf("SC_PAGE_SIZE")


def _cpu_of(pids: list[int]) -> float:
    """utime + stime of these processes (the agent gateways), seconds."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _cpu_over(seconds: float) -> float:
    """This process's CPU seconds over the next `seconds`; its threads' by name on stderr."""
    began, threads = time.process_time(), _thread_ticks()
    await asyncio.sleep(seconds)
    spent = {name: ticks - threads.get(name, 0) for name, ticks in _thread_ticks().items()}
    print("threads' CPU s:", {name: round(t / os.sysconf("SC_CLK_TCK"), 2) for name, t in
                              sorted(spent.items(), key=lambda kv: -kv[1]) if t}, file=sys.stderr)
    return time.process_time() - began


def _thread_ticks() -> dict[str, int]:
    """utime + stime of this process's threads by name and id (the event loop's: "main"), clock ticks."""
    ticks: dict[str, int] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = "main" if int(task.name) == os.getpid() else f"{(task / 'comm').read_text().strip()}-{task.name}"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
    return ticks


def _profiler(args: argparse.Namespace, seconds: float) -> subprocess.Popen | None:
    """py-spy recording this process for `seconds` (the beat window), if asked for."""
    if not args.py_spy:
        return None
    return subprocess.Popen([args.py_spy, "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "100",
                             "--duration", str(max(1, round(seconds))), "-o", args.py_spy_out,
                             *(["--native"] if args.py_spy_native else ["--nonblocking"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cpu", "memory"), default="cpu")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--beats", type=int, default=20, help="heartbeats each stream sends (cpu mode)")
    parser.add_argument("--rate", type=float, default=2000.0, help="heartbeats a second, all streams together")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after every stream opened before measuring")
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0, help="the controller's (no stream expires)")
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc frames per allocation (memory mode)")
    parser.add_argument("--top", type=int, default=15, help="allocation sites printed (memory mode)")
    parser.add_argument("--py-spy", help="profile the beat window with this py-spy binary (cpu mode)")
    parser.add_argument("--py-spy-out", default="agentstreams.pyspy.txt", help="where py-spy writes (raw)")
    parser.add_argument("--py-spy-window", choices=("beats", "idle"), default="beats",
                        help="profile the beats' window, or the idle one before it")
    parser.add_argument("--py-spy-native", action="store_true", help="py-spy --native (C and C++ frames too)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--gateways", type=int, default=0,
                        help="the agents connect through this many agent gateway processes (--agent-gateways); "
                             "their CPU is reported apart")
    parser.add_argument("--gateway-linger-ms", type=float, default=2.0, help="--agent-gateway-linger-ms")
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

"""Failover time: the leader controller killed with SIGKILL → the next placement committed.

Two `maia-controller` processes (real processes, default lease settings: `--lease-ttl 5`,
`--lease-renew-interval 1`) on one PostgreSQL (`--db`, or a throwaway server started from the
local PostgreSQL binaries like the test suite's), a `maia-simnode` fleet given both addresses.
Each round: find the leader in the lease row, wait until the whole fleet is connected to it
(a steady cluster), SIGKILL it, at once submit a one-accelerator
deployment through a client channel over both controllers (retrying while the survivor is
unreachable), and time until its placement is committed (polled in the database every 20 ms),
and until the survivor holds the lease. Then the killed controller is started again on its
address, as a follower, for the next round.

`ControllerProcess` is shared with tests/integration/test_ha_failover.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fgd import percentile
from bench.pgserver import LocalPostgres, find_pg_bin_dir, free_port

BIN = Path(sys.executable).parent / "maia-controller"


# A first start on a port found free may find it taken by then (another process's connection
# took it as its ephemeral port): it is started on another free port, this many times at most.
FIRST_START_TRIES = 5
# The ports a controller started again on its address is given: below the kernel's ephemeral
# range, so that no connection takes its port as a source port while it is down (one restarted
# after a kill in CI found its port "already in use" by a connection made meanwhile).
STABLE_PORTS = 4_000


def _ephemeral_low() -> int:
    """The lowest port the kernel gives connections as their source port (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def stable_port() -> int:
    """A free port below the ephemeral range (`STABLE_PORTS` of them, picked at random), else any
    free one: what a controller that is killed and started again on its address listens on."""
    high = _ephemeral_low() - 1
    for _ in range(50):
        port = random.randint(max(1024, high - STABLE_PORTS), high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


class ControllerProcess:
    """One `maia-controller` process on a fixed address (started again there after a kill)."""

    def __init__(self, db_url: str, log_dir: Path, token_file: Path, *extra: str, port: int | None = None) -> None:
        self._args = ["--db", db_url, "--no-migrate", "--bootstrap-admin-token-file", str(token_file), *extra]
        self._log_dir = log_dir
        self._port_given = port is not None
        self._listen_on(port or stable_port())
        self._started = False
        self.proc: subprocess.Popen[str] | None = None

    def _listen_on(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self._log_path = self._log_dir / f"controller-{port}.log"

    def start(self) -> None:
        """Start and wait until it serves (it prints where it listens). Its first start, on a port
        it found free itself, moves to another free port when that one was taken meanwhile; once
        it has served, it is started again on its address only (agents know it)."""
        tries = 1 if self._started or self._port_given else FIRST_START_TRIES
        for attempt in range(1, tries + 1):
            line = self._spawn()
            if line.startswith("maia-controller listening on "):
                self._started = True
                return
            taken = "already in use" in self.log_tail()  # its own check at start, or the bind after it
            if attempt == tries or not taken:
                raise RuntimeError(f"controller {self.address} did not start: {line!r}\n{self.log_tail()}")
            assert self.proc is not None
            self.proc.wait(10)
            self._listen_on(stable_port())

    def _spawn(self) -> str:
        """Start the process on `address`; the first line it prints (empty: it exited first)."""
        with open(self._log_path, "a") as log:
            self.proc = subprocess.Popen([str(BIN), "--listen", self.address, *self._args], stdout=subprocess.PIPE,
                                         stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def kill(self) -> None:
        """SIGKILL: no lease release, no goodbye to agents."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self) -> str:
        return self.log_text()[-4000:]

    def log_text(self) -> str:
        """Everything it logged, across its restarts."""
        return self._log_path.read_text(errors="replace")


async def lease_holder(db: Any) -> tuple[str, int, bool]:
    """(address, token, live) of the lease row, on the database's clock."""
    from controller.store import lease

    async with db.unit_of_work() as uow:
        row = await lease.read(uow.session)
    return row.address, row.token, row.live


async def wait_for_leader(db: Any, *, after_token: int, timeout: float) -> tuple[str, int]:
    """The address and token of a live lease newer than `after_token`."""
    deadline = time.monotonic() + timeout
    while True:
        address, token, live = await lease_holder(db)
        if live and token > after_token:
            return address, token
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new leader within {timeout}s (lease token still {token})")
        await asyncio.sleep(0.02)


async def placed_replicas(db: Any, name: str) -> int:
    from sqlalchemy import func, select

    from controller.store import models as m

    async with db.unit_of_work() as uow:
        return await uow.session.scalar(
            select(func.count(func.distinct(m.Placement.replica))).join(m.Deployment).where(m.Deployment.name == name))


async def _rounds(db_url: str, kills: int, root: Path) -> dict[str, Any]:
    import grpc

    from controller import limits
    from controller.bearer import aio_channel
    from controller.cli.client import channel_target
    from controller.identity import CONTROLLER, Role
    from controller.store.db import Database
    from controller.store.migrate import ensure_schema
    from controller.usecases import tokens
    from maia.v1 import admin_pb2, admin_pb2_grpc, common_pb2, deployments_pb2, deployments_pb2_grpc

    db = Database(db_url)
    await ensure_schema(db, migrate=True)
    token_file = root / "admin.token"
    controllers = [ControllerProcess(db_url, root, token_file) for _ in range(2)]
    fleet: subprocess.Popen[bytes] | None = None
    failover_s: list[float] = []
    lease_s: list[float] = []
    try:
        for c in controllers:
            c.start()
        async with db.unit_of_work() as uow:
            node_token = tokens.add_token(uow, CONTROLLER, role=Role.NODE_BOOTSTRAP, name="bench", tenant="",
                                          ttl_s=None).secret
            await uow.commit()
        addresses = ",".join(c.address for c in controllers)
        channel = aio_channel(channel_target(addresses), token_file.read_text().strip(),
                              options=(*limits.GRPC_CLIENT_OPTIONS, *limits.GRPC_FAILOVER_OPTIONS))
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deployments = deployments_pb2_grpc.DeploymentServiceStub(channel)
        await admin.ApplyTopology(admin_pb2.Topology(
            zones=[admin_pb2.Zone(id="z1")], rows=[admin_pb2.Row(id="row-a", zone="z1")],
            racks=[admin_pb2.Rack(id=f"rack-{r:02d}", row="row-a") for r in range(2)]))
        await admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        with open(root / "simnode.log", "wb") as log:
            fleet = subprocess.Popen(
                [sys.executable, "-m", "controller.simnode.main", "--controller", addresses, "--racks", "2",
                 "--nodes-per-rack", "4", "--load-delay", "0.1", "--state-dir", str(root / "simnode-state")],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, TOKEN_ENV: node_token})
        leader, token = await wait_for_leader(db, after_token=0, timeout=30)
        for i in range(kills):
            name = f"probe-{i}"
            if i >= 16:  # keep room: 8 nodes x 4 accelerators
                await deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name=f"probe-{i - 16}"))
            victim = next(c for c in controllers if c.address == leader)
            await _fleet_on(leader, token_file.read_text().strip(), 8)  # a steady cluster, then the kill
            victim.kill()
            killed = time.monotonic()
            request = deployments_pb2.SubmitDeploymentRequest(spec=deployments_pb2.DeploymentSpec(
                name=name, tenant="lab", replicas=1, shards_per_replica=1,
                shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=16, power_w=400)))
            while True:
                try:
                    await deployments.SubmitDeployment(request, timeout=5)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        break
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    await asyncio.sleep(0.05)
            leader, token = await wait_for_leader(db, after_token=token, timeout=60)
            lease_s.append(time.monotonic() - killed)
            while await placed_replicas(db, name) < 1:
                if time.monotonic() - killed > 120:
                    raise TimeoutError(f"{name} not placed 120 s after the kill")
                await asyncio.sleep(0.02)
            failover_s.append(time.monotonic() - killed)
            print(f"kill {i + 1}/{kills}: new leader after {lease_s[-1]:.2f} s, placement committed after "
                  f"{failover_s[-1]:.2f} s", file=sys.stderr, flush=True)
            victim.start()
        await channel.close()
    finally:
        if fleet is not None and fleet.poll() is None:
            fleet.terminate()
            fleet.wait(20)
        for c in controllers:
            c.stop()
        await db.dispose()
    return {"kills": kills, "failover_s": failover_s, "lease_s": lease_s}


TOKEN_ENV = "MAIA_TOKEN"


async def _fleet_on(leader: str, token: str, nodes: int, timeout: float = 60.0) -> None:
    """Wait until `nodes` agents are connected to the controller at `leader`."""
    from controller.bearer import aio_channel
    from maia.v1 import admin_pb2, admin_pb2_grpc

    async with aio_channel(leader, token) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deadline = time.monotonic() + timeout
        while sum(n.connected for n in (await admin.ListNodes(admin_pb2.ListNodesRequest())).nodes) < nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fleet did not reach the leader {leader} in {timeout}s")
            await asyncio.sleep(0.1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--db", default=os.environ.get("MAIA_BENCH_PG_URL", ""),
                   help="postgresql+asyncpg:// URL of an EMPTY database (default: a throwaway local server)")
    p.add_argument("--json", help="also write the raw times to this file")


def main(args: argparse.Namespace) -> int:
    server = None
    url = args.db
    if not url:
        bin_dir = find_pg_bin_dir()
        if bin_dir is None:
            print("no PostgreSQL binaries (make postgres) and no --db", file=sys.stderr)
            return 2
        server = LocalPostgres(bin_dir)
        url = server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="maia-bench-failover-") as tmp:
            result = asyncio.run(_rounds(url, args.kills, Path(tmp)))
    finally:
        if server is not None:
            server.stop()
    f, ls = result["failover_s"], result["lease_s"]
    print(f"{result['kills']} SIGKILLs of the leader (2 controllers, --lease-ttl 5, --lease-renew-interval 1): "
          f"kill -> next placement committed p50 {percentile(f, 50):.2f} s p99 {percentile(f, 99):.2f} s "
          f"max {max(f):.2f} s; kill -> new lease p50 {percentile(ls, 50):.2f} s p99 {percentile(ls, 99):.2f} s")
    print(f"machine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0

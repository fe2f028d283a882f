"""Several `maia-controller` processes on one real PostgreSQL: the leader is killed with SIGKILL
at random moments during bursts of submissions, again and again; agents (`maia-simnode
--controller A,B,C`) and clients (one gRPC channel over every controller) follow.

After every round: a new leader is scheduling within 10 s of the kill, every acknowledged
submission is in the database and placed, and the committed placements pass the independent
checker (tests/scheduler/checker.py: nothing double-booked, gangs whole, capacity kept).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import limits
from controller.bearer import aio_channel
from controller.cli.client import channel_target
from controller.store.db import Database
from controller.store.migrate import ensure_schema
from controller.store.snapshot import load_snapshot
from grpc_harness import SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, deployments_pb2

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.checking import check_state  # noqa: E402  (the independent checker, tests/scheduler/checker.py)
from bench.failover import ControllerProcess, wait_for_leader  # noqa: E402

# A bound that says "it fails over", not how fast: `python -m bench failover` measures that (~5-6 s
# with these flags on a quiet host); a loaded CI host with three controllers, a fleet and
# PostgreSQL on two cores needs the slack.
FAILOVER_LIMIT_S = 20.0
# Fast settings so several kills fit in a short test: the lease runs out 3 s after a kill.
CONTROLLER_FLAGS = ("--reconcile-interval", "0.5", "--solve-time-limit-ms", "1000", "--heartbeat-timeout", "15",
                    "--lease-ttl", "3", "--lease-renew-interval", "0.5")
pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


class Cluster:
    def __init__(self, controllers: list[ControllerProcess]) -> None:
        self.controllers = controllers

    @property
    def addresses(self) -> str:
        return ",".join(c.address for c in self.controllers)

    def by_address(self, address: str) -> ControllerProcess:
        return next(c for c in self.controllers if c.address == address)

    def logs(self) -> str:
        return "\n".join(f"--- {c.address}\n{c.log_tail()}" for c in self.controllers)


async def _submit(stubs: Stubs, name: str, accepted: set[str], deadline: float) -> None:
    """Submit until a controller acknowledges it (ALREADY_EXISTS: an earlier try landed)."""
    request = deployments_pb2.SubmitDeploymentRequest(spec=spec(name, accelerators=1))
    while True:
        try:
            await stubs.deployments.SubmitDeployment(request, timeout=5)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                break
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    accepted.add(name)


async def _placed(db: Database) -> tuple[dict[str, Any], dict[str, int]]:
    async with db.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    placed: dict[str, set[int]] = {}
    for p in snapshot.problem.get("placements", ()):
        placed.setdefault(p["deployment"].rpartition("/")[2], set()).add(p["replica"])  # TENANT/NAME: all are lab's
    return snapshot.problem, {name: len(replicas) for name, replicas in placed.items()}


async def _agents_on(leader: str, token: str, fleet: SimFleet) -> None:
    """Wait until every agent of the fleet is connected to the controller at `leader`."""
    async with Stubs.connect(leader, token).channel as channel:
        try:
            await eventually(lambda: Stubs.on(channel).admin.ListNodes(admin_pb2.ListNodesRequest()),
                             lambda r: sum(n.connected for n in r.nodes) == len(fleet.node_ids),
                             timeout=30, what=f"every agent connected to the leader {leader}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.log_tail()}") from None


@asynccontextmanager
async def _lab_on(cluster: Cluster, db: Database, token: str, fleet: SimFleet) -> AsyncIterator[tuple[Stubs, str, int]]:
    """One channel over every controller, racks rack-00 and rack-01 and tenant lab applied: its
    stubs, and the leader's address and lease token once every agent of `fleet` is on it."""
    async with aio_channel(channel_target(cluster.addresses), token,
                           options=(*limits.GRPC_CLIENT_OPTIONS, *limits.GRPC_FAILOVER_OPTIONS)) as channel:
        stubs = Stubs.on(channel)
        await stubs.admin.ApplyTopology(topology({"rack-00": "row-a", "rack-01": "row-a"}))
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        leader, lease = await wait_for_leader(db, after_token=0, timeout=10)
        await _agents_on(leader, token, fleet)
        yield stubs, leader, lease


@pytest.fixture
def cluster(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from _controllers(db_url, tmp_path, request.param)


def _controllers(db_url: str, tmp_path: Path, count: int, *flags: str) -> Iterator[Cluster]:
    """`count` controller processes on the migrated database, `flags` beside CONTROLLER_FLAGS;
    stopped after."""
    asyncio.run(_migrate(db_url))
    token_file = tmp_path / "admin.token"
    controllers = [ControllerProcess(db_url, tmp_path, token_file, *CONTROLLER_FLAGS, *flags) for _ in range(count)]
    try:
        with ThreadPoolExecutor(len(controllers)) as pool:
            list(pool.map(ControllerProcess.start, controllers))
        yield Cluster(controllers)
    finally:
        for controller in controllers:
            controller.stop()


async def _migrate(url: str) -> None:
    db = Database(url)
    try:
        await ensure_schema(db, migrate=True)
    finally:
        await db.dispose()


@pytest.mark.parametrize("cluster, rounds", [(2, 2), (3, 3)], indirect=["cluster"])
async def test_leader_killed_during_bursts(cluster: Cluster, db_url: str, tmp_path: Path, rounds: int) -> None:
    rng = random.Random(7 + rounds)
    db = Database(db_url)
    token = (tmp_path / "admin.token").read_text().strip()
    fleet = SimFleet(cluster.addresses, racks=2, nodes_per_rack=3, token=await issue_token(db, "node-bootstrap"),
                     log_dir=tmp_path)
    accepted: set[str] = set()
    restarts: list[asyncio.Task] = []
    try:
        # A running cluster, then the kills.
        async with _lab_on(cluster, db, token, fleet) as (stubs, leader, token_now):
            for round_ in range(rounds):
                burst = [f"r{round_}-d{i}" for i in range(5)]
                deadline = time.monotonic() + 30
                submits = [asyncio.create_task(_submit(stubs, name, accepted, deadline)) for name in burst]
                await asyncio.sleep(rng.uniform(0.0, 0.8))  # the kill lands somewhere in the burst
                victim = cluster.by_address(leader)
                pending = [t for t in restarts if not t.done()]
                if len(cluster.controllers) - len(pending) < 2:  # someone must be there to take over
                    await asyncio.gather(*pending)
                victim.kill()
                killed_at = time.monotonic()
                leader, token_now = await wait_for_leader(db, after_token=token_now, timeout=FAILOVER_LIMIT_S)
                await asyncio.gather(*submits)
                # The new leader schedules: a deployment submitted after the kill is placed in time.
                probe = f"r{round_}-probe"
                await _submit(stubs, probe, accepted, time.monotonic() + FAILOVER_LIMIT_S)
                while True:
                    _, placed = await _placed(db)
                    if placed.get(probe):
                        break
                    assert time.monotonic() - killed_at < FAILOVER_LIMIT_S, \
                        f"round {round_}: nothing placed {time.monotonic() - killed_at:.1f}s after the kill\n" \
                        f"{cluster.logs()}"
                    await asyncio.sleep(0.1)
                # Back as a follower, on the address the agents know, while the next round runs.
                restarts.append(asyncio.create_task(asyncio.to_thread(victim.start)))
            await asyncio.gather(*restarts)
            # Everything acknowledged is there and placed; the committed state is valid.
            deadline = time.monotonic() + 30
            while True:
                problem, placed = await _placed(db)
                missing = sorted(name for name in accepted if placed.get(name) != 1)
                if not missing:
                    break
                assert time.monotonic() < deadline, f"not placed: {missing}\n{cluster.logs()}\n{fleet.log_tail()}"
                await asyncio.sleep(0.2)
            assert {d["id"].rpartition("/")[2] for d in problem["deployments"]} >= accepted
            assert check_state(problem, problem.get("placements", [])) == []
        await _agents_on(leader, token, fleet)  # the agents followed the leader
    finally:
        await fleet.stop()
        await db.dispose()


@pytest.fixture
def nominating(db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """Two controllers that nominate nodes for a deployment waiting 3 s for room."""
    yield from _controllers(db_url, tmp_path, 2, "--nominate-after", "3")


async def test_the_next_leader_keeps_the_nodes_nominated_for_a_waiting_gang(nominating: Cluster, db_url: str,
                                                                            tmp_path: Path) -> None:
    """A full cluster, a rack-local gang waiting behind single-accelerator work, nodes nominated
    for it; the leader is killed. The next leader takes the nomination up from the database (its
    log says so, the nodes still say whom they are kept for) and keeps new work off those nodes
    as their work leaves, well before its own `--nominate-after` could have nominated anything."""
    db = Database(db_url)
    token = (tmp_path / "admin.token").read_text().strip()
    fleet = SimFleet(nominating.addresses, racks=2, nodes_per_rack=2, token=await issue_token(db, "node-bootstrap"),
                     log_dir=tmp_path)
    try:
        async with _lab_on(nominating, db, token, fleet) as (stubs, leader, lease):
            fillers = [f"f{i}" for i in range(16)]  # every accelerator of the 4 nodes
            for name in fillers:
                await _submit(stubs, name, set(), time.monotonic() + 30)
            await eventually(lambda: _placed(db), lambda got: len(got[1]) == 16, what="16 fillers placed")
            gang = spec("gang", shards=8, accelerators=1)  # one rack's 8 accelerators: it waits, the cluster is full
            await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=gang))
            step = 0

            async def churn() -> None:  # a filler leaves, a new one arrives: a pass
                nonlocal step
                problem, _ = await _placed(db)
                on = {p["deployment"].rpartition("/")[2]: p["node"] for p in problem["placements"]}
                leaving = next(name for name in sorted(on) if name.startswith("f"))
                await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name=leaving))
                await _submit(stubs, f"n{step}", set(), time.monotonic() + 30)
                step += 1

            async def kept() -> dict[str, str]:
                nodes = await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())
                return {n.id: n.nominated_for for n in nodes.nodes if n.nominated_for}

            await asyncio.sleep(3.5)  # the gang has waited --nominate-after
            nominated: dict[str, str] = {}
            deadline = time.monotonic() + 30
            while len(nominated) != 2:
                assert time.monotonic() < deadline, f"no nomination\n{nominating.logs()}"
                await churn()
                await asyncio.sleep(0.5)
                nominated = await kept()
            assert set(nominated.values()) == {"lab/gang"}
            victim = nominating.by_address(leader)
            victim.kill()
            leader, lease = await wait_for_leader(db, after_token=lease, timeout=FAILOVER_LIMIT_S)
            successor = nominating.by_address(leader)

            async def successor_log() -> str:
                return successor.log_text()

            await eventually(successor_log, lambda log: "took up a stored nomination deployment=lab/gang" in log,
                             timeout=FAILOVER_LIMIT_S, what="the next leader took the nomination up")
            assert await kept() == nominated
            # What runs on the nominated nodes leaves; what arrives instead waits (the cluster
            # is otherwise full), and the gang is placed there once they are empty.
            problem, _ = await _placed(db)
            there = sorted({p["deployment"].rpartition("/")[2] for p in problem["placements"]
                            if p["node"] in nominated and not p["deployment"].endswith("/gang")})
            for name in there:
                await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name=name))
                await _submit(stubs, f"after-{name}", set(), time.monotonic() + 30)
            problem, _ = await eventually(lambda: _placed(db), lambda got: got[1].get("gang") == 1,
                                          timeout=30, what="the gang placed on the nodes let go")
            assert {p["node"] for p in problem["placements"] if p["deployment"] == "lab/gang"} == set(nominated)
            assert not any(p["node"] in nominated for p in problem["placements"]
                           if p["deployment"].rpartition("/")[2].startswith("after-"))
            assert check_state(problem, problem.get("placements", [])) == []
    finally:
        await fleet.stop()
        await db.dispose()


def test_a_first_start_on_a_port_taken_meanwhile_moves_to_a_free_one(db_url: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The port a controller found free can be taken before it binds (another process's
    connection took it as its ephemeral port: a CI run failed so). Its first start then moves to
    another free port; once it has served, a start again stays on its address, which agents know,
    and fails if that is taken."""
    import socket

    from bench import failover

    asyncio.run(_migrate(db_url))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        found = iter([port])
        real_stable_port = failover.stable_port
        monkeypatch.setattr(failover, "stable_port", lambda: next(found, None) or real_stable_port())
        controller = ControllerProcess(db_url, tmp_path, tmp_path / "admin.token", *CONTROLLER_FLAGS)
        assert controller.address == f"127.0.0.1:{port}"
        try:
            controller.start()
            assert controller.address != f"127.0.0.1:{port}" and controller.proc.poll() is None
            moved = controller.address
        finally:
            controller.stop()
    with socket.socket() as taken_again:
        taken_again.bind(("127.0.0.1", int(moved.rsplit(":", 1)[1])))
        taken_again.listen()
        with pytest.raises(RuntimeError, match="already in use"):
            controller.start()
        assert controller.address == moved

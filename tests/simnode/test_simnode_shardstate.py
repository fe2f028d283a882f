"""The shards a fleet's nodes hold, kept across a restart of the fleet (controller/simnode/shardstate.py):
written in batches off the event loop, atomically, restored as the agents left them (a load resumes
where it was), forgotten by a host that dies, and released by the first set that no longer names them."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from controller.simnode import shardstate
from controller.simnode.agent import DesiredShard, DesiredState, NodeAgent, Phase, ShardKey
from controller.simnode.credentials import CredentialFile
from controller.simnode.fleet import Fleet
from controller.simnode.main import build_fleet, build_parser
from controller.simnode.shardstate import ShardStateFile
from tests.file_writes import count_writes

RUNS = ShardKey("chat", 0, 0, "lab")
LOADS = ShardKey("chat", 0, 1, "lab")
FAILS = ShardKey("embed", 1, 0, "lab")


class Clocks:
    """The agent's monotonic clock and the wall clock, moved together by hand."""

    def __init__(self) -> None:
        self.mono, self.wall = 100.0, 1_700_000_000.0

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += s


def _shard(key: ShardKey, index: int, generation: int = 3) -> DesiredShard:
    return DesiredShard(key=key, tenant=key.tenant, accelerator_indices=(index,), accelerators=1, power_w=500.0,
                        generation=generation, deployment_uid=41)


def _busy_agent(clocks: Clocks) -> NodeAgent:
    """RUNS running, LOADS 4 s into a 10 s load, FAILS failed."""
    agent = NodeAgent("n0", 600.0, load_delay_s=10.0)
    agent.apply(DesiredState(7, (_shard(RUNS, 0), _shard(FAILS, 2))), clocks.mono)
    clocks.advance(10)
    agent.tick(clocks.mono)
    agent.fail(FAILS, "HBM ECC error", clocks.mono)
    agent.apply(DesiredState(8, (_shard(RUNS, 0), _shard(LOADS, 1), _shard(FAILS, 2))), clocks.mono)
    clocks.advance(4)
    return agent


def _file(path: Path, clocks: Clocks) -> ShardStateFile:
    return ShardStateFile(path, clock=lambda: clocks.mono, wall=lambda: clocks.wall)


async def test_a_restarted_agent_holds_its_shards_as_it_left_them_and_a_load_resumes(tmp_path: Path) -> None:
    clocks = Clocks()
    agent = _busy_agent(clocks)
    kept = _file(tmp_path / "shards.json", clocks)
    await kept.save([("n0", agent)])
    assert kept.path.stat().st_mode & 0o777 == 0o600
    assert sorted(json.loads(kept.path.read_text())["nodes"]["n0"]["shards"][i]["phase"] for i in range(3)) == [
        "failed", "loading", "running"]

    clocks.advance(5)  # the fleet was down 5 s: the model servers went on (the load is 9 s in)
    again = NodeAgent("n0", 600.0, load_delay_s=10.0)
    assert _file(kept.path, clocks).restore("n0", again) == 3
    assert again.reports() == agent.reports()  # ids, spec, generation, uid, phase, message
    assert again.desired_of(LOADS) == agent.desired_of(LOADS)
    assert again.tick(clocks.mono) == []  # 1 s of its load to go
    clocks.advance(1)
    assert [(r.key, r.phase) for r in again.tick(clocks.mono)] == [(LOADS, Phase.RUNNING)]
    assert again.power_draw_w() == 600.0 + 2 * 500.0

    # The stream's first set names what it holds: nothing to say (the first heartbeat said RUNNING).
    assert again.apply(DesiredState(1, (_shard(RUNS, 0), _shard(LOADS, 1), _shard(FAILS, 2))), clocks.mono) == []


async def test_a_restored_shard_the_controller_no_longer_assigns_is_stopped(tmp_path: Path) -> None:
    clocks = Clocks()
    kept = _file(tmp_path / "shards.json", clocks)
    await kept.save([("n0", _busy_agent(clocks))])
    again = NodeAgent("n0", 600.0)
    _file(kept.path, clocks).restore("n0", again)
    reports = again.apply(DesiredState(9, (_shard(RUNS, 0),)), clocks.mono)
    assert [(r.key, r.phase) for r in reports] == [(LOADS, Phase.STOPPED), (FAILS, Phase.STOPPED)]
    assert again.held() == [RUNS]


async def test_a_host_that_died_forgets_its_shards_and_so_does_the_file(tmp_path: Path) -> None:
    clocks = Clocks()
    kept = _file(tmp_path / "shards.json", clocks)
    dies, lives = _busy_agent(clocks), _busy_agent(clocks)
    await kept.save([("n0", dies), ("n1", lives)])
    dies.crash()  # `maia-simnode fault kill`: the host died
    await kept.save([("n0", dies), ("n1", lives)])
    restored = {n: NodeAgent(n, 600.0) for n in ("n0", "n1")}
    reread = _file(kept.path, clocks)
    assert [reread.restore(n, a) for n, a in restored.items()] == [0, 3]


async def test_writes_are_batched_off_the_loop_and_an_unchanged_fleet_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clocks = Clocks()
    agents = [(f"n{i:04}", NodeAgent(f"n{i:04}", 600.0)) for i in range(2000)]
    kept = _file(tmp_path / "shards.json", clocks)
    writes = count_writes(kept, monkeypatch)
    monkeypatch.setattr(shardstate, "SAVE_EVERY_S", 0.2)
    ended = asyncio.Event()
    saving = asyncio.create_task(kept.keep_saving(lambda: agents, ended))
    for i, (_, agent) in enumerate(agents):  # a join: every node given a shard, many changes a node
        agent.apply(DesiredState(1, (_shard(RUNS, 0),)), clocks.mono)
        agent.tick(clocks.mono + 2)
        if i % 500 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0.5)  # two periods or more, nothing changed in the second
    ended.set()
    await saving
    assert writes.sizes == [2000]  # once for 2,000 nodes' 4,000 changes; unchanged since: no write, even the last
    assert writes.off_the_loop()
    assert len(json.loads(kept.path.read_text())["nodes"]) == 2000


async def test_a_failed_write_leaves_the_file_as_it_was_and_is_done_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clocks = Clocks()
    agent = _busy_agent(clocks)
    kept = _file(tmp_path / "shards.json", clocks)
    await kept.save([("n0", agent)])
    before = kept.path.read_text()
    agent.crash()

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", full)
        with pytest.raises(OSError):
            await kept.save([("n0", agent)])
    assert kept.path.read_text() == before  # whole, the old one
    assert [p.name for p in tmp_path.iterdir()] == ["shards.json"]  # no temporary file left
    await kept.save([("n0", agent)])  # nothing changed since, but the file lags: written now
    assert json.loads(kept.path.read_text())["nodes"] == {}


def test_a_file_that_cannot_be_read_starts_the_nodes_empty(tmp_path: Path) -> None:
    (tmp_path / "shards.json").write_text('{"version": 1, "nodes": {"n0": {"at": 0, "shards": [{"phase": "x"}]}}')
    agent = NodeAgent("n0", 600.0)
    assert ShardStateFile(tmp_path / "shards.json").restore("n0", agent) == 0  # truncated: JSON error
    (tmp_path / "shards.json").write_text('{"version": 1, "nodes": {"n0": {"at": 0, "shards": [{"phase": "x"}]}}}')
    assert ShardStateFile(tmp_path / "shards.json").restore("n0", agent) == 0  # an unreadable entry


async def test_a_fleet_restarted_on_its_state_dir_restores_its_nodes_shards_unless_told_to_forget(
        tmp_path: Path) -> None:
    argv = ["--controller", "127.0.0.1:1", "--racks", "1", "--nodes-per-rack", "2", "--state-dir", str(tmp_path)]

    class Holding:  # a node that runs until stopped
        def __init__(self, node: object) -> None:
            self.spec, self.agent = node.spec, node.agent  # type: ignore[attr-defined]
            self._stopped = asyncio.Event()

        async def run(self) -> None:
            await self._stopped.wait()

        def stop(self) -> None:
            self._stopped.set()

    first = build_fleet(build_parser().parse_args(argv))
    assert first.shard_state is not None
    assert first.shard_state.path == CredentialFile.for_fleet(tmp_path, "127.0.0.1:1", "rack-").path.with_name(
        "shards-127.0.0.1_1-rack-.json")
    first.nodes[1].agent.apply(DesiredState(1, (_shard(RUNS, 0),)), 0.0)
    fleet = Fleet([Holding(n) for n in first.nodes], stagger_s=0, shard_state=first.shard_state)  # type: ignore[misc]
    run = asyncio.create_task(fleet.run())
    await asyncio.sleep(0.05)
    fleet.stop()  # SIGTERM: the last write as it ends
    assert await asyncio.wait_for(run, timeout=5) == 0

    again = build_fleet(build_parser().parse_args(argv))
    assert [n.agent.held() for n in again.nodes] == [[], [RUNS]]
    assert again.nodes[1].agent.phase_of(RUNS) is Phase.LOADING
    clean = build_fleet(build_parser().parse_args([*argv, "--forget-shards"]))
    assert [n.agent.held() for n in clean.nodes] == [[], []]
    assert clean.shard_state is not None
    await clean.shard_state.save([])  # forgotten: the next write holds nothing, whatever changed
    assert json.loads(clean.shard_state.path.read_text())["nodes"] == {}

"""Fault injection end to end: a real `maia-simnode` fleet serving its control socket, driven by
real `maia-simnode fault ...` processes, against a controller with short node-lifecycle graces
(suspect for 2 s, then down; work evicted after 3 s). Nodes killed from the CLI go suspect, then
down (their shards unknown, the deployment degraded), their work is placed again on the living
nodes; revived, they are ready again; a partitioned node goes suspect on missing heartbeats alone
(its stream stays open). SQLite only: the lifecycle rules are the same on both backends
(tests/integration/test_node_lifecycle_fleet.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path

from grpc_harness import RUNNING, Stubs, controlled_fleet, eventually, running_controller, spec
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

READY, SUSPECT, DOWN = common_pb2.NODE_STATE_READY, common_pb2.NODE_STATE_SUSPECT, common_pb2.NODE_STATE_DOWN
DEGRADED, UNKNOWN = deployments_pb2.DEPLOYMENT_PHASE_DEGRADED, common_pb2.SHARD_PHASE_UNKNOWN


def fault(control: Path, *args: str) -> Awaitable[subprocess.CompletedProcess[str]]:
    """`maia-simnode fault ARGS --control-socket CONTROL` in its own process."""
    return asyncio.to_thread(subprocess.run, [sys.executable, "-m", "controller.simnode.main", "fault", *args,
                                              "--control-socket", str(control)],
                             capture_output=True, text=True, timeout=30)


async def _states(stubs: Stubs) -> dict[str, int]:
    return {n.id: n.state for n in (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())).nodes}


async def _layout(stubs: Stubs) -> dict[tuple[int, int], str]:
    d = await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc"))
    return {(p.replica, p.shard): p.node for p in d.placements}


async def _watch_states(stubs: Stubs, nodes: set[str], seen: dict[str, set[int]]) -> None:
    """Record every state `nodes` are seen in (until cancelled)."""
    while True:
        for node, state in (await _states(stubs)).items():
            if node in nodes:
                seen.setdefault(node, set()).add(state)
        await asyncio.sleep(0.1)


async def _watch_svc(stubs: Stubs, seen: list[tuple[int, dict[str, set[int]]]]) -> None:
    """Record svc's phase and its shards' phases on each node, as its watch tells them (until cancelled)."""
    async for event in stubs.deployments.WatchDeployments(deployments_pb2.WatchDeploymentsRequest(name="svc")):
        shards: dict[str, set[int]] = {}
        for p in event.deployment.placements:
            shards.setdefault(p.node, set()).add(p.phase)
        seen.append((event.deployment.phase, shards))


async def test_nodes_killed_from_the_cli_are_suspected_downed_evicted_and_come_back_revived(tmp_path: Path) -> None:
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path,
                                  node_down_grace_s=2.0, node_eviction_grace_s=3.0) as app, \
            controlled_fleet(app, tmp_path) as (stubs, fleet, control):
        await eventually(lambda: _states(stubs), lambda s: list(s.values()) == [READY] * 4, timeout=30,
                         what="4 nodes ready")
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("svc", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
        await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                         lambda d: d.phase == RUNNING, timeout=60, what="svc running")
        before = await _layout(stubs)
        dead = set(before.values())
        idle = sorted(set(fleet.node_ids) - dead)

        seen: dict[str, set[int]] = {}
        watcher = asyncio.create_task(_watch_states(stubs, dead, seen))
        told: list[tuple[int, dict[str, set[int]]]] = []
        svc_watch = asyncio.create_task(_watch_svc(stubs, told))
        killed = await fault(control, "kill", "--node", ",".join(sorted(dead)))
        assert killed.returncode == 0, killed.stderr
        assert f"killed {len(dead)} nodes" in killed.stdout
        moved = await eventually(lambda: _layout(stubs), lambda layout: len(layout) == 2
                                 and set(layout.values()) == set(idle), timeout=30,
                                 what="replicas placed again on the nodes not killed")
        await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                         lambda d: d.phase == RUNNING, timeout=30, what="svc running again")
        watcher.cancel()
        svc_watch.cancel()
        assert all({SUSPECT, DOWN} <= seen[node] for node in dead), seen
        # Down, before the eviction: svc degraded, its shards on the dead nodes unknown (not running).
        assert any(phase == DEGRADED and set(shards) == dead and all(shards[n] == {UNKNOWN} for n in dead)
                   for phase, shards in told), told
        assert len(moved) == 2

        status = await fault(control, "status", "-o", "json")
        assert status.returncode == 0 and '"killed"' in status.stdout
        revived = await fault(control, "revive", "--all")
        assert revived.returncode == 0, revived.stderr
        await eventually(lambda: _states(stubs), lambda s: list(s.values()) == [READY] * 4, timeout=30,
                         what="the killed nodes ready again")
        assert await _layout(stubs) == moved  # valid placements stay where they are

        # A partition: the stream stays open, only the missing heartbeats (2 s) make it suspect.
        quiet = sorted(dead)[0]
        # 8 s: the poller must see it suspect (~2.5 s) before it heals, on a loaded host too
        partitioned = await fault(control, "partition", "--node", quiet, "--for", "8s")
        assert partitioned.returncode == 0, partitioned.stderr
        await eventually(lambda: _states(stubs), lambda s: s[quiet] in (SUSPECT, DOWN), timeout=15,
                         what="the partitioned node suspect")
        await eventually(lambda: _states(stubs), lambda s: s[quiet] == READY, timeout=30,
                         what="the partition healed by itself")

        unknown = await fault(control, "kill", "--node", "rack-07-n00")
        assert unknown.returncode == 2 and "rack-07-n00" in unknown.stderr

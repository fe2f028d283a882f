"""A node of a multi-node gang lost (evicted, deleted, registered again as another machine):
only its shards are placed again, beside the survivors; the survivors keep their node,
accelerators and shard index (full path and fast path)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from controller.domain.liveness import Transition
from controller.domain.values import NodeInfo, Spread
from controller.usecases import agents, liveness, nodes
from controller.usecases.ports import RecordingSignals
from test_reconcile_fast import assert_same, fresh, reconciler
from uc_builders import WHO, add_nodes, add_tenant, apply_topology, deployment, submit


async def _gang(db, replicas: int) -> None:
    await apply_topology(db, {"rack-a": "row-a", "rack-b": "row-a"})
    await add_nodes(db, "rack-a", 5)
    await add_nodes(db, "rack-b", 5)
    await add_tenant(db, "t1")
    await submit(db, deployment("gang", replicas=replicas, shards=16, accelerators=1, locality="rack",
                                min_replicas=1, shard_accelerator_milli=1000, shard_hbm_gib=48.0,
                                spread=Spread("rack", 1) if replicas > 1 else None, priority=100))


def _where(snapshot):
    return {(p["replica"], p["shard"]): (p["node"], tuple(p["accelerator_indices"]))
            for p in snapshot.problem["placements"] if p["deployment"] == "t1/gang"}


async def _lose(db, how: str, node: str) -> None:
    if how == "evict":
        async with db.unit_of_work() as uow:
            await liveness.apply_transitions(uow, [Transition(node, "down", "silent", evict=True)],
                                             datetime.now(timezone.utc))
    elif how == "delete":
        async with db.unit_of_work() as uow:
            await nodes.delete_node(uow, WHO, node, RecordingSignals())
    else:  # registered again as another machine (less HBM an accelerator): its shards released
        rack = node.rsplit("-n", 1)[0]
        info = NodeInfo(node_id=node, rack=rack, accelerators=4, accelerator_model="maia-100", hbm_gib=32.0,
                        idle_power_w=500.0)
        async with db.unit_of_work() as uow:
            await agents.register_node(uow, WHO, info, heartbeat_interval_ms=1000)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("how", ["evict", "delete", "reregister"])
@pytest.mark.parametrize("path", ["full", "fast"])
async def test_a_lost_node_of_a_gang_moves_only_its_shards(database, path, how, replicas):
    await _gang(database, replicas)
    loop = reconciler(database)
    assert (await loop.reconcile_once()).solved
    before = _where(await fresh(database))
    assert len(before) == 16 * replicas
    by_node: dict[str, list] = {}
    for key, (node, _) in before.items():
        by_node.setdefault(node, []).append(key)
    # a node holding shards in the middle of replica 0 (not its first shards)
    victim = sorted((n for n in by_node if by_node[n][0][0] == 0), key=lambda n: min(by_node[n]))[1]
    lost = set(by_node[victim])
    await _lose(database, how, victim)
    if path == "full":
        loop.resync()
    assert (await loop.reconcile_once()).solved
    after_snap = await fresh(database)
    after = _where(after_snap)
    assert set(after) == set(before)
    assert all(after[key][0] != victim for key in lost)
    assert {key: after[key] for key in before if key not in lost} == \
        {key: before[key] for key in before if key not in lost}
    if path == "fast":
        assert_same(loop.warm_snapshot, after_snap)

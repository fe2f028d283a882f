"""The cluster gauges (and `repositories.cluster_usage` under them) read their per-row tables
(deployments' reasons, nodes, sums per node) in partitions, each in a turn of the event loop of
its own (issue 8): what they report must not depend on where the partitions fall."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import update

from controller.observability import cluster
from controller.store import models as m
from controller.store import partitions
from controller.store.db import Database

from .seed import TWO_RACKS, seed_problem

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)
STATES = ("ready", "ready", "cordoned", "down", "ready", "ready", "ready")
CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": f"n{i}", "rack": "rack1" if i % 2 else "rack2", "accelerators": 4, "state": state,
               "accelerator_model": "a100" if i % 3 else "h100", "idle_power_w": 100.0}
              for i, state in enumerate(STATES)],
    "tenants": [{"id": "lab"}, {"id": "web"}],
    "deployments": [{"id": f"d{i}", "tenant": "lab" if i % 2 else "web", "replicas": 1, "shards_per_replica": 1,
                     "shard": {"accelerators": 1, "power_w": 50.0}} for i in range(9)],
    "placements": [{"deployment": f"d{i}", "replica": 0, "shard": 0, "node": f"n{i % 3}",
                    "accelerator_indices": [i // 3]} for i in range(6)],
}
# Deployments d6..d8 are unplaced, with these reasons (d7 names one code twice: counted once).
REASONS = {"d6": [{"code": "NO_CAPACITY"}], "d7": [{"code": "QUOTA_ACCELERATORS"}, {"code": "QUOTA_ACCELERATORS"},
                                                     {"code": "NO_CAPACITY"}], "d8": [{"code": ""}]}


async def _gauges(database: Database) -> cluster.ClusterGauges:
    async with database.unit_of_work() as uow:
        return await cluster.read_cluster_gauges(uow.session, now=NOW,
                                                 heard={"n1": NOW - timedelta(seconds=3)})


async def test_the_gauges_do_not_depend_on_the_partition_size(database: Database,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        for name, reasons in REASONS.items():
            await uow.session.execute(update(m.Deployment).where(m.Deployment.name == name).values(reasons=reasons))
        await uow.session.execute(update(m.Node).values(last_heartbeat_at=NOW - timedelta(seconds=20),
                                                        power_draw_w=300.0))
        await uow.commit()

    whole = await _gauges(database)  # the default partition holds every row here
    monkeypatch.setattr(partitions, "PARTITION", 2)
    assert await _gauges(database) == whole
    monkeypatch.setattr(partitions, "PARTITION", 1)
    assert await _gauges(database) == whole

    # And what it reports is what was written (the partitioning could not hide a dropped row).
    codes: dict[str, int] = {}
    for reasons in REASONS.values():
        for code in {r["code"] for r in reasons if r["code"]}:
            codes[code] = codes.get(code, 0) + 1
    assert whole.unplaced_by_reason == codes
    assert whole.nodes_by_state == {state: STATES.count(state) for state in ("ready", "cordoned", "suspect", "down")}
    up_racks = {n["rack"] for n in CLUSTER["nodes"] if n["state"] != "down"}
    assert set(whole.heartbeat_lag_max_s) == up_racks
    assert {r.id: r.draw_w for r in whole.racks} == {
        rack: 300.0 * sum(1 for n in CLUSTER["nodes"] if n["rack"] == rack and n["state"] != "down")
        for rack in ("rack1", "rack2")}
    ready = [n for n in CLUSTER["nodes"] if n["state"] == "ready"]
    held = {f"n{i % 3}": 0 for i in range(6)}
    for p in CLUSTER["placements"]:
        held[p["node"]] += 1
    assert sum(whole.free.values()) == sum(n["accelerators"] - held.get(n["id"], 0) for n in ready)

"""Builders for use-case tests: a topology, registered nodes, tenants, deployment specs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import event, func, select

from controller.identity import Principal
from controller.store import audit
from controller.store import models as m
from controller.store.db import Database, UnitOfWork
from controller.store.turns import WritePriority, current_priority
from controller.usecases import agents, deployments, tenants, topology
from controller.domain.values import (
    DeploymentSpec, NodeInfo, RackSpec, RowSpec, ShardReport, ShardSpec, TenantSpec, TopologySpec, ZoneSpec,
)
from controller.usecases.ports import RecordingSignals

WHO = Principal("tester")


async def apply_topology(db: Database, racks: dict[str, str] | None = None, *,
                         rack_budget_w: float | None = None, budgets: dict[str, float] | None = None) -> None:
    """Zone z1, rows as named by `racks` (rack -> row), all in z1; each rack's budget `rack_budget_w`
    but those `budgets` names."""
    racks = racks or {"rack-a": "row-a", "rack-b": "row-a"}
    spec = TopologySpec(
        zones=(ZoneSpec("z1"),),
        rows=tuple(RowSpec(r, "z1") for r in sorted(set(racks.values()))),
        racks=tuple(RackSpec(k, r, (budgets or {}).get(k, rack_budget_w)) for k, r in racks.items()),
    )
    async with db.unit_of_work() as uow:
        await topology.apply_topology(uow, WHO, spec, RecordingSignals())


async def add_nodes(db: Database, rack: str, count: int, *, accelerators: int = 4, model: str = "maia-100",
                    up: bool = True, prefix: str | None = None) -> list[str]:
    """Register nodes (and, with `up`, say Hello so they are ready)."""
    ids = []
    for i in range(count):
        info = NodeInfo(node_id=f"{prefix or rack}-n{i}", rack=rack, accelerators=accelerators,
                        accelerator_model=model, hbm_gib=64.0, idle_power_w=500.0)
        async with db.unit_of_work() as uow:
            reg = await agents.register_node(uow, WHO, info, heartbeat_interval_ms=1000)
        if up:
            async with db.unit_of_work() as uow:
                await agents.hello(uow, WHO, reg.node_id, reg.session_id, datetime.now(timezone.utc))
        ids.append(info.node_id)
    return ids


async def add_tenant(db: Database, tenant_id: str = "t1", **kw: Any) -> None:
    async with db.unit_of_work() as uow:
        await tenants.create_tenant(uow, WHO, TenantSpec(id=tenant_id, **kw), RecordingSignals())


def deployment(name: str = "svc", tenant: str = "t1", *, replicas: int = 1, shards: int = 1,
               accelerators: int = 1, **kw: Any) -> DeploymentSpec:
    shard_kw = {k.removeprefix("shard_"): kw.pop(k) for k in list(kw) if k.startswith("shard_")}
    return DeploymentSpec(name=name, tenant=tenant, replicas=replicas, shards_per_replica=shards,
                          shard=ShardSpec(accelerators=accelerators, **shard_kw), **kw)


def with_shard(spec: DeploymentSpec, **kw: Any) -> DeploymentSpec:
    return replace(spec, shard=replace(spec.shard, **kw))


async def row_counts(db: Database) -> dict[str, int]:
    """How many rows each table holds (to prove a refused request wrote nothing)."""
    out = {}
    async with db.unit_of_work() as uow:
        for model in (m.Zone, m.Row, m.Rack, m.Node, m.Tenant, m.Deployment, m.Placement, m.Event):
            out[model.__tablename__] = int(await uow.session.scalar(select(func.count()).select_from(model)) or 0)
        out["generation"] = int(await uow.session.scalar(select(m.ClusterState.generation)) or 0)
    return out


async def every_row(db: Database) -> dict[str, list[str]]:
    """Every row of every table, each as the repr of its values, sorted: what a test that writes
    nothing leaves exactly as it found it (`shared_cluster`)."""
    out = {}
    async with db.unit_of_work() as uow:
        for table in m.Base.metadata.sorted_tables:
            rows = (await uow.session.execute(select(table))).all()
            out[table.name] = sorted(repr(tuple(row)) for row in rows)
    return out


async def assert_refused_writing_nothing(db: Database, use_case: Callable[[UnitOfWork], Awaitable[Any]],
                                         error: type[Exception], message: str) -> None:
    """`use_case` raises `error` saying `message`, and no table (nor the generation) changed."""
    before = await row_counts(db)
    with pytest.raises(error) as info:
        async with db.unit_of_work() as uow:
            await use_case(uow)
    assert message in info.value.message
    assert await row_counts(db) == before


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    """The SQL statements the database runs inside the block."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)


async def quiet_agent() -> AsyncIterator[Any]:
    """What an agent that stays connected and says nothing after its Hello sends (`AgentHub.converse`)."""
    await asyncio.Event().wait()
    yield


async def no_publish(names: set[str], deleted: list) -> None:
    """A reconciler's `publish` for tests that watch nothing."""


async def run_all(db: Database) -> None:
    """Every placed shard reports running (as agents would)."""
    async with db.unit_of_work() as uow:
        placements = (await uow.session.execute(
            select(m.Placement.node_id, m.Placement.replica, m.Placement.shard, m.Deployment.tenant_id,
                   m.Deployment.name).join(m.Deployment))).all()
    async with db.unit_of_work() as uow:
        await agents.flush_reports(uow, {}, [(node, ShardReport(name, replica, shard, 10**9, "running", tenant=tenant))
                                             for node, replica, shard, tenant, name in placements])


async def submit(db: Database, spec: DeploymentSpec) -> None:
    """Submit a deployment in its own unit of work, as the API would."""
    async with db.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, spec, RecordingSignals())


def batch_priorities(batcher: Any, monkeypatch: pytest.MonkeyPatch) -> list[WritePriority]:
    """The write priority each `batcher.commit_batch` (a submit or delete batch) runs at, from now on."""
    priorities: list[WritePriority] = []
    commit_batch = batcher.commit_batch

    async def recorded(batch: Any) -> Any:
        priorities.append(current_priority())
        return await commit_batch(batch)

    monkeypatch.setattr(batcher, "commit_batch", recorded)
    return priorities


async def appended_elsewhere(db: Database) -> None:
    """Another process (a leader before this one, `maiactl` on the file) appends to the audit
    chain after this one did: the head this process wrote last is no longer the database's. Two
    entries, "here" then "elsewhere"."""
    for actor in ("here", "elsewhere"):
        known = dict(audit._last_heads)
        async with db.unit_of_work() as uow:
            await audit.append(uow.session, [audit.AuditRecord(actor=actor, action="test.append")])
            await uow.commit()
    audit._last_heads.clear()
    audit._last_heads.update(known)  # what this process knew before the other appended

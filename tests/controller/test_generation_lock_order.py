"""PostgreSQL's lock order (store/changes.py): a use case that moves the generation takes the
generation writers' lock before its first row lock, so that a plan commit holding it exclusive
(it holds the generation's row while it writes rows) never waits for a row held by one that waits
for it (PostgreSQL would break that cycle as a deadlock, a second later)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from controller.reconcile import Reconciler, first_checks
from controller.domain.restarts import RestartPolicy
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.changes import move_generation, moves_generation_first
from controller.usecases import tenants, updates
from controller.domain.values import TenantSpec
from controller.usecases.ports import RecordingSignals
from test_failed_shards import Clocks, placed, reconciler, report
from uc_builders import WHO, deployment, no_publish, submit, with_shard

pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


async def _waits_for_generation_writers(db) -> bool:
    async with db.unit_of_work() as uow:
        return bool(await uow.session.scalar(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")))


async def _waiting_for_generation_writers(db, call) -> asyncio.Task:  # noqa: ANN001
    """`call` started, once it waits for the generation writers' lock (still running)."""
    task = asyncio.create_task(call)
    for _ in range(500):
        if await _waits_for_generation_writers(db) or task.done():
            break
        await asyncio.sleep(0.01)
    assert not task.done()
    return task


async def _row_free(db, table: str, row_id: int) -> bool:
    async with db.unit_of_work() as uow:
        try:
            await uow.session.execute(text(f"SELECT id FROM {table} WHERE id = :id FOR NO KEY UPDATE NOWAIT"),
                                      {"id": row_id})
        except Exception:  # noqa: BLE001  (lock not available)
            return False
        return True


async def test_an_update_with_a_request_id_waits_for_the_generation_writers_before_its_row(cluster):
    """An update's request id is remembered with a DELETE of old ids (it flushes the deployment's
    row, locking it) before the generation's bump: the generation writers' lock must come first."""
    await submit(cluster, deployment("svc"))
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert row is not None
        deployment_id, version = row.id, row.resource_version
    async with cluster.unit_of_work() as first:  # a plan commit that takes the generation first
        await moves_generation_first(first.session)
        await move_generation(first.session, 0)  # sent with it (BEGIN), the generation's row then

        async def update() -> None:
            async with cluster.unit_of_work() as uow:
                await updates.update_deployment(uow, WHO, deployment("svc", replicas=2), version,
                                                RecordingSignals(), request_id="req-1")

        task = await _waiting_for_generation_writers(cluster, update())
        # The commit may now write the deployment's row: the update holds no lock on it.
        assert await _row_free(cluster, "deployments", deployment_id)
        await first.commit()
    await task
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert row is not None and row.replicas == 2 and row.phase is not m.DeploymentPhase.DELETING


async def test_a_pass_commits_the_failures_it_released_before_it_retires_replicas(cluster, monkeypatch):
    """Releasing failed replicas moves the generation (its row held to the COMMIT); retiring
    replaced replicas writes deployments, placements and nodes. In one transaction the second took
    row locks while holding the generation's row, waited for by a report flush, a delete batch or
    liveness holding those rows: a deadlock. The failures' step is committed first."""
    clocks = Clocks()
    loop = reconciler(cluster, clocks, RestartPolicy(initial_delay_s=5, max_delay_s=20, limit=3))
    await submit(cluster, deployment("svc", replicas=2, accelerators=4))
    await loop.reconcile_once()
    for replica in (0, 1):
        await report(cluster, "svc", replica, "running")
    await report(cluster, "svc", 0, "failed", "CUDA error: out of memory")
    await loop.reconcile_once()  # the back-off starts
    failed_node = (await placed(cluster, "svc"))[0][0]
    generation_free: list[bool] = []
    retire = first_checks.retire_replaced

    async def retire_replaced(session, **kw):
        generation_free.append(await _row_free(cluster, "cluster_state", 1))
        return await retire(session, **kw)

    monkeypatch.setattr(first_checks, "retire_replaced", retire_replaced)
    clocks.s = 5.0
    await loop.reconcile_once()  # released (the generation moved), then the retirements checked
    assert (await placed(cluster, "svc"))[0][0] != failed_node
    assert generation_free == [True]


async def _zone_free(db, zone: str) -> bool:
    async with db.unit_of_work() as uow:
        try:
            await uow.session.execute(text("SELECT id FROM zones WHERE id = :id FOR UPDATE NOWAIT"), {"id": zone})
        except Exception:  # noqa: BLE001  (lock not available)
            return False
        return True


async def test_a_tenant_update_naming_zones_waits_for_the_generation_writers_before_locking_them(cluster):
    """A tenant's write locks the zones it names (`FOR KEY SHARE`: a zone's deletion waits for it);
    it took that lock before the generation writers' lock, and a deletion holding that lock shared
    and waiting for the zone, behind a plan commit waiting for it exclusive, made a cycle."""
    async with cluster.unit_of_work() as first:  # a plan commit that takes the generation first
        await moves_generation_first(first.session)
        await move_generation(first.session, 0)

        async def update() -> None:
            async with cluster.unit_of_work() as uow:
                await tenants.update_tenant(uow, WHO, TenantSpec("t1", zones=("z1",)), RecordingSignals())

        task = await _waiting_for_generation_writers(cluster, update())
        assert await _zone_free(cluster, "z1")  # nothing locked before the generation writers' lock
        await first.commit()
    await task


async def test_an_update_of_a_shard_takes_the_isolation_lock_before_its_deployments_row(cluster):
    """The shard's columns fire the isolation trigger, which locks isolation_state; by the
    trigger that lock came after the deployment's row (taken by the version's UPDATE), while a
    plan commit takes isolation_state after its placements and before its deployments: each
    held what the other waited for."""
    await submit(cluster, deployment("svc"))
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        deployment_id, version = row.id, row.resource_version
    async with cluster.unit_of_work() as first:  # a plan commit past its placements
        await first.session.execute(text("SELECT 1 FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE"))

        async def update() -> None:
            async with cluster.unit_of_work() as uow:
                await updates.update_deployment(uow, WHO, deployment("svc", shard_hbm_gib=8.0), version,
                                                RecordingSignals())

        task = asyncio.create_task(update())
        for _ in range(300):  # until it waits for a lock (isolation_state's, held above)
            async with cluster.unit_of_work() as uow:
                if await uow.session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
                    break
            await asyncio.sleep(0.01)
        assert not task.done()
        # The commit may now write the deployment's row: the update holds no lock on it.
        assert await _row_free(cluster, "deployments", deployment_id)
        await first.commit()
    await task


async def test_a_rollback_locks_the_placements_it_adopts_before_isolation_state_and_its_row(cluster):
    """A rollback (`updates._adoptable`) rewrites the revision of the old replicas' placements:
    written after the deployment's row (and isolation_state's, for a shard change), those came
    after the locks a plan commit takes after its placements. They are locked first now."""
    v1 = deployment("svc", accelerators=1, spread=None)
    await submit(cluster, v1)
    await Reconciler(cluster, push=lambda ids: None, publish=no_publish).reconcile_once()
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        await updates.update_deployment(uow, WHO, with_shard(v1, accelerators=2), row.resource_version,
                                        RecordingSignals())
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        deployment_id, version = row.id, row.resource_version
        [placement_id] = [p.id for p in row.placements if p.revision == 1]
    async with cluster.unit_of_work() as first:  # a plan commit writing the old replica's placement
        await first.session.execute(text("SELECT id FROM placements WHERE id = :id FOR NO KEY UPDATE"),
                                    {"id": placement_id})

        async def rollback() -> None:
            async with cluster.unit_of_work() as uow:
                await updates.update_deployment(uow, WHO, v1, version, RecordingSignals())

        task = asyncio.create_task(rollback())
        for _ in range(300):  # until it waits for a lock (the placement's, held above)
            async with cluster.unit_of_work() as uow:
                if await uow.session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
                    break
            await asyncio.sleep(0.01)
        assert not task.done()
        # The commit may now take isolation_state and write the deployment's row: the rollback holds neither.
        assert await _row_free(cluster, "isolation_state", 1)
        assert await _row_free(cluster, "deployments", deployment_id)
        await first.commit()
    await task
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert (row.template_revision, {p.id: p.revision for p in row.placements if p.id == placement_id}) == (
            3, {placement_id: 3})

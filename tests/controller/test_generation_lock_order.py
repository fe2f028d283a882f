"""PostgreSQL's lock order (store/changes.py): a use case that moves the generation takes the
generation writers' lock before its first row lock, so that a plan commit holding it exclusive
(it holds the generation's row while it writes rows) never waits for a row held by one that waits
for it (PostgreSQL would break that cycle as a deadlock, a second later)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from controller.store import models as m
from controller.store import repositories as repo
from controller.store.changes import move_generation, moves_generation_first
from controller.usecases import updates
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, deployment, submit

pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


async def _waits_for_generation_writers(db) -> bool:
    async with db.unit_of_work() as uow:
        return bool(await uow.session.scalar(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")))


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

        task = asyncio.create_task(update())
        for _ in range(500):
            if await _waits_for_generation_writers(cluster) or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done()
        # The commit may now write the deployment's row: the update holds no lock on it.
        assert await _row_free(cluster, "deployments", deployment_id)
        await first.commit()
    await task
    async with cluster.unit_of_work() as uow:
        row = await repo.get_deployment(uow.session, "t1", "svc")
        assert row is not None and row.replicas == 2 and row.phase is not m.DeploymentPhase.DELETING


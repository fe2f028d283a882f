"""Migration 0029 (a shard's phase `unknown`) on data, on SQLite and PostgreSQL.

The upgrade changes no schema (the phase is a plain string); the downgrade writes each `unknown`
placement back as the phase its message says it last had, `assigned` when it says none, so that
an older controller reads only phases it knows.
"""

from __future__ import annotations

from controller.store.db import Database

from .seed import TWO_RACKS, seed_problem
from .test_migration_0010 import _downgrade, _run, _upgrade

BEFORE, REVISION = "0028_closed_usage", "0029_shard_phase_unknown"
PROBLEM = {
    **TWO_RACKS,
    "nodes": [{"id": "n1", "rack": "rack1", "accelerators": 4}],
    "tenants": [{"id": "lab"}],
    "deployments": [{"id": "chat", "tenant": "lab", "replicas": 4, "shards_per_replica": 1,
                     "shard": {"accelerators": 1}}],
    "placements": [{"deployment": "chat", "replica": r, "shard": 0, "node": "n1", "accelerator_indices": [r]}
                   for r in range(4)],
}


async def test_the_downgrade_writes_unknown_shards_back_as_they_last_were(db_url: str) -> None:
    await _upgrade(db_url, "head")  # the rows seeded as the models have them now
    db = Database(db_url)
    try:
        async with db.unit_of_work() as uow:
            await seed_problem(uow.session, PROBLEM)
            await uow.commit()
        said = {0: "node n1 is down: no contact for 35s (down grace 30s); last known running: serving",
                1: "node n1 is down: no contact for 35s (down grace 30s); last known loading",
                2: "node n1 is down: no contact for 35s (down grace 30s); last known assigned"}
        for replica, message in said.items():
            await _run(db, "UPDATE placements SET phase = 'unknown', message = :m WHERE replica = :r",
                       m=message, r=replica)
        await _downgrade(db_url, BEFORE)
        assert dict(await _run(db, "SELECT replica, phase FROM placements")) == {
            0: "running", 1: "loading", 2: "assigned", 3: "running"}  # the fourth was never unknown
        await _upgrade(db_url, REVISION)
    finally:
        await db.dispose()

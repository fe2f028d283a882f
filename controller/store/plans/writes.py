"""A plan commit's writes: placements, usage meters, deployments and nodes (`_write`).

Its statements over lists of rows are built once a dialect (`_Writes`); on PostgreSQL they take
each table's rows in ascending id, the lock order a report flush keeps too (store/changes.py).
`_as_written` is what a scoped commit's read should find once these writes are on it: the commit
that takes the generation's lock last compares the two (`_commit_locking_last`, plans/commit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, delete, insert, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.inlist import POSTGRESQL, any_of_named, any_of_named_in_order, dialect_of, listed, locked_in_order
from controller.store.models import Node, Placement, ShardPhase
from controller.store.metering import DeploymentMeter, StartedShard, start_intervals, stop_intervals
from controller.store.repositories.usage import revision_power_w
from controller.store.snapshot import ShardKey
from controller.store.marks import rowcount_unread
from controller.store.plans.check import _Changes
from controller.store.plans.committed import (_DEPLOYMENTS, _PLACEMENTS, _Committed, _PlacedRows, _Row, _chunks, _rows,
    _where)


def _as_written(read: _Committed, deletes: list[_Row], updates: list[tuple[_Row, Any]], inserts: dict[ShardKey, Any],
                revision_of: dict[ShardKey, int], deployment_updates: list[dict[str, Any]],
                deleted: set[str]) -> tuple[dict[str, Any], _PlacedRows]:
    """`_rows` of the scope as `read`, once a commit's writes are on it."""
    deployments, placed = _rows(read)
    for row in deletes:
        placed.pop(row.key, None)
    for row, pl in updates:
        placed[row.key] = (*_where(pl), ShardPhase.ASSIGNED, row.revision)
    for key, pl in inserts.items():
        placed[key] = (*_where(pl), ShardPhase.ASSIGNED, revision_of[key])
    by_id = {d.id: key for key, d in deployments.items()}
    for update_ in deployment_updates:
        key = by_id[update_["b_id"]]
        deployments[key] = deployments[key]._replace(phase=update_["phase"], reasons=update_["reasons"],
                                                     generation=update_["generation"])
    for key in deleted:
        deployments.pop(key, None)
    return deployments, placed


# A deployment's phase, reasons and generation as a plan commit writes them: a Core executemany
# (its row count is not read: the ORM's bulk UPDATE checks it, and so could not be deferred). The
# rows were read under the generation lock in this transaction, and only a plan commit deletes
# a schedulable deployment's row.
_UPDATE_DEPLOYMENT = rowcount_unread(
    update(_DEPLOYMENTS).where(_DEPLOYMENTS.c.id == bindparam("b_id")).values(
        phase=bindparam("phase"), reasons=bindparam("reasons"), generation=bindparam("generation"),
        updated_at=bindparam("updated_at")))


@dataclass(frozen=True)
class _Writes:
    """A plan commit's statements over lists of rows for one dialect, built once (each list
    named `ids`): placements and deployments deleted, nodes whose assignment generation moves;
    on PostgreSQL, placements and deployments locked. Their row counts are not read
    (`rowcount_unread`).

    PostgreSQL locks the rows of each table in ascending id (the lock order: store/changes.py): a
    report flush locks them so (`repo.write_reported_shards`, `deployments_named`,
    `write_heartbeats`), and a commit that took two rows in the other order than the flush
    deadlocked with it (PostgreSQL aborted one after `deadlock_timeout`). A DELETE or UPDATE over
    a list takes its rows in the order its plan scans them (an index's or the heap's), so theirs
    take them in a subquery first, `ORDER BY id` (`FOR UPDATE`: what a DELETE takes; `FOR NO KEY
    UPDATE`: an UPDATE of other columns); `lock_*` take the rows of a commit that deletes some and
    updates others of one table, before it writes either."""

    delete_placements: Any
    delete_deployments: Any
    bump_nodes: Any
    lock_placements: Any = None
    lock_deployments: Any = None

    @classmethod
    def of(cls, dialect: str) -> _Writes:
        def unread(statement: Any) -> Any:
            return rowcount_unread(statement)

        def listed_ids(table: Any, *, deletes: bool) -> ColumnElement[bool]:
            return any_of_named_in_order(dialect, table.c.id, "ids", deletes=deletes)

        nodes = Node.__table__
        return cls(unread(delete(_PLACEMENTS).where(listed_ids(_PLACEMENTS, deletes=True))),
                   unread(delete(_DEPLOYMENTS).where(listed_ids(_DEPLOYMENTS, deletes=True))),
                   unread(update(nodes).where(listed_ids(nodes, deletes=False))
                          .values(assignment_generation=nodes.c.assignment_generation + 1)),
                   *((_locked_in_order(_PLACEMENTS, deletes=True), _locked_in_order(_DEPLOYMENTS, deletes=True))
                     if dialect == POSTGRESQL else ()))


def _locked_in_order(table: Any, *, deletes: bool) -> Select[Any]:
    """PostgreSQL: the rows of `table` whose ids the parameter `ids` lists, locked in ascending id
    (a text id in code point order, as Python sorts it: `repo.write_heartbeats`; the database's
    collation may order it otherwise)."""
    return locked_in_order(any_of_named(POSTGRESQL, table.c.id, "ids"), table.c.id, deletes=deletes)


_WRITES = {dialect: _Writes.of(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def _write(
    session: AsyncSession, *, changes: _Changes, deletes: list[_Row], deployments: dict[str, Any],
    new_generation: dict[str, int], deployment_updates: list[dict[str, Any]], changed_nodes: set[str],
    changed_deployments: set[str], deleted_deployments: set[str], now: datetime,
) -> set[str]:
    """A plan commit's placements, usage meters, deployments and nodes. Keyword-only: three sets
    of names in a row are easily handed over in the wrong order. Returns the deployments (keys)
    whose placement rows it deleted, moved or inserted, taken from the very rows it wrote: the
    change log names every one (`_land`), whatever path put a row among them."""
    inserts = changes.inserts
    updates = sorted(changes.updates, key=lambda update_: update_[0].id)  # each table's rows in ascending id
    dialect = dialect_of(session)
    writes = _WRITES[dialect]
    deleted_ids = sorted(deployments[name].id for name in deleted_deployments)
    await _lock_deleted_and_updated(session, writes.lock_placements, [row.id for row in deletes],
                                    [row.id for row, _ in updates])
    for chunk in _chunks(sorted(row.id for row in deletes)):
        await session.execute(writes.delete_placements, {"ids": listed(dialect, chunk)})
    if updates:  # the ORM's bulk UPDATE: its row count is checked (a placement deleted since fails the commit)
        await session.execute(
            update(Placement),
            [
                {
                    "id": row.id,
                    "node_id": pl.node,
                    "accelerator_indices": list(pl.accelerator_indices),
                    "accelerator_milli": pl.accelerator_milli,
                    "phase": ShardPhase.ASSIGNED,
                    "message": "",
                    "generation": new_generation[row.key[0]],
                    "updated_at": now,
                }
                for row, pl in updates
            ],
        )
    started: list[StartedShard] = [
        StartedShard(row.deployment_id, row.key[1], row.key[2], pl.node, pl.accelerator_milli,
                     len(pl.accelerator_indices), revision_power_w(deployments[row.key[0]], row.revision))
        for row, pl in updates
    ]
    if inserts:  # no RETURNING: the usage meter finds the rows by their keys (`start_intervals`)
        await session.execute(
            insert(_PLACEMENTS),
            [
                {
                    "deployment_id": deployments[key[0]].id,
                    "replica": key[1],
                    "shard": key[2],
                    "node_id": pl.node,
                    "accelerator_indices": list(pl.accelerator_indices),
                    "accelerator_milli": pl.accelerator_milli,
                    "phase": ShardPhase.ASSIGNED,
                    "message": "",
                    "generation": new_generation[key[0]],
                    "revision": changes.revision_of[key],
                    "updated_at": now,
                }
                for key, pl in inserts.items()
            ],
        )
        started += [StartedShard(deployments[key[0]].id, key[1], key[2], pl.node, pl.accelerator_milli,
                                 len(pl.accelerator_indices),
                                 revision_power_w(deployments[key[0]], changes.revision_of[key]))
                    for key, pl in inserts.items()]
    # The usage meter follows the placements: moved shards stop on the old node, start on the new.
    await stop_intervals(session, [row.id for row in deletes] + [row.id for row, _ in updates], now)
    await start_intervals(session, started, now, nodes=changes.nodes, deployments={
            d.id: DeploymentMeter(d.name, d.tenant_id, d.shard_power_w)
        for d in map(deployments.__getitem__, changed_deployments)})
    await _lock_deleted_and_updated(session, writes.lock_deployments, deleted_ids,
                                    [update_["b_id"] for update_ in deployment_updates])
    if deployment_updates:
        await session.execute(_UPDATE_DEPLOYMENT, sorted(deployment_updates, key=lambda update_: update_["b_id"]))
    for chunk in _chunks(deleted_ids):
        await session.execute(writes.delete_deployments, {"ids": listed(dialect, chunk)})
    for chunk in _chunks(sorted(changed_nodes)):
        await session.execute(writes.bump_nodes, {"ids": list(chunk)})
    return {row.key[0] for row in deletes} | {row.key[0] for row, _ in updates} | {key[0] for key in inserts}


async def _lock_deleted_and_updated(session: AsyncSession, lock: Any, deleted: list[int], updated: list[int]) -> None:
    """PostgreSQL (`lock`: `_Writes.lock_*`): the rows of one table a commit deletes and those it
    updates, when it does both, locked together in ascending id before either write (each write
    alone takes its rows in that order: `_Writes`; `lock` exists only there)."""
    if lock is not None and deleted and updated:
        await session.execute(lock, {"ids": listed(POSTGRESQL, sorted({*deleted, *updated}))})

"""Zones, rows and racks: the mesh's fixed shape."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store.marks import sqlite_refusal
from controller.store.pg_driver import sqlstate


async def list_zones(session: AsyncSession) -> list[m.Zone]:
    return list(await session.scalars(select(m.Zone).order_by(m.Zone.id)))


async def list_rows(session: AsyncSession) -> list[Row[tuple[str, str, float | None]]]:
    """Every row's (id, zone_id, power_budget_w), by id: plain rows, as `list_racks`. ORM objects
    would stay in the session's identity map, and a later read in the transaction would answer
    them as first loaded, not as `write_topology_item`'s UPDATE left them."""
    return list(await session.execute(select(m.Row.id, m.Row.zone_id, m.Row.power_budget_w).order_by(m.Row.id)))


async def list_racks(session: AsyncSession) -> list[Row[tuple[str, str, float | None]]]:
    """Every rack's (id, row_id, power_budget_w), by id: plain rows, not ORM objects. At 1,024 racks
    the objects (and a query for their rows, which no caller read) took ~27 ms on SQLite against
    ~6 ms for the columns, in a topology apply's check holding the cluster generation."""
    return list(await session.execute(select(m.Rack.id, m.Rack.row_id, m.Rack.power_budget_w).order_by(m.Rack.id)))


async def get_rack(session: AsyncSession, rack_id: str) -> m.Rack | None:
    return await session.get(m.Rack, rack_id)


async def write_topology_item(session: AsyncSession, model: type[m.Row] | type[m.Rack], key: str,
                              was: Mapping[str, Any] | None, **values: Any) -> bool:
    """Write the row or rack `key` of `model` with `values`: inserted when the caller read none
    (`was` None; an id another transaction inserted since fails on its primary key:
    `topology_item_taken`), else updated only where it still holds `was` (column -> value, as the
    caller read them). False when it no longer does: changed or deleted since that read (on
    PostgreSQL a transaction changing it is waited for, then its result judged)."""
    if was is None:
        await session.execute(insert(model).values(id=key, **values))
        return True
    unchanged = [getattr(model, column).is_not_distinct_from(value) for column, value in was.items()]
    written = await session.execute(update(model).where(model.id == key, *unchanged).values(**values)
                                    .execution_options(synchronize_session=False))
    return written.rowcount == 1


# What holds each kind of item: the child table and its column that names it.
_HELD_BY = {"rack": (m.Node, m.Node.rack_id), "row": (m.Rack, m.Rack.row_id), "zone": (m.Row, m.Row.zone_id)}
_MODELS: dict[str, type[m.Base]] = {"rack": m.Rack, "row": m.Row, "zone": m.Zone}


async def held_by(session: AsyncSession, kind: str, item_id: str, limit: int) -> tuple[int, list[str]]:
    """How many nodes a rack holds (racks a row, rows a zone), and the first `limit` of their ids."""
    model, column = _HELD_BY[kind]
    count = int(await session.scalar(select(func.count()).select_from(model).where(column == item_id)) or 0)
    ids = list(await session.scalars(select(model.id).where(column == item_id).order_by(model.id).limit(limit)))
    return count, ids


async def tenants_naming_zone(session: AsyncSession, zone_id: str) -> list[str]:
    """The tenants whose contract names the zone (their `zones`, a JSON list: read and judged here)."""
    return sorted(tenant_id for tenant_id, zones in await session.execute(select(m.Tenant.id, m.Tenant.zones))
                  if zone_id in (zones or ()))


async def lock_topology_item(session: AsyncSession, kind: str, item_id: str) -> bool:
    """Lock the rack, row or zone `item_id` for its deletion (PostgreSQL: a node registering into
    the rack, a rack into the row, a row into the zone holds its key share until it commits, and
    one that comes after waits for the deletion); False if there is none."""
    model = _MODELS[kind]
    return await session.scalar(select(model.id).where(model.id == item_id).with_for_update()) is not None


async def delete_topology_item(session: AsyncSession, kind: str, item_id: str) -> None:
    model = _MODELS[kind]
    await session.execute(delete(model).where(model.id == item_id))


# The foreign keys by which a node names its rack, a rack its row and a row its zone.
_PARENT_KEYS = frozenset(str(key.constraint.name) for _, column in _HELD_BY.values() for key in column.foreign_keys)
_FOREIGN_KEY_VIOLATION = "23503"  # PostgreSQL's SQLSTATE


def topology_parent_gone(exc: BaseException) -> bool:
    """`exc` is the refusal of a node naming a rack, a rack naming a row or a row naming a zone
    that is not there: deleted after the writer read it (`lock_topology_item` locks it against the
    writes that name it, not against their reads). PostgreSQL's error names the foreign key;
    SQLite's names none, so there it is any foreign key's refusal."""
    return _refused_by(exc, sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY, {"FOREIGN KEY constraint failed"},
                      _FOREIGN_KEY_VIOLATION, _PARENT_KEYS)


# The primary keys of zones, rows and racks: what refuses an item inserted twice.
_ITEM_KEYS = {str(model.__table__.primary_key.name): f"{model.__tablename__}.id" for model in _MODELS.values()}
_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE


def topology_item_taken(exc: BaseException) -> bool:
    """`exc` is the refusal of a zone, row or rack inserted under an id another transaction inserted
    after this one read it absent (`upsert`, `write_topology_item`): committed before the INSERT,
    or, on PostgreSQL, under way then (the INSERT waits for it to commit, then fails)."""
    return _refused_by(exc, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY,
                       {f"UNIQUE constraint failed: {column}" for column in _ITEM_KEYS.values()},
                       _UNIQUE_VIOLATION, _ITEM_KEYS)


def _refused_by(exc: BaseException, sqlite_code: int, sqlite_messages: set[str], pg_sqlstate: str,
                constraints: Collection[str]) -> bool:
    """`exc` is a write's refusal by one of these `constraints`: SQLite's by its extended error code
    and message (which alone name the table and column, no constraint), PostgreSQL's by its
    SQLSTATE and the constraint its error names."""
    if not isinstance(exc, IntegrityError):
        return False
    if isinstance(exc.orig, sqlite3.IntegrityError):
        return sqlite_refusal(exc.orig, sqlite_code, sqlite_messages)
    driver = getattr(exc.orig, "orig", None)  # asyncpg's exception (SQLAlchemy's EmulatedDBAPIException.orig)
    return sqlstate(exc) == pg_sqlstate and getattr(driver, "constraint_name", None) in constraints

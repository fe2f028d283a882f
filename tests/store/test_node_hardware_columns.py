"""`changes.NODE_HARDWARE_COLUMNS`, the nodes columns a Register checks before it takes
isolation_state's row ahead of its node rows (`will_change_nodes_hardware`), is exactly what the
live schema's isolation and capacity triggers on nodes watch (migrations 0005, 0012, 0019, 0022):
a migration that changes their `UPDATE OF` or `WHEN` and forgets the code fails here (a column
missing from the constant brings back the Register/plan-commit deadlock of
tests/store/test_register_lock_order.py; one too many takes the lock for nothing)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from sqlalchemy import text

from controller.domain.values import NodeInfo
from controller.identity import Principal
from controller.store import models as m
from controller.store.changes import NODE_HARDWARE_COLUMNS
from controller.store.db import Database
from controller.usecases import agents

# The triggers that move isolation_state or capacity_state (the migrations' names for them).
WATCHERS = ("trg_isolation_", "trg_z_capacity_")
_TRIGGERS_SQLITE = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'nodes'"
_TRIGGERS_PG = ("SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE tgrelid = 'nodes'::regclass AND NOT tgisinternal")


async def _update_triggers(db: Database) -> dict[str, str]:
    """The definitions of the watchers' triggers on nodes that an UPDATE fires, by name."""
    async with db.engine.connect() as conn:
        rows = (await conn.execute(text(_TRIGGERS_SQLITE if db.is_sqlite else _TRIGGERS_PG))).all()
    return {name: sql for name, sql in rows
            if name.startswith(WATCHERS) and re.search(r"\bUPDATE\b", sql.split(" ON ")[0])}


async def test_the_columns_the_isolation_and_capacity_triggers_on_nodes_watch_are_the_constant(
        database: Database) -> None:
    triggers = await _update_triggers(database)
    assert {name.split("_nodes")[0] for name in triggers} == {"trg_isolation", "trg_z_capacity"}, triggers
    watched: set[str] = set()
    for name, sql in triggers.items():
        columns = re.search(r"\bUPDATE OF (.+?) ON\b", sql)
        assert columns is not None, f"{name} fires on an update of any column: {sql}"
        named = {column.strip() for column in columns.group(1).split(",")}
        compared = set(re.findall(r"\bold\.(\w+)", sql, flags=re.IGNORECASE))  # its WHEN, if any
        assert not compared or compared == named, f"{name}: UPDATE OF {named}, WHEN compares {compared}"
        watched |= named
    assert watched == set(NODE_HARDWARE_COLUMNS)
    assert len(NODE_HARDWARE_COLUMNS) == len(set(NODE_HARDWARE_COLUMNS))


INFO = NodeInfo("n1", "rack-a", 4, hostname="h1", accelerator_model="a100", hbm_gib=80.0, cpu_milli=64_000,
                memory_mib=512_000, idle_power_w=100.0, labels={"pool": "a"}, agent_version="1")
# A value of each NodeInfo field other than INFO's, and the column it is written to.
CHANGED = {"rack": ("rack_id", "rack-b"), "accelerators": ("accelerators", 8),
           "accelerator_model": ("accelerator_model", "h100"), "hbm_gib": ("hbm_gib", 40.0),
           "cpu_milli": ("cpu_milli", 32_000), "memory_mib": ("memory_mib", 256_000),
           "hostname": ("hostname", "h2"), "idle_power_w": ("idle_power_w", 50.0),
           "labels": ("labels", {"pool": "b"}), "agent_version": ("agent_version", "2")}


def _plan(info: NodeInfo) -> agents._Plan:
    row = m.Node(id=INFO.node_id)
    for column, value in agents._registered_columns(INFO).items():
        setattr(row, column, value)
    return agents._Plan(agents.Register(Principal("admin"), info), row, None)


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_a_register_changes_the_hardware_exactly_when_it_changes_one_of_those_columns(field: str) -> None:
    column, value = CHANGED[field]
    assert not agents._changes_hardware(_plan(INFO))
    assert agents._changes_hardware(_plan(replace(INFO, **{field: value}))) == (column in NODE_HARDWARE_COLUMNS)
    assert agents._changes_hardware(agents._Plan(agents.Register(Principal("admin"), INFO), None, None))


def test_every_field_a_register_writes_is_tried_above() -> None:
    assert set(CHANGED) == set(NodeInfo.__dataclass_fields__) - {"node_id"}
    assert {column for column, _ in CHANGED.values()} == set(agents._registered_columns(INFO))

"""capacity generation: moved only by statements that changed rows, once per transaction

Revision ID: 0022_capacity_triggers_rows
Revises: 0021_events_isolation_index
Create Date: 2026-12-02

Migration 0012's triggers move `capacity_state.generation`, and the controller's `CapacityCache`
(controller/usecases/capacity.py) rebuilds its aggregates of every node (a join of nodes, racks
and rows) on the next submit after each move. They moved it when nothing had changed:
- PostgreSQL: statement-level, they ran for every INSERT, DELETE or UPDATE OF a watched column,
  rows or none (a DELETE or UPDATE whose WHERE matched nothing, a value written over itself);
- SQLite: row-level (SQLite has no other), they ran for every row an UPDATE OF a watched column
  touched, its value changed or not.
What 0019 and 0020 did for the isolation triggers, done here for the capacity ones:
- PostgreSQL, per table: INSERT and DELETE statement-level with a transition table (one trigger
  per event), moving the generation when it holds a row; UPDATE OF the watched columns row-level
  `WHEN` one of them `IS DISTINCT FROM` before; TRUNCATE statement-level. And the generation moves
  once per transaction: the first run marks the transaction (a transaction-local setting,
  `maia.capacity_generation_moved`), later runs see the mark and return; a savepoint rolled back
  to undoes the move and the mark together. The cache only compares generations of committed
  states, so one move per transaction says as much; a big UPDATE no longer updates the row once
  per row (each update walking the versions of it the transaction wrote, as 0020 measured).
- SQLite: the UPDATE trigger `WHEN` one of the watched columns `IS NOT` what it was. A statement
  still moves it once per row it changes (no transaction-local state to mark in SQLite).

The trigger names keep the isolation triggers first (`trg_isolation_*` before `trg_z_capacity_*`
in name order; row-level AFTER triggers before statement-level ones), but that orders one row's
triggers only: an UPDATE of several nodes fires them row by row, and a node whose accelerator
model alone changed locked capacity_state before a later node's isolation change locked
isolation_state (as did two statements in one transaction, since 0012): a deadlock with a
transaction that took them in 0012's order. 0023 makes the capacity move lock isolation_state first.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0022_capacity_triggers_rows"
down_revision: Union[str, Sequence[str], None] = "0021_events_isolation_index"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# 0012's: table -> the columns whose updates change what the cluster could ever hold (none JSON)
WATCHED: dict[str, tuple[str, ...]] = {
    "nodes": ("rack_id", "accelerators", "accelerator_model", "hbm_gib"),
    "racks": ("row_id",),
    "rows": ("zone_id",),
}
BUMP = "UPDATE capacity_state SET generation = generation + 1 WHERE id = 1"
BUMP_FUNCTION = "maia_bump_capacity_generation"  # 0012's: moved the generation, unconditionally
ROWS_FUNCTION = "maia_bump_capacity_generation_if_rows"
MOVE_FUNCTION = "maia_move_capacity_generation"
MOVED = "maia.capacity_generation_moved"  # the transaction-local mark
TRANSITION = {"insert": "NEW TABLE AS new_rows", "delete": "OLD TABLE AS old_rows"}


def _trigger_function(name: str, body: str) -> str:
    return f"""CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {body}
    RETURN NULL;
END $$"""


def _changed(columns: tuple[str, ...], differ: str) -> str:
    return " OR ".join(f"OLD.{column} {differ} NEW.{column}" for column in columns)


def _upgrade_postgresql() -> None:
    op.execute(f"""CREATE FUNCTION {MOVE_FUNCTION}() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('{MOVED}', true) IS DISTINCT FROM 'on' THEN
        {BUMP};
        PERFORM set_config('{MOVED}', 'on', true);
    END IF;
END $$""")
    op.execute(_trigger_function(BUMP_FUNCTION, f"PERFORM {MOVE_FUNCTION}();"))
    op.execute(_trigger_function(ROWS_FUNCTION, f"""IF TG_OP = 'INSERT' THEN
        PERFORM 1 FROM new_rows LIMIT 1;
    ELSE
        PERFORM 1 FROM old_rows LIMIT 1;
    END IF;
    IF FOUND THEN
        PERFORM {MOVE_FUNCTION}();
    END IF;"""))
    for table, columns in WATCHED.items():
        op.execute(f"DROP TRIGGER trg_z_capacity_{table} ON {table}")
        for event in ("insert", "delete"):
            op.execute(f"CREATE TRIGGER trg_z_capacity_{table}_{event} AFTER {event.upper()} ON {table} "
                       f"REFERENCING {TRANSITION[event]} FOR EACH STATEMENT EXECUTE FUNCTION {ROWS_FUNCTION}()")
        op.execute(f"CREATE TRIGGER trg_z_capacity_{table}_truncate AFTER TRUNCATE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {BUMP_FUNCTION}()")
        op.execute(f"CREATE TRIGGER trg_z_capacity_{table}_update AFTER UPDATE OF {', '.join(columns)} ON {table} "
                   f"FOR EACH ROW WHEN ({_changed(columns, 'IS DISTINCT FROM')}) EXECUTE FUNCTION {BUMP_FUNCTION}()")


def _downgrade_postgresql() -> None:
    for table, columns in WATCHED.items():
        for event in ("insert", "delete", "truncate", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_z_capacity_{table}_{event} ON {table}")
        op.execute(f"CREATE TRIGGER trg_z_capacity_{table} AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF "
                   f"{', '.join(columns)} ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {BUMP_FUNCTION}()")
    op.execute(_trigger_function(BUMP_FUNCTION, f"{BUMP};"))
    op.execute(f"DROP FUNCTION {ROWS_FUNCTION}()")
    op.execute(f"DROP FUNCTION {MOVE_FUNCTION}()")


def _sqlite_update_trigger(table: str, columns: tuple[str, ...], when: str) -> None:
    op.execute(f"DROP TRIGGER trg_z_capacity_{table}_update")
    op.execute(f"CREATE TRIGGER trg_z_capacity_{table}_update AFTER UPDATE OF {', '.join(columns)} ON {table} "
               f"{when}BEGIN {BUMP}; END")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()
        return
    for table, columns in WATCHED.items():
        _sqlite_update_trigger(table, columns, f"FOR EACH ROW WHEN {_changed(columns, 'IS NOT')} ")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _downgrade_postgresql()
        return
    for table, columns in WATCHED.items():
        _sqlite_update_trigger(table, columns, "")

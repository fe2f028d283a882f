"""isolation version: PostgreSQL's triggers move it only for statements that changed rows

Revision ID: 0019_isolation_triggers_rows
Revises: 0018_lease_agent_address
Create Date: 2026-12-02

Migration 0005's PostgreSQL triggers (0012's on deployments) are statement-level: they ran, and
moved `isolation_state.version`, for every INSERT, DELETE or UPDATE OF a watched column, rows or
none (a DELETE of a node's placements when it had none, an UPDATE whose WHERE matched nothing, an
UPDATE writing the values a row already had). The isolation watchdog takes a version moved with
no change logged for a hand edit: each such statement owed it a full check of every placement.

Here, per table:
- INSERT and DELETE: statement-level with a transition table (one trigger per event: PostgreSQL
  takes transition tables for one event only), moving the version when that table holds a row;
- UPDATE OF the watched columns: row-level, `WHEN` one of them changed (`IS DISTINCT FROM`; JSON
  columns compared as jsonb), tested by the server without calling anything for the others.
  PostgreSQL takes no transition table with a column list; a statement-level UPDATE trigger
  without one would run for every heartbeat and shard report. Updates of watched columns are
  moves, one row a statement (the plan commit's executemany): the same number of runs as before;
- TRUNCATE: statement-level, as before (no rows to look at).

The trigger names keep the isolation triggers before 0012's capacity ones (`trg_z_capacity_*`, in
name order; row-level AFTER triggers run before statement-level ones): a transaction still locks
isolation_state before capacity_state. SQLite's row triggers never fired for no row: unchanged.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0019_isolation_triggers_rows"
down_revision: Union[str, Sequence[str], None] = "0018_lease_agent_address"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# table -> the columns whose updates matter to the isolation rules (0005), and whether an INSERT
# does (0012: a deployment without placements breaks no rule).
WATCHED: dict[str, tuple[tuple[str, ...], bool]] = {
    "placements": (("deployment_id", "replica", "shard", "node_id", "accelerator_indices", "accelerator_milli"), True),
    "deployments": (("name", "tenant_id", "shard_accelerators", "shard_accelerator_milli", "shard_hbm_gib",
                     "shard_cpu_milli", "shard_memory_mib"), False),
    "nodes": (("rack_id", "accelerators", "hbm_gib", "cpu_milli", "memory_mib"), True),
    "tenants": (("isolation", "excludes", "zones"), True),
    "racks": (("row_id",), True),
    "rows": (("zone_id",), True),
}
JSON_COLUMNS = {"accelerator_indices", "excludes", "zones"}  # json: no equality operator
BUMP_FUNCTION = "maia_bump_isolation_version"  # 0005's: moves the version, unconditionally
ROWS_FUNCTION = "maia_bump_isolation_version_if_rows"
TRANSITION = {"insert": "NEW TABLE AS new_rows", "delete": "OLD TABLE AS old_rows"}


def _rows_function() -> str:
    return f"""CREATE FUNCTION {ROWS_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM 1 FROM new_rows LIMIT 1;
    ELSE
        PERFORM 1 FROM old_rows LIMIT 1;
    END IF;
    IF FOUND THEN
        UPDATE isolation_state SET version = version + 1 WHERE id = 1;
    END IF;
    RETURN NULL;
END $$"""


def _changed(columns: tuple[str, ...]) -> str:
    def compared(column: str) -> str:
        cast = "::jsonb" if column in JSON_COLUMNS else ""
        return f"OLD.{column}{cast} IS DISTINCT FROM NEW.{column}{cast}"
    return " OR ".join(map(compared, columns))


def _statement_events(inserts: bool) -> str:
    """0005's statement events besides UPDATE (0012's for deployments: no INSERT)."""
    return " OR ".join(("INSERT",) * inserts + ("DELETE", "TRUNCATE"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_rows_function())
    for table, (columns, inserts) in WATCHED.items():
        op.execute(f"DROP TRIGGER trg_isolation_{table} ON {table}")
        for event in ("insert", "delete") if inserts else ("delete",):
            op.execute(f"CREATE TRIGGER trg_isolation_{table}_{event} AFTER {event.upper()} ON {table} "
                       f"REFERENCING {TRANSITION[event]} FOR EACH STATEMENT EXECUTE FUNCTION {ROWS_FUNCTION}()")
        op.execute(f"CREATE TRIGGER trg_isolation_{table}_truncate AFTER TRUNCATE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {BUMP_FUNCTION}()")
        op.execute(f"CREATE TRIGGER trg_isolation_{table}_update AFTER UPDATE OF {', '.join(columns)} ON {table} "
                   f"FOR EACH ROW WHEN ({_changed(columns)}) EXECUTE FUNCTION {BUMP_FUNCTION}()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (columns, inserts) in WATCHED.items():
        for event in ("insert", "delete", "truncate", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_isolation_{table}_{event} ON {table}")
        op.execute(f"CREATE TRIGGER trg_isolation_{table} AFTER {_statement_events(inserts)} OR UPDATE OF "
                   f"{', '.join(columns)} ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {BUMP_FUNCTION}()")
    op.execute(f"DROP FUNCTION {ROWS_FUNCTION}()")

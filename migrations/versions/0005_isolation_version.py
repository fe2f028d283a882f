"""isolation version: a counter every change to what the isolation rules read bumps, by trigger

Revision ID: 0005_isolation_version
Revises: 0004_api_tokens
Create Date: 2026-11-30

The isolation watchdog re-checks all placements only when `isolation_state.version` moved (and
once a minute regardless). Database triggers bump it, so a row written by hand, outside the
controller, moves it too. Only the columns the rules read fire them (an agent's shard phase
report or a heartbeat does not). PostgreSQL: one statement-level trigger per table (also on
TRUNCATE); SQLite: row-level triggers per table and event.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005_isolation_version"
down_revision: Union[str, Sequence[str], None] = "0004_api_tokens"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# table -> the columns whose updates matter to the isolation rules
WATCHED: dict[str, tuple[str, ...]] = {
    "placements": ("deployment_id", "replica", "shard", "node_id", "accelerator_indices", "accelerator_milli"),
    "deployments": ("name", "tenant_id", "shard_accelerators", "shard_accelerator_milli", "shard_hbm_gib",
                    "shard_cpu_milli", "shard_memory_mib"),
    "nodes": ("rack_id", "accelerators", "hbm_gib", "cpu_milli", "memory_mib"),
    "tenants": ("isolation", "excludes", "zones"),
    "racks": ("row_id",),
    "rows": ("zone_id",),
}
BUMP = "UPDATE isolation_state SET version = version + 1 WHERE id = 1"
PG_FUNCTION = "maia_bump_isolation_version"


def upgrade() -> None:
    state = op.create_table(
        "isolation_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_isolation_state")),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN {BUMP}; RETURN NULL; END $$")
        for table, columns in WATCHED.items():
            op.execute(f"CREATE TRIGGER trg_isolation_{table} AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF "
                       f"{', '.join(columns)} ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()")
        return
    for table, columns in WATCHED.items():
        for event in ("INSERT", "DELETE", f"UPDATE OF {', '.join(columns)}"):
            name = f"trg_isolation_{table}_{event.split()[0].lower()}"
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} BEGIN {BUMP}; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS trg_isolation_{table} ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")
    else:
        for table in WATCHED:
            for event in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER IF EXISTS trg_isolation_{table}_{event}")
    op.drop_table("isolation_state")

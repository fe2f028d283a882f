"""capacity generation: a counter of the changes to what the cluster could ever hold, by trigger

Revision ID: 0012_capacity_generation
Revises: 0011_shard_failures
Create Date: 2026-11-30

The submit path judges "could this ever fit" from aggregates of the registered nodes
(controller/usecases/capacity.py), kept until what they are made of changes. Keyed by the
cluster generation they were rebuilt after every plan commit (4,096 node rows read per commit
under a stream of submits); `capacity_state.generation` moves only when a node is added or
removed or its rack, accelerators, model or HBM change, or a rack changes row or a row zone.
Database triggers bump it (every writer, a second controller or a hand edit included), as
migration 0005 does for the isolation version. A row of its own, locked only by these triggers,
and they are named to fire after a table's isolation trigger (PostgreSQL fires them in name
order): a transaction always locks isolation_state before capacity_state, never the reverse.

The isolation triggers no longer fire on a new deployment: a deployment without placements
cannot break an isolation rule (its placements fire their own), and each submit made the
isolation watchdog re-check every placement in the cluster.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0012_capacity_generation"
down_revision: Union[str, Sequence[str], None] = "0011_shard_failures"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# table -> the columns whose updates change what the cluster could ever hold
WATCHED: dict[str, tuple[str, ...]] = {
    "nodes": ("rack_id", "accelerators", "accelerator_model", "hbm_gib"),
    "racks": ("row_id",),
    "rows": ("zone_id",),
}
BUMP = "UPDATE capacity_state SET generation = generation + 1 WHERE id = 1"
PG_FUNCTION = "maia_bump_capacity_generation"
# Migration 0005's isolation trigger on deployments, and the columns it watches.
ISOLATION_DEPLOYMENT_COLUMNS = ("name", "tenant_id", "shard_accelerators", "shard_accelerator_milli", "shard_hbm_gib",
                                "shard_cpu_milli", "shard_memory_mib")
ISOLATION_PG_FUNCTION = "maia_bump_isolation_version"
ISOLATION_BUMP = "UPDATE isolation_state SET version = version + 1 WHERE id = 1"


def _isolation_deployments_trigger(events: str) -> str:
    return (f"CREATE TRIGGER trg_isolation_deployments AFTER {events} OR UPDATE OF "
            f"{', '.join(ISOLATION_DEPLOYMENT_COLUMNS)} ON deployments FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {ISOLATION_PG_FUNCTION}()")


def upgrade() -> None:
    state = op.create_table(
        "capacity_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_capacity_state")),
    )
    op.bulk_insert(state, [{"id": 1, "generation": 0}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN {BUMP}; RETURN NULL; END $$")
        for table, columns in WATCHED.items():
            op.execute(f"CREATE TRIGGER trg_z_capacity_{table} AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF "
                       f"{', '.join(columns)} ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()")
        op.execute("DROP TRIGGER trg_isolation_deployments ON deployments")
        op.execute(_isolation_deployments_trigger("DELETE OR TRUNCATE"))
        return
    for table, columns in WATCHED.items():
        for event in ("INSERT", "DELETE", f"UPDATE OF {', '.join(columns)}"):
            name = f"trg_z_capacity_{table}_{event.split()[0].lower()}"
            op.execute(f"CREATE TRIGGER {name} AFTER {event} ON {table} BEGIN {BUMP}; END")
    op.execute("DROP TRIGGER trg_isolation_deployments_insert")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER trg_isolation_deployments ON deployments")
        op.execute(_isolation_deployments_trigger("INSERT OR DELETE OR TRUNCATE"))
        for table in WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS trg_z_capacity_{table} ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")
    else:
        op.execute(f"CREATE TRIGGER trg_isolation_deployments_insert AFTER INSERT ON deployments "
                   f"BEGIN {ISOLATION_BUMP}; END")
        for table in WATCHED:
            for event in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER IF EXISTS trg_z_capacity_{table}_{event}")
    op.drop_table("capacity_state")

"""deployment counts: the update trigger fires only for rows whose schedulability changes; each
tenant's deployments counted too

Revision ID: 0017_count_trigger_rows
Revises: 0016_deployment_counts
Create Date: 2026-12-02

Migration 0016's PostgreSQL trigger on UPDATE is statement-level with transition tables, which
PostgreSQL allows neither a column list nor a WHEN condition: it ran for every UPDATE of
deployments, two `count(*)` over the transition tables each time, and an executemany runs one
statement per row (a plan commit's phases, the agents' report flush: ~10,000 runs in a 12 s
window at 64 clients, every one of them changing no count; docs/benchmarks.md, `pgcost`). Here
that trigger is a row-level one, `AFTER UPDATE OF phase` and only `WHEN` the row moves into or out
of the schedulable phases (a deletion, a quarantine, a release): the server tests the condition
itself and calls nothing for the others. Each such row adds its delta (an INSERT: no wait); the
next INSERT or DELETE of deployments folds it with the rest, and the count reads the deltas not
folded yet meanwhile (0016). SQLite's update trigger was restricted so already (0016).

Each tenant's deployments (every phase: what a submit checks against the tenant's limit) are
counted by the same triggers into `tenant_deployment_counts`, so a submit batch reads a row per
tenant instead of counting the tenant's deployments (0.3-1.4 ms a batch on PostgreSQL under load,
growing with the tenant). PostgreSQL: 0016's statement-level INSERT and DELETE triggers add a delta
per tenant (`deployment_count_deltas.tenant_id`, `.deployments`) and the fold moves those into the
tenants' rows with the global count. SQLite: row triggers of their own add to the tenant's row.
Deployments never change tenant (nothing writes `tenant_id` after the INSERT).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import context, op

revision: str = "0017_count_trigger_rows"
down_revision: Union[str, Sequence[str], None] = "0016_deployment_counts"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SCHEDULABLE = "phase NOT IN ('deleting', 'quarantined')"
FOLD_LOCK = 7_316_400_016  # 0016's
ROW_FUNCTION = "maia_count_deployment_moves"
STATEMENT_FUNCTION = "maia_count_deployments"  # 0016's, replaced
UPDATE_TRIGGER = "trg_count_deployments_update"
SQLITE_TENANT_TRIGGERS = {
    "insert": "AFTER INSERT ON deployments BEGIN INSERT INTO tenant_deployment_counts (tenant_id, deployments) "
              "VALUES (NEW.tenant_id, 1) ON CONFLICT (tenant_id) DO UPDATE SET deployments = deployments + 1; END",
    "delete": "AFTER DELETE ON deployments BEGIN UPDATE tenant_deployment_counts SET deployments = deployments - 1 "
              "WHERE tenant_id = OLD.tenant_id; END",
}


def _row_function() -> str:
    return f"""CREATE FUNCTION {ROW_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deployment_count_deltas (schedulable) VALUES (CASE WHEN NEW.{SCHEDULABLE} THEN 1 ELSE -1 END);
    RETURN NULL;
END $$"""


def _statement_function() -> str:
    """0016's function for INSERT, DELETE and TRUNCATE, with a delta per tenant."""
    return f"""CREATE OR REPLACE FUNCTION {STATEMENT_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM deployment_count_deltas;
        UPDATE deployment_counts SET schedulable = 0 WHERE id = 1;
        DELETE FROM tenant_deployment_counts;
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO deployment_count_deltas (tenant_id, schedulable, deployments)
        SELECT tenant_id, count(*) FILTER (WHERE {SCHEDULABLE}), count(*) FROM new_rows GROUP BY tenant_id;
    ELSE
        INSERT INTO deployment_count_deltas (tenant_id, schedulable, deployments)
        SELECT tenant_id, -count(*) FILTER (WHERE {SCHEDULABLE}), -count(*) FROM old_rows GROUP BY tenant_id;
    END IF;
    IF FOUND AND pg_try_advisory_xact_lock({FOLD_LOCK}) THEN
        WITH folded AS (DELETE FROM deployment_count_deltas RETURNING tenant_id, schedulable, deployments),
        counted AS (UPDATE deployment_counts SET schedulable = schedulable
                    + (SELECT coalesce(sum(schedulable), 0) FROM folded) WHERE id = 1)
        INSERT INTO tenant_deployment_counts (tenant_id, deployments)
        SELECT tenant_id, sum(deployments) FROM folded WHERE tenant_id IS NOT NULL GROUP BY tenant_id
        ON CONFLICT (tenant_id) DO UPDATE SET deployments = tenant_deployment_counts.deployments + EXCLUDED.deployments;
    END IF;
    RETURN NULL;
END $$"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "tenant_deployment_counts",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("deployments", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenant_deployment_counts")),
    )
    with op.batch_alter_table("deployment_count_deltas") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("deployments", sa.BigInteger(), server_default="0", nullable=False))
    # The triggers before the count, as in 0016 (PostgreSQL: the first statement on the trigger
    # waits for every transaction writing deployments and holds off new ones to this commit).
    if postgres:
        op.execute(f"DROP TRIGGER {UPDATE_TRIGGER} ON deployments")
        op.execute(_row_function())
        op.execute(f"CREATE TRIGGER {UPDATE_TRIGGER} AFTER UPDATE OF phase ON deployments FOR EACH ROW "
                   f"WHEN ((OLD.{SCHEDULABLE}) IS DISTINCT FROM (NEW.{SCHEDULABLE})) "
                   f"EXECUTE FUNCTION {ROW_FUNCTION}()")
        op.execute(_statement_function())
    else:
        for event, body in SQLITE_TENANT_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER trg_count_tenant_deployments_{event} {body}")
    op.execute("INSERT INTO tenant_deployment_counts (tenant_id, deployments) "
               "SELECT tenant_id, count(*) FROM deployments GROUP BY tenant_id")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER {UPDATE_TRIGGER} ON deployments")
        op.execute(f"CREATE TRIGGER {UPDATE_TRIGGER} AFTER UPDATE ON deployments "
                   "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {STATEMENT_FUNCTION}()")
        op.execute(f"DROP FUNCTION {ROW_FUNCTION}()")
        # 0016's function back (its own text: the revision's module, not a copy).
        previous = context.script.get_revision(down_revision).module  # type: ignore[union-attr]
        op.execute(previous._pg_function().replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    else:
        for event in SQLITE_TENANT_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS trg_count_tenant_deployments_{event}")
    with op.batch_alter_table("deployment_count_deltas") as batch:
        batch.drop_column("deployments")
        batch.drop_column("tenant_id")
    op.drop_table("tenant_deployment_counts")

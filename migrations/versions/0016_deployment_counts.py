"""deployment_counts: the schedulable deployments counted by triggers, not by a scan per pass

Revision ID: 0016_deployment_counts
Revises: 0015_deployments_name_index
Create Date: 2026-12-02

A reconcile pass compares the schedulable deployments (neither being deleted nor quarantined)
with those it holds, to find arrivals committed out of key order. It counted them with
`count(*) ... WHERE phase NOT IN (...)`, twice a pass: on PostgreSQL a scan of every deployment,
~4-5 ms of the server's CPU at 12,000 deployments (an index-only scan is no cheaper: the rows a
run updates are not all-visible), half of the server's CPU at 50 submits/s (docs/benchmarks.md,
`pg10`). Here database triggers keep the count, so a row written by hand moves it too.

PostgreSQL: statement-level triggers with transition tables add each statement's change as a
row of `deployment_count_deltas` (an INSERT: no row lock, so concurrent writers never wait for
each other here), and the transaction that wrote one folds every delta it sees into
`deployment_counts` when it gets `FOLD_LOCK` at once (`pg_try_advisory_xact_lock`: it never
waits; one folder at a time, so the row is never waited for either). The count is the row plus
the deltas not folded yet, read in one statement (one snapshot). Statements that change no
count (phase moves between schedulable phases: reports, plan commits) add nothing.
SQLite (one writer): row-level triggers add to the row directly; the deltas table stays empty.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0016_deployment_counts"
down_revision: Union[str, Sequence[str], None] = "0015_deployments_name_index"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SCHEDULABLE = "phase NOT IN ('deleting', 'quarantined')"
# An advisory lock key of its own (any other key the controller takes is small: lease, migrations).
FOLD_LOCK = 7_316_400_016
PG_FUNCTION = "maia_count_deployments"
PG_EVENTS = {"insert": "INSERT ON deployments REFERENCING NEW TABLE AS new_rows",
             "update": "UPDATE ON deployments REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
             "delete": "DELETE ON deployments REFERENCING OLD TABLE AS old_rows"}
SQLITE_TRIGGERS = {
    "insert": f"AFTER INSERT ON deployments WHEN NEW.{SCHEDULABLE} "
              "BEGIN UPDATE deployment_counts SET schedulable = schedulable + 1 WHERE id = 1; END",
    "delete": f"AFTER DELETE ON deployments WHEN OLD.{SCHEDULABLE} "
              "BEGIN UPDATE deployment_counts SET schedulable = schedulable - 1 WHERE id = 1; END",
    "update": f"AFTER UPDATE OF phase ON deployments WHEN (NEW.{SCHEDULABLE}) <> (OLD.{SCHEDULABLE}) "
              f"BEGIN UPDATE deployment_counts SET schedulable = schedulable + (NEW.{SCHEDULABLE}) "
              f"- (OLD.{SCHEDULABLE}) WHERE id = 1; END",
}


def _pg_function() -> str:
    return f"""CREATE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint := 0;
    added bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM deployment_count_deltas;
        UPDATE deployment_counts SET schedulable = 0 WHERE id = 1;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT count(*) INTO added FROM new_rows WHERE {SCHEDULABLE};
        delta := delta + added;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT count(*) INTO added FROM old_rows WHERE {SCHEDULABLE};
        delta := delta - added;
    END IF;
    IF delta <> 0 THEN
        INSERT INTO deployment_count_deltas (schedulable) VALUES (delta);
        IF pg_try_advisory_xact_lock({FOLD_LOCK}) THEN
            WITH folded AS (DELETE FROM deployment_count_deltas RETURNING schedulable)
            UPDATE deployment_counts SET schedulable = schedulable + (SELECT coalesce(sum(schedulable), 0) FROM folded)
            WHERE id = 1;
        END IF;
    END IF;
    RETURN NULL;
END $$"""


def upgrade() -> None:
    counts = op.create_table(
        "deployment_counts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedulable", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment_counts")),
    )
    op.create_table(
        "deployment_count_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("schedulable", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment_count_deltas")),
    )
    op.bulk_insert(counts, [{"id": 1, "schedulable": 0}])
    # The triggers before the count: creating one waits for every transaction writing deployments
    # and holds off new ones until this migration commits (PostgreSQL; SQLite's one writer is this
    # one already), so the count sees every row written without them and no row is counted twice.
    # Counted first, a row in flight then (another controller still running, a migration by hand)
    # was missed for good.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_pg_function())
        for event, clause in PG_EVENTS.items():
            op.execute(f"CREATE TRIGGER trg_count_deployments_{event} AFTER {clause} "
                       f"FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()")
        op.execute(f"CREATE TRIGGER trg_count_deployments_truncate AFTER TRUNCATE ON deployments "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()")
    else:
        for event, body in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER trg_count_deployments_{event} {body}")
    op.execute(f"UPDATE deployment_counts SET schedulable = (SELECT count(*) FROM deployments WHERE {SCHEDULABLE}) "
               "WHERE id = 1")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for event in (*PG_EVENTS, "truncate"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_count_deployments_{event} ON deployments")
        op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")
    else:
        for event in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS trg_count_deployments_{event}")
    op.drop_table("deployment_count_deltas")
    op.drop_table("deployment_counts")

"""deployment count: the update trigger fires only for rows whose schedulability changes

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
next INSERT or DELETE of deployments folds it with the rest (0016's statement-level triggers,
kept, as for TRUNCATE), and the count reads the deltas not folded yet meanwhile (0016).

SQLite's update trigger was restricted so already (0016: `AFTER UPDATE OF phase ... WHEN`):
nothing changes there.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0017_count_trigger_rows"
down_revision: Union[str, Sequence[str], None] = "0016_deployment_counts"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SCHEDULABLE = "phase NOT IN ('deleting', 'quarantined')"
ROW_FUNCTION = "maia_count_deployment_moves"
STATEMENT_FUNCTION = "maia_count_deployments"  # 0016's
TRIGGER = "trg_count_deployments_update"


def _row_function() -> str:
    return f"""CREATE FUNCTION {ROW_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deployment_count_deltas (schedulable) VALUES (CASE WHEN NEW.{SCHEDULABLE} THEN 1 ELSE -1 END);
    RETURN NULL;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_row_function())
    op.execute(f"DROP TRIGGER {TRIGGER} ON deployments")
    op.execute(f"CREATE TRIGGER {TRIGGER} AFTER UPDATE OF phase ON deployments FOR EACH ROW "
               f"WHEN ((OLD.{SCHEDULABLE}) IS DISTINCT FROM (NEW.{SCHEDULABLE})) "
               f"EXECUTE FUNCTION {ROW_FUNCTION}()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP TRIGGER {TRIGGER} ON deployments")
    op.execute(f"CREATE TRIGGER {TRIGGER} AFTER UPDATE ON deployments "
               "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
               f"FOR EACH STATEMENT EXECUTE FUNCTION {STATEMENT_FUNCTION}()")
    op.execute(f"DROP FUNCTION {ROW_FUNCTION}()")

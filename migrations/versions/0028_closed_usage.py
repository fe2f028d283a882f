"""closed_usage: the closed usage intervals summed per (tenant, model, zone) by triggers, so a
scrape reads totals, not the whole metering history

Revision ID: 0028_closed_usage
Revises: 0027_known_tenants
Create Date: 2026-12-05

Every scrape (`maia_usage_*`) and every console build summed all of `usage_intervals` since the
epoch, and nothing deletes those rows: with 3 million intervals (weeks of churn on a large
cluster) a scrape's read took 5-10 s, hit the scrape's timeout and took every other gauge down
with it (docs/benchmarks.md, `usagetotals`). Here database triggers keep the closed intervals'
sums per (tenant, accelerator model, zone) in `closed_usage`, in the transaction that closes
them, whichever statement does (`metering.stop_intervals`, `stop_intervals_on_node`, a
statement by hand); the readers add the open intervals' accrual (`metering.usage_to_date`).
An interval counts (ended_s - started_s) x its milli-accelerators / 1000 accelerator-seconds and
(ended_s - started_s) x (load_power_w + idle_share_w) joules, what `usage_by` sums over all time.
An interval inserted closed counts too; an update of a closed one moves the sums by its change;
a deleted one stays counted (the sums are counters: history pruned by hand, or a retention,
does not take back what was used).

PostgreSQL: a statement-level trigger with transition tables on UPDATE (only the meter's closes
update intervals: one call per closing statement, however many rows it closes) and a row-level
one on INSERT `WHEN` the row is closed already (the server tests the condition itself: the
INSERTs that open intervals call nothing) add their change as rows of `closed_usage_deltas`
(INSERTs: no row lock, so the writers that close intervals never wait for each other here, and
the lock order of controller/store/changes.py is untouched); the transaction that wrote one
folds every delta it sees into `closed_usage` when it gets `FOLD_LOCK` at once
(`pg_try_advisory_xact_lock`: it never waits; one folder at a time, so the sums' rows are never
waited for either), as migration 0016 does for the deployment counts. The readers read the sums,
the deltas not folded yet and the open intervals in one statement (one snapshot).
SQLite (one writer): row-level triggers add to `closed_usage` directly; the deltas stay empty.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0028_closed_usage"
down_revision: Union[str, Sequence[str], None] = "0027_known_tenants"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# An advisory lock key of its own (0016's is 7_316_400_016).
FOLD_LOCK = 7_316_400_028
PG_CLOSE_FUNCTION = "maia_close_usage"  # UPDATE, per statement
PG_INSERT_FUNCTION = "maia_insert_closed_usage"  # INSERT of a closed row, per row
TRIGGERS = ("trg_closed_usage_update", "trg_closed_usage_insert")
KEY = "tenant_id, accelerator_model, zone_id"
SUMS = "accelerator_seconds, energy_j"


def _charged(row: str = "", sign: str = "") -> str:
    """What the closed interval (of `row`: NEW or OLD; else of the table read) charges, as `SUMS`:
    the same arithmetic as `metering.usage_by`, so the sums equal its sums over all time."""
    prefix = f"{row}." if row else ""
    seconds = f"({prefix}ended_s - {prefix}started_s)"
    return (f"{sign}({seconds} * {prefix}accelerator_milli / 1000.0) AS accelerator_seconds, "
            f"{sign}({seconds} * ({prefix}load_power_w + {prefix}idle_share_w)) AS energy_j")


# Every delta this transaction sees folded into the sums, by one transaction at a time (written into
# each trigger function rather than called: a function the controller's role calls needs EXECUTE,
# which default privileges may revoke; a trigger's function needs none when it fires).
_PG_FOLD = f"""IF pg_try_advisory_xact_lock({FOLD_LOCK}) THEN
        WITH folded AS (DELETE FROM closed_usage_deltas RETURNING {KEY}, {SUMS})
        INSERT INTO closed_usage ({KEY}, {SUMS})
        SELECT {KEY}, sum(accelerator_seconds), sum(energy_j) FROM folded GROUP BY {KEY}
        ON CONFLICT ({KEY}) DO UPDATE SET
            accelerator_seconds = closed_usage.accelerator_seconds + EXCLUDED.accelerator_seconds,
            energy_j = closed_usage.energy_j + EXCLUDED.energy_j;
    END IF;"""


def _pg_functions() -> list[str]:
    close = f"""CREATE FUNCTION {PG_CLOSE_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO closed_usage_deltas ({KEY}, {SUMS})
    SELECT {KEY}, sum(accelerator_seconds), sum(energy_j) FROM (
        SELECT {KEY}, {_charged()} FROM new_rows WHERE ended_s IS NOT NULL
        UNION ALL
        SELECT {KEY}, {_charged(sign="-")} FROM old_rows WHERE ended_s IS NOT NULL
    ) AS changed GROUP BY {KEY};
    IF FOUND THEN
        {_PG_FOLD}
    END IF;
    RETURN NULL;
END $$"""
    insert = f"""CREATE FUNCTION {PG_INSERT_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO closed_usage_deltas ({KEY}, {SUMS})
    SELECT NEW.tenant_id, NEW.accelerator_model, NEW.zone_id, {_charged("NEW")};
    {_PG_FOLD}
    RETURN NULL;
END $$"""
    return [close, insert]


def _sqlite_add(row: str, sign: str = "") -> str:
    return (f"INSERT INTO closed_usage ({KEY}, {SUMS}) "
            f"SELECT {row}.tenant_id, {row}.accelerator_model, {row}.zone_id, {_charged(row, sign)} "
            f"WHERE {row}.ended_s IS NOT NULL "
            f"ON CONFLICT ({KEY}) DO UPDATE SET "
            f"accelerator_seconds = accelerator_seconds + excluded.accelerator_seconds, "
            f"energy_j = energy_j + excluded.energy_j")


SQLITE_TRIGGERS = {
    "trg_closed_usage_update": "AFTER UPDATE ON usage_intervals "
                               "WHEN OLD.ended_s IS NOT NULL OR NEW.ended_s IS NOT NULL "
                               f"BEGIN {_sqlite_add('NEW')}; {_sqlite_add('OLD', '-')}; END",
    "trg_closed_usage_insert": f"AFTER INSERT ON usage_intervals WHEN NEW.ended_s IS NOT NULL "
                               f"BEGIN {_sqlite_add('NEW')}; END",
}


def upgrade() -> None:
    op.create_table(
        "closed_usage",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("accelerator_model", sa.String(length=64), nullable=False),
        sa.Column("zone_id", sa.String(length=128), nullable=False),
        sa.Column("accelerator_seconds", sa.Float(), nullable=False),
        sa.Column("energy_j", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "accelerator_model", "zone_id", name=op.f("pk_closed_usage")),
    )
    op.create_table(
        "closed_usage_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("accelerator_model", sa.String(length=64), nullable=False),
        sa.Column("zone_id", sa.String(length=128), nullable=False),
        sa.Column("accelerator_seconds", sa.Float(), nullable=False),
        sa.Column("energy_j", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_closed_usage_deltas")),
    )
    # The triggers before the sums, as in 0016: on PostgreSQL the first CREATE TRIGGER waits for
    # every transaction writing usage_intervals and holds off new ones until this migration
    # commits, so the sums see every interval closed without them and none is counted twice.
    if op.get_bind().dialect.name == "postgresql":
        for function in _pg_functions():
            op.execute(function)
        op.execute(f"CREATE TRIGGER {TRIGGERS[0]} AFTER UPDATE ON usage_intervals "
                   "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {PG_CLOSE_FUNCTION}()")
        op.execute(f"CREATE TRIGGER {TRIGGERS[1]} AFTER INSERT ON usage_intervals FOR EACH ROW "
                   f"WHEN (NEW.ended_s IS NOT NULL) EXECUTE FUNCTION {PG_INSERT_FUNCTION}()")
    else:
        for name, body in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")
    op.execute(f"INSERT INTO closed_usage ({KEY}, {SUMS}) "
               f"SELECT {KEY}, sum(accelerator_seconds), sum(energy_j) FROM "
               f"(SELECT {KEY}, {_charged()} FROM usage_intervals WHERE ended_s IS NOT NULL) AS closed GROUP BY {KEY}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGERS[0]} ON usage_intervals")
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGERS[1]} ON usage_intervals")
        for function in (PG_CLOSE_FUNCTION, PG_INSERT_FUNCTION):
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("closed_usage_deltas")
    op.drop_table("closed_usage")

"""known_tenants: every tenant id the cluster ever had, kept by a trigger on `tenants`

Revision ID: 0027_known_tenants
Revises: 0026_lease_fence_function
Create Date: 2026-12-06

What a tenant token reads of stored text (a deployment's reasons, its events, its audit entries)
is redacted against the tenant ids the cluster has (`controller/usecases/redaction.py`). Those
texts were written while the tenants they name existed and are kept after a tenant is deleted, so
the redaction must know every id that ever was, not only the rows of `tenants` now: after a
delete, "node n1 holds delta-labs (dedicated_node)" was shown whole to the other tenants.

A row-level trigger on `tenants` adds each id inserted (or renamed to, by hand) to
`known_tenants`, which nothing deletes from: a tenant written by hand or by a restore is known as
well as one the controller created, and the redaction reads this one small table (a row per
tenant ever created) where it read `tenants`. The upgrade fills it with the ids the database
still names: the tenants, the tenant events (`tenant.created`, `tenant.deleted`, ...), the
tenants whose shards were metered, and the successful CreateTenant calls of the audit log.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0027_known_tenants"
down_revision: Union[str, Sequence[str], None] = "0026_lease_fence_function"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLE = "known_tenants"
TRIGGER = "trg_known_tenants"
PG_FUNCTION = "maia_know_tenant"
# Every id the database names as a tenant's (at most 128 characters: the column's width).
_NAMED = """
SELECT id FROM tenants
UNION SELECT object_id FROM events WHERE object_kind = 'tenant'
UNION SELECT tenant_id FROM usage_intervals
UNION SELECT object_id FROM audit_log
      WHERE action = '/maia.v1.AdminService/CreateTenant' AND outcome = 'OK' AND object_kind = 'tenant'
"""
# SQLite: NOT EXISTS rather than INSERT OR IGNORE, which an INSERT OR ... into `tenants` would override.
_SQLITE_ADD = (f"INSERT INTO {TABLE} (id) SELECT NEW.id "
               f"WHERE NOT EXISTS (SELECT 1 FROM {TABLE} WHERE id = NEW.id)")


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_known_tenants")),
    )
    # The trigger first, then the fill (as 0016 and 0028 do): on PostgreSQL a tenant an older
    # controller inserts while this runs is either committed before CREATE TRIGGER takes its lock
    # (and the fill, a statement after it, sees the row) or written with the trigger in place.
    # Filled first, such a tenant was in neither, and never known: its id was never redacted.
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute(f"CREATE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN INSERT INTO {TABLE} (id) VALUES (NEW.id) ON CONFLICT DO NOTHING; RETURN NULL; END $$")
        op.execute(f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OF id ON tenants "
                   f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}()")
    else:
        op.execute(f"CREATE TRIGGER {TRIGGER}_insert AFTER INSERT ON tenants BEGIN {_SQLITE_ADD}; END")
        op.execute(f"CREATE TRIGGER {TRIGGER}_update AFTER UPDATE OF id ON tenants BEGIN {_SQLITE_ADD}; END")
    op.execute(f"INSERT INTO {TABLE} (id) SELECT id FROM ({_NAMED}) named "
               f"WHERE id IS NOT NULL AND length(id) BETWEEN 1 AND 128"
               f"{' ON CONFLICT DO NOTHING' if postgres else ''}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON tenants")
        op.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}_insert")
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}_update")
    op.drop_table(TABLE)

"""deployment names per tenant: unique on (tenant_id, name) instead of name alone

Revision ID: 0010_deployment_names_per_tenant
Revises: 0009_request_ids_kept
Create Date: 2026-11-30

Two tenants may both have a deployment `chat`, like two Kubernetes namespaces. Stored names were
unique across the cluster, so they stay unique per tenant: no row changes. The events history
names a deployment by its key `TENANT/NAME` from now on (the interchange format's id for names
per tenant); the events of deployments that still exist are rewritten to it (not those of an
earlier deployment of the name, up to its deletion). Audit entries are
hash-chained and never rewritten: older ones keep the bare name (with the tenant in their
`tenant` column).

SQLite rebuilds the table to drop the old constraint; its isolation-version triggers on
`deployments` (migration 0005) go with the old table and are created again.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0010_deployment_names_per_tenant"
down_revision: Union[str, Sequence[str], None] = "0009_request_ids_kept"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The columns of `deployments` whose updates fire the isolation triggers (as in 0005).
WATCHED_COLUMNS = ("name", "tenant_id", "shard_accelerators", "shard_accelerator_milli", "shard_hbm_gib",
                   "shard_cpu_milli", "shard_memory_mib")
BUMP = "UPDATE isolation_state SET version = version + 1 WHERE id = 1"


def _sqlite_triggers() -> None:
    for event in ("INSERT", "DELETE", f"UPDATE OF {', '.join(WATCHED_COLUMNS)}"):
        name = f"trg_isolation_deployments_{event.split()[0].lower()}"
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute(f"CREATE TRIGGER {name} AFTER {event} ON deployments BEGIN {BUMP}; END")


def _is_sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_constraint("uq_deployments_name", type_="unique")
        batch.create_unique_constraint("uq_deployments_tenant_id_name", ["tenant_id", "name"])
    if _is_sqlite():
        _sqlite_triggers()
    # Only the events after the last deletion of the name: those before it are an earlier
    # namesake's, perhaps another tenant's (names were unique among the deployments that existed
    # at once), and keep the bare name with the rest of the deleted deployments' history.
    op.execute(
        "UPDATE events SET object_id = (SELECT d.tenant_id || '/' || d.name FROM deployments d "
        "WHERE d.name = events.object_id) "
        "WHERE object_kind = 'deployment' AND object_id IN (SELECT name FROM deployments) "
        "AND NOT EXISTS (SELECT 1 FROM events deleted WHERE deleted.object_kind = 'deployment' "
        "AND deleted.object_id = events.object_id AND deleted.kind = 'deployment.deleted' "
        "AND deleted.id >= events.id)"
    )


def downgrade() -> None:
    duplicates = op.get_bind().execute(sa.text(
        "SELECT name FROM deployments GROUP BY name HAVING COUNT(*) > 1 ORDER BY name LIMIT 5"
    )).scalars().all()
    if duplicates:
        raise RuntimeError(
            f"cannot downgrade below 0010: deployment names used by several tenants ({', '.join(duplicates)}); "
            "delete or rename them first"
        )
    position = "instr(object_id, '/')" if _is_sqlite() else "strpos(object_id, '/')"
    op.execute(f"UPDATE events SET object_id = substr(object_id, {position} + 1) "
               f"WHERE object_kind = 'deployment' AND {position} > 0")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_constraint("uq_deployments_tenant_id_name", type_="unique")
        batch.create_unique_constraint("uq_deployments_name", ["name"])
    if _is_sqlite():
        _sqlite_triggers()

"""deployment ids never reused on SQLite: `deployments.id` AUTOINCREMENT

Revision ID: 0024_deployment_ids_never_reused
Revises: 0023_capacity_lock_order
Create Date: 2026-12-03

On SQLite `deployments.id` was a rowid without AUTOINCREMENT: a new row took the largest id + 1,
so the id of the deployment deleted last went to the next one submitted. Code that holds a
deployment's id across transactions could meet another deployment under it: a delete that read a
deployment that was then removed and submitted again under the same tenant and name before the
delete's mark marked the new one DELETING (docs/benchmarks.md, issue 8, `rv-events`, left). With
AUTOINCREMENT SQLite hands out ids above every id it ever handed out (its `sqlite_sequence`),
as PostgreSQL's sequence does: PostgreSQL is unchanged.

SQLite sets AUTOINCREMENT only in a table's CREATE: the table is rebuilt (alembic's batch copy;
`env.py` turns foreign keys off, so the copy's DROP of the old table cascades to nobody:
placements, client requests). Its triggers (the isolation version's, 0005/0019/0020; the
deployment counts', 0016/0017) go with the old table and are created again as they were, read
from `sqlite_master` first; its indexes and unique constraint are rebuilt by the copy. The copy
inserts the rows with their ids, which starts the sequence at the largest id stored (an id freed
before the upgrade, above it, may still be taken once: no table keeps a deleted deployment's id,
so nothing tells the upgrade a larger one was issued). The copy writes the primary key as a
column's (`id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT`), without 0001's constraint name: SQLite
makes no use of the name, and the schema at 0024 is left as databases upgraded to it have it.

Downgrade: the table rebuilt as 0023 had it, its CREATE statement exactly as SQLite stored it at
0023 (`_AT_0023`: the primary key's name, and the columns 0011 added on one line as SQLite's ADD
COLUMN wrote them; a batch copy would write neither), its indexes and triggers created again as
they were. The sequence's row goes with the dropped table; `sqlite_sequence` itself stays, empty
(SQLite keeps it once created: it refuses to drop it).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0024_deployment_ids_never_reused"
down_revision: Union[str, Sequence[str], None] = "0023_capacity_lock_order"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLE = "deployments"
_COPY = "_0024_deployments"
# `deployments` as migrations 0001-0023 left it on SQLite (sqlite_master's text, trailing spaces
# and all): the downgrade's target. Joined, not one literal, so that no editor strips those spaces.
_AT_0023 = 'CREATE TABLE "deployments" (\n\t' + ", \n\t".join((
    "id INTEGER NOT NULL",
    "name VARCHAR(63) NOT NULL",
    "tenant_id VARCHAR(128) NOT NULL",
    "replicas INTEGER NOT NULL",
    "min_replicas INTEGER NOT NULL",
    "shards_per_replica INTEGER NOT NULL",
    "shard_accelerators INTEGER NOT NULL",
    "shard_accelerator_milli INTEGER NOT NULL",
    "shard_hbm_gib FLOAT NOT NULL",
    "shard_cpu_milli BIGINT NOT NULL",
    "shard_memory_mib BIGINT NOT NULL",
    "shard_power_w FLOAT NOT NULL",
    "shard_accelerator_models JSON NOT NULL",
    "locality VARCHAR(32) NOT NULL",
    "spread_domain VARCHAR(32)",
    "spread_max_per_domain INTEGER",
    "priority INTEGER NOT NULL",
    "preemptible BOOLEAN NOT NULL",
    "phase VARCHAR(32) NOT NULL",
    "reasons JSON NOT NULL",
    "generation BIGINT NOT NULL",
    "created_at DATETIME NOT NULL",
    "updated_at DATETIME NOT NULL",
    "resource_version BIGINT DEFAULT '1' NOT NULL",
    "template_revision INTEGER DEFAULT '1' NOT NULL",
    "revision_specs JSON DEFAULT '{}' NOT NULL, failures INTEGER DEFAULT '0' NOT NULL, "
    "last_failure_at DATETIME, restart_after DATETIME",
    "CONSTRAINT pk_deployments PRIMARY KEY (id)",
    "CONSTRAINT fk_deployments_tenant_id_tenants FOREIGN KEY(tenant_id) REFERENCES tenants (id)",
    "CONSTRAINT uq_deployments_tenant_id_name UNIQUE (tenant_id, name)")) + "\n)"


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _created(*types: str) -> list[str]:
    """The CREATE statements of the table's objects of these types (not SQLite's own indexes,
    which have none), by name."""
    return list(op.get_bind().execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE tbl_name = :table AND type IN :types AND sql IS NOT NULL "
        "ORDER BY name").bindparams(sa.bindparam("types", expanding=True)),
        {"table": TABLE, "types": list(types)}).scalars())


def upgrade() -> None:
    """SQLite: `deployments` rebuilt with AUTOINCREMENT (a batch copy), its triggers created again."""
    if not _sqlite():
        return
    triggers = _created("trigger")
    with op.batch_alter_table(TABLE, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass
    for sql in triggers:
        op.execute(sql)


def downgrade() -> None:
    """SQLite: `deployments` rebuilt from `_AT_0023` (a copy under another name, its rows, the old
    table dropped, the copy renamed: what a batch copy does, from a CREATE statement of our own),
    its indexes and triggers created again."""
    if not _sqlite():
        return
    dependents = _created("index", "trigger")
    columns = ", ".join(f'"{name}"' for name in op.get_bind().execute(
        sa.text(f"SELECT name FROM pragma_table_info('{TABLE}') ORDER BY cid")).scalars())
    op.execute(_AT_0023.replace(f'CREATE TABLE "{TABLE}"', f'CREATE TABLE "{_COPY}"', 1))
    op.execute(f'INSERT INTO "{_COPY}" ({columns}) SELECT {columns} FROM "{TABLE}"')
    op.execute(f'DROP TABLE "{TABLE}"')
    op.execute(f'ALTER TABLE "{_COPY}" RENAME TO "{TABLE}"')
    for sql in dependents:
        op.execute(sql)

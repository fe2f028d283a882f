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
before the upgrade, above it, may still be taken once). Downgrade: the table rebuilt without
AUTOINCREMENT, triggers likewise (the sequence's row is left: SQLite ignores it then).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0024_deployment_ids_never_reused"
down_revision: Union[str, Sequence[str], None] = "0023_capacity_lock_order"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLE = "deployments"


def _rebuilt(autoincrement: bool) -> None:
    """SQLite: `deployments` rebuilt with or without AUTOINCREMENT, its triggers created again."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    triggers = bind.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :table ORDER BY name"),
        {"table": TABLE}).scalars().all()
    with op.batch_alter_table(TABLE, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass
    for sql in triggers:
        op.execute(sql)


def upgrade() -> None:
    _rebuilt(True)


def downgrade() -> None:
    _rebuilt(False)

"""node lifecycle: when a down node's work was evicted (health gains 'suspect', a plain string)

Revision ID: 0008_node_lifecycle
Revises: 0007_rollout
Create Date: 2026-11-30

A node that loses contact is suspect, then down, and only later (rate-limited) has its work
evicted (controller/domain/liveness.py): `nodes.evicted_at` says when; while it is null a down
node still holds its shards. Nodes down before this revision held nothing: they count as
evicted at the upgrade.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008_node_lifecycle"
down_revision: Union[str, Sequence[str], None] = "0007_rollout"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("evicted_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE nodes SET evicted_at = CURRENT_TIMESTAMP WHERE health = 'down'")


def downgrade() -> None:
    op.execute("UPDATE nodes SET health = 'down' WHERE health = 'suspect'")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("evicted_at")

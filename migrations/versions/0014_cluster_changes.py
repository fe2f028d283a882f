"""cluster_changes: what each cluster generation bump changed, for the reconciler's warm cache

Revision ID: 0014_cluster_changes
Revises: 0013_placements_phase_index
Create Date: 2026-11-30

Every bump of `cluster_state.generation` says what it changed (controller/domain/changes.py):
a node registered, came up or was cordoned, a deployment was deleted, a tenant's contract
changed... The reconciler reads the rows above the generation its cache was valid at and
applies node changes as deltas instead of reading and solving the whole cluster again.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0014_cluster_changes"
down_revision: Union[str, Sequence[str], None] = "0013_placements_phase_index"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "cluster_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=257), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster_changes")),
    )
    op.create_index(op.f("ix_cluster_changes_generation"), "cluster_changes", ["generation"])


def downgrade() -> None:
    op.drop_index(op.f("ix_cluster_changes_generation"), table_name="cluster_changes")
    op.drop_table("cluster_changes")

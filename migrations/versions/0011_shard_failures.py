"""FAILED shards are placed again with back-off; a deployment that keeps failing is FAILED

Revision ID: 0011_shard_failures
Revises: 0010_deployment_names_per_tenant
Create Date: 2026-11-30

`deployments.failures` (failures in a row), `last_failure_at` and `restart_after` (when the
failed replicas are released to be placed again); the phase 'failed' needs no schema change
(phases are stored as plain strings). Rules: controller/domain/restarts.py.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011_shard_failures"
down_revision: Union[str, Sequence[str], None] = "0010_deployment_names_per_tenant"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch table copy on SQLite: that would drop migration 0005's triggers).
    op.add_column("deployments", sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("deployments", sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("deployments", sa.Column("restart_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE deployments SET phase = 'degraded' WHERE phase = 'failed'")
    # Plain DROP COLUMN (SQLite >= 3.35): a batch table copy would drop the isolation triggers.
    for column in ("restart_after", "last_failure_at", "failures"):
        op.drop_column("deployments", column)

"""nodes.failed_accelerators: the accelerators a node's agent says failed

Revision ID: 0032_failed_accelerators
Revises: 0031_deployment_revisions
Create Date: 2026-12-06

An agent reports its failed accelerators in every heartbeat (agent.proto `Heartbeat.
failed_accelerators`); the controller keeps them here, [{"index": i, "reason": text}], NULL when
there are none, and the solver places no shard on them (usecases/faults.py).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0032_failed_accelerators"
down_revision: Union[str, Sequence[str], None] = "0031_deployment_revisions"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("failed_accelerators", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): a batch table copy would drop the nodes' triggers.
    op.drop_column("nodes", "failed_accelerators")

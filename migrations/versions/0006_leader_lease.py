"""leader lease: which controller leads, its fencing token and expiry (database clock)

Revision ID: 0006_leader_lease
Revises: 0005_isolation_version
Create Date: 2026-11-30

Several controllers on one PostgreSQL elect a leader through this one row (id=1); see
`controller/store/lease.py`. The row exists from the start (holder '', token 0, expired), so
acquiring is always an UPDATE that takes the row's lock.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006_leader_lease"
down_revision: Union[str, Sequence[str], None] = "0005_isolation_version"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    lease = op.create_table(
        "leader_lease",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leader_lease")),
    )
    op.bulk_insert(lease, [{"id": 1, "holder": "", "token": 0, "expires_at": 0.0, "address": ""}])


def downgrade() -> None:
    op.drop_table("leader_lease")

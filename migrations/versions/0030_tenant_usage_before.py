"""tenants.usage_before_*: what the tenant's id had used when its present customer was created

Revision ID: 0030_tenant_usage_before
Revises: 0029_shard_phase_unknown
Create Date: 2026-12-06

A tenant id deleted and created again is a new customer, whose console shows its usage since its
creation: the id's usage to date (`closed_usage`, kept by triggers, which a prune of old
intervals does not lower) less what its customers before used. That was read from the intervals
that started before the creation, which docs/operations.md's pruning deletes: after a prune the
new customer was shown the old one's usage. The creation now stores the id's usage to date at
that moment (accelerator-seconds and joules), and the console subtracts it. NULL for tenants
created before this migration: those still subtract the intervals before their creation.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0030_tenant_usage_before"
down_revision: Union[str, Sequence[str], None] = "0029_shard_phase_unknown"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


COLUMNS = ("usage_before_accelerator_s", "usage_before_energy_j")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("tenants", sa.Column(column, sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): a batch table copy would drop the tenants' triggers.
    for column in reversed(COLUMNS):
        op.drop_column("tenants", column)

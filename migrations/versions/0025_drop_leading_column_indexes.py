"""deployments, placements: drop two indexes that a unique index already leads with

Revision ID: 0025_drop_leading_column_indexes
Revises: 0024_deployment_ids_never_reused
Create Date: 2026-12-04

`ix_deployments_tenant_id` repeats the first column of the (tenant_id, name) unique index and
`ix_placements_deployment_id` the first column of the (deployment_id, replica, shard) one: every
lookup by the one column (a tenant's deployments, a deployment's placements, the cascade of a
deleted deployment) is served by the unique index as well. Each was one more index entry to
write for every deployment and placement inserted, and for every update PostgreSQL cannot make
HOT: ~2 of the 10 index inserts of such an update (docs/benchmarks.md `pgcpu`).
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0025_drop_leading_column_indexes"
down_revision: Union[str, Sequence[str], None] = "0024_deployment_ids_never_reused"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.drop_index("ix_deployments_tenant_id", table_name="deployments")
    op.drop_index("ix_placements_deployment_id", table_name="placements")


def downgrade() -> None:
    op.create_index("ix_placements_deployment_id", "placements", ["deployment_id"])
    op.create_index("ix_deployments_tenant_id", "deployments", ["tenant_id"])

"""deployments.name indexed: an admin's watch or wait naming one deployment without a tenant
(`maiactl wait NAME`) filters on the name alone, which the (tenant_id, name) unique index cannot
serve, and scanned every deployment

Revision ID: 0015_deployments_name_index
Revises: 0014_cluster_changes
Create Date: 2026-12-01
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0015_deployments_name_index"
down_revision: Union[str, Sequence[str], None] = "0014_cluster_changes"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index(op.f("ix_deployments_name"), "deployments", ["name"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deployments_name"), table_name="deployments")

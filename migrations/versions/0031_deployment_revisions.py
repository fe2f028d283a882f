"""deployment_revisions: each deployment's template revisions, for rollout history and rollbacks

Revision ID: 0031_deployment_revisions
Revises: 0030_tenant_usage_before
Create Date: 2026-12-06

`revision_specs` keeps an older revision's spec only while its replicas run, so a rollback could
only go to a revision still placed. This table keeps the newest ten of each deployment
(`limits.REVISION_HISTORY`), written when an update rolls; a deployment's rows go with it.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0031_deployment_revisions"
down_revision: Union[str, Sequence[str], None] = "0030_tenant_usage_before"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "deployment_revisions",
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE",
                                name=op.f("fk_deployment_revisions_deployment_id_deployments")),
        sa.PrimaryKeyConstraint("deployment_id", "revision", name=op.f("pk_deployment_revisions")),
    )


def downgrade() -> None:
    op.drop_table("deployment_revisions")

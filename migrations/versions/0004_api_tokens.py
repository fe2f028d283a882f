"""api tokens: bearer tokens (admin, tenant, node-bootstrap) and per-node credentials

Revision ID: 0004_api_tokens
Revises: 0003_usage_intervals
Create Date: 2026-11-30

Secrets are never stored: `secret_sha256` is the hex SHA-256 of the random secret.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004_api_tokens"
down_revision: Union[str, Sequence[str], None] = "0003_usage_intervals"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=True),
        sa.Column("node_id", sa.String(length=128), nullable=True),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
    )
    op.create_index(op.f("ix_api_tokens_role"), "api_tokens", ["role"])
    op.create_index(op.f("ix_api_tokens_tenant_id"), "api_tokens", ["tenant_id"])
    op.create_index(op.f("ix_api_tokens_node_id"), "api_tokens", ["node_id"])


def downgrade() -> None:
    op.drop_table("api_tokens")

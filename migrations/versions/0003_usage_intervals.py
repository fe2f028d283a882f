"""usage metering: one interval per placed shard, opened and closed with the placement

Revision ID: 0003_usage_intervals
Revises: 0002_audit_log
Create Date: 2026-11-30
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003_usage_intervals"
down_revision: Union[str, Sequence[str], None] = "0002_audit_log"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "usage_intervals",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("placement_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("deployment", sa.String(length=63), nullable=False),
        sa.Column("replica", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("zone_id", sa.String(length=128), nullable=False),
        sa.Column("accelerator_model", sa.String(length=64), nullable=False),
        sa.Column("accelerator_milli", sa.Integer(), nullable=False),
        sa.Column("load_power_w", sa.Float(), nullable=False),
        sa.Column("idle_share_w", sa.Float(), nullable=False),
        sa.Column("started_s", sa.Float(), nullable=False),
        sa.Column("ended_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_intervals")),
    )
    op.create_index(op.f("ix_usage_intervals_placement_id"), "usage_intervals", ["placement_id"])
    op.create_index(op.f("ix_usage_intervals_node_id"), "usage_intervals", ["node_id"])
    op.create_index(op.f("ix_usage_intervals_ended_s"), "usage_intervals", ["ended_s"])
    op.create_index("ix_usage_intervals_tenant_started", "usage_intervals", ["tenant_id", "started_s"])


def downgrade() -> None:
    op.drop_index("ix_usage_intervals_tenant_started", table_name="usage_intervals")
    op.drop_index(op.f("ix_usage_intervals_ended_s"), table_name="usage_intervals")
    op.drop_index(op.f("ix_usage_intervals_node_id"), table_name="usage_intervals")
    op.drop_index(op.f("ix_usage_intervals_placement_id"), table_name="usage_intervals")
    op.drop_table("usage_intervals")

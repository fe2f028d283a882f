"""nominations: the head-of-line nominations in force, kept across a change of leader

Revision ID: 0034_nominations
Revises: 0033_audit_base
Create Date: 2026-12-06

A row a nomination (controller/scheduling/nominations.py): the solver's deployment id, its stored
deployment (deleted with it), the nominated nodes, when it was made, since when its deployment
has waited, how many replicas it missed, and a digest of what the nodes were chosen for. The
leader writes them with its commits; a new leader takes them up instead of starting the line
again.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0034_nominations"
down_revision: Union[str, Sequence[str], None] = "0033_audit_base"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "nominations",
        sa.Column("solver_id", sa.String(length=320), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("nodes", sa.JSON(), nullable=False),
        sa.Column("nominated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("missing", sa.Integer(), nullable=False),
        sa.Column("shape", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], name=op.f("fk_nominations_deployment_id_deployments"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("solver_id", name=op.f("pk_nominations")),
    )


def downgrade() -> None:
    op.drop_table("nominations")

"""placements.phase indexed: the reconciler's FAILED-shard query (store/failures.py) runs every
pass and scanned every placement for the few FAILED ones

Revision ID: 0013_placements_phase_index
Revises: 0012_capacity_generation
Create Date: 2026-11-30
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0013_placements_phase_index"
down_revision: Union[str, Sequence[str], None] = "0012_capacity_generation"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index(op.f("ix_placements_phase"), "placements", ["phase"])


def downgrade() -> None:
    op.drop_index(op.f("ix_placements_phase"), table_name="placements")

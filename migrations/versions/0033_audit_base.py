"""audit_base: where the audit chain begins once retention deleted its oldest entries

Revision ID: 0033_audit_base
Revises: 0032_failed_accelerators
Create Date: 2026-12-06

One row (id=1): the seq and hash of the last entry `maia-controller --audit-ttl` deleted, and
when it was recorded; seq 0 with the genesis hash (64 zeros) while none was. `maiactl audit
verify` checks the chain from the entry after it (controller/store/audit.py).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0033_audit_base"
down_revision: Union[str, Sequence[str], None] = "0032_failed_accelerators"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

GENESIS_HASH = "0" * 64


def upgrade() -> None:
    audit_base = op.create_table(
        "audit_base",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_base")),
    )
    op.bulk_insert(audit_base, [{"id": 1, "seq": 0, "hash": GENESIS_HASH, "at": None}])


def downgrade() -> None:
    op.drop_table("audit_base")

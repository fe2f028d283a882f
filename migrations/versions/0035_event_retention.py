"""event_retention: the highest event id retention deleted

Revision ID: 0035_event_retention
Revises: 0034_nominations
Create Date: 2026-12-07

One row (id=1): `maia-controller --event-ttl` raises `deleted_through` in the transaction of each
batch it deletes; 0 while none was. `ListEvents(after_id=)` below it answers OUT_OF_RANGE: a
follower resuming from there may have lost events (controller/usecases/events.py).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0035_event_retention"
down_revision: Union[str, Sequence[str], None] = "0034_nominations"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    mark = op.create_table(
        "event_retention",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deleted_through", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_retention")),
    )
    op.bulk_insert(mark, [{"id": 1, "deleted_through": 0}])


def downgrade() -> None:
    op.drop_table("event_retention")

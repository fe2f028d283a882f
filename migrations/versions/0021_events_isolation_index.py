"""events: a partial index of the isolation watchdog's records

Revision ID: 0021_events_isolation_index
Revises: 0020_isolation_bump_once
Create Date: 2026-12-02

A watchdog that starts leading reads the stored alarms and clearings (`isolation.violation`,
`isolation.cleared`: `controller.watchdog._stored_alarms`) once. `events` is never pruned and
has no index on `kind`: at 1,000,000 events that read scanned the table (PostgreSQL: a parallel
sequential scan, 180-525 ms; SQLite 250-565 ms), growing with every event ever written. A
partial index of those two kinds by id holds only the watchdog's records: the other events'
inserts (a plan commit writes several) skip it.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0021_events_isolation_index"
down_revision: Union[str, Sequence[str], None] = "0020_isolation_bump_once"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

WHERE = sa.text("kind IN ('isolation.violation', 'isolation.cleared')")


def upgrade() -> None:
    op.create_index("ix_events_isolation", "events", ["id"], postgresql_where=WHERE, sqlite_where=WHERE)


def downgrade() -> None:
    op.drop_index("ix_events_isolation", table_name="events")

"""events known deleted: the retention mark starts at what retention deleted before 0035

Revision ID: 0037_events_known_deleted
Revises: 0036_capacity_power
Create Date: 2026-12-07

`maia-controller --event-ttl` deleted events before 0035 gave it a mark to raise, and 0035 started
the mark at 0 whatever was gone: a follower resuming across the upgrade (`maiactl get events -w`,
`ListEvents(after_id=N)`) after an id whose successors were already deleted was answered the rest
as if none had been there, not OUT_OF_RANGE (controller/usecases/events.py).

Event ids are given in increasing order, so every id below the lowest one stored is gone: the mark
is raised to `min(events.id) - 1` (never lowered: a higher one stays). It is a lower bound of the
highest id deleted, which is what the mark claims and all it needs to be: retention deletes by
time and keeps the isolation watchdog's alarms and the drains, so ids above the lowest stored may
be gone too; a follower after one of those is not told, as before this revision. An id below the
lowest that was never committed (a transaction rolled back) is counted as deleted though it never
existed: harmless, a follower told to ask after the mark misses nothing. One an event still
being written holds while this runs (a controller writing through the upgrade, every event below
it gone) may commit below the mark, and a follower asking after the mark misses it, as it misses
one committed below a mark retention's own batch raised (PostgreSQL gives ids as rows are
written, not as they commit).

With no event stored:
- PostgreSQL: `events.id`'s sequence never gives an id twice, and the last one it gave
  (`pg_sequence_last_value`: NULL until one was given) is the highest ever assigned; the mark
  is raised to it, new ids come after it. It may count ids taken and rolled back, as above.
- SQLite: not knowable, and the mark stays. `events.id` is a rowid without AUTOINCREMENT (no
  `sqlite_sequence` row to read): SQLite gives a new row the highest id stored plus one, 1 in an
  empty table, so the ids of a table emptied are given again, and a mark above them would call
  the new events deleted. (Retention keeps the newest event since 9891a15c: only a retention
  older than that, or a deletion by hand, emptied the table.)

Downgrade: nothing. 0035's downgrade drops the table; until then a mark only raised to ids known
deleted stays true for the code of 0035 and 0036, which reads and raises it the same way.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0037_events_known_deleted"
down_revision: Union[str, Sequence[str], None] = "0036_capacity_power"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Every id below the lowest stored is gone (NULL with no event stored).
BELOW_THE_LOWEST = "(SELECT min(id) - 1 FROM events)"
# PostgreSQL: the last id events.id's sequence gave (NULL: none yet). Read of that one sequence:
# `pg_sequences` names every sequence of the database, and casting those names to regclass needs
# USAGE on each one's schema (an extension's, another application's: "permission denied").
LAST_GIVEN = "pg_sequence_last_value(pg_get_serial_sequence('events', 'id')::regclass)"


def upgrade() -> None:
    known = BELOW_THE_LOWEST
    if op.get_bind().dialect.name == "postgresql":
        known = f"COALESCE({BELOW_THE_LOWEST}, {LAST_GIVEN})"
    # NULL (nothing known) compares as nothing: the mark stays.
    op.execute(f"UPDATE event_retention SET deleted_through = {known} WHERE id = 1 AND deleted_through < {known}")


def downgrade() -> None:
    pass  # the mark raised stays true (above)

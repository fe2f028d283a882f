"""placements.phase 'unknown': the shards of a node gone down, until its agent reports again

Revision ID: 0029_shard_phase_unknown
Revises: 0028_closed_usage
Create Date: 2026-12-06

The node lifecycle writes the placements of a node that goes down (silent past the down grace)
as `unknown`, the agent's last word kept in the message ("node N is down: ...; last known
running: ..."), until its agent reports again or its work is evicted (`usecases/liveness.py`).
The column holds plain strings, so the upgrade changes no schema; it is a revision so that an
older controller, which fails reading a phase it does not know, refuses this database (a newer
controller has migrated it) instead of failing every pass that reads such a placement.

The downgrade writes each `unknown` placement back as the phase its message says it last had
(`loading` or `running`; anything else `assigned`: not taken up, as an older controller then
reads it until the agent's next report).
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0029_shard_phase_unknown"
down_revision: Union[str, Sequence[str], None] = "0028_closed_usage"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    op.execute("UPDATE placements SET phase = CASE "
               "WHEN message LIKE '%; last known running%' THEN 'running' "
               "WHEN message LIKE '%; last known loading%' THEN 'loading' "
               "ELSE 'assigned' END "
               "WHERE phase = 'unknown'")

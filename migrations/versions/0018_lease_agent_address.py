"""leader lease: where the leader serves its agents (its agent gateways' address)

Revision ID: 0018_lease_agent_address
Revises: 0017_count_trigger_rows
Create Date: 2026-12-02

A follower sends node agents to the leader (UNAVAILABLE with the leader's address in `maia-leader`,
`controller.leadership`). It read that address from the lease row's `address`: the leader's
`--advertise-address`, its own gRPC server. A leader that serves its agents through gateway
processes (`--agent-gateways`, `--agent-listen`) now writes their address in `agent_address` as it
takes or renews the lease, and followers send agents there. '' (a leader without gateways, or a
row written before this revision): agents go to `address`, as before.

`agent_holder` is the holder that wrote `agent_address`. During a rolling upgrade a controller
still running the code before this revision may take the lease: its UPDATE sets `holder` and
`address` and leaves `agent_address` as the last leader wrote it. The address counts only while
`agent_holder` is the row's holder (`controller.store.lease.read`), so followers then send agents
to the older leader's `address`, not to the gone leader's gateways.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0018_lease_agent_address"
down_revision: Union[str, Sequence[str], None] = "0017_count_trigger_rows"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # leader_lease has no triggers: a batch table copy on SQLite is safe.
    with op.batch_alter_table("leader_lease") as batch:
        batch.add_column(sa.Column("agent_address", sa.String(length=300), nullable=False, server_default=""))
        batch.add_column(sa.Column("agent_holder", sa.String(length=200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("leader_lease") as batch:
        batch.drop_column("agent_holder")
        batch.drop_column("agent_address")

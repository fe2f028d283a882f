"""capacity generation: its first move in a transaction takes isolation_state's lock first

Revision ID: 0023_capacity_lock_order
Revises: 0022_capacity_triggers_rows
Create Date: 2026-12-03

0012 ordered the two rows its triggers lock, isolation_state before capacity_state, by the
triggers' names: a statement fires its AFTER triggers on a table in name order. Since 0019 and
0022 the PostgreSQL UPDATE triggers on nodes are row-level, each with its own `WHEN` (isolation:
rack_id, accelerators, hbm_gib, cpu_milli, memory_mib changed; capacity: rack_id, accelerators,
accelerator_model, hbm_gib), and row-level AFTER triggers fire row by row, in the order the
statement wrote the rows, the name order holding only among one row's. An UPDATE that changed
one node's accelerator model (capacity's trigger alone) and then another's CPU (isolation's)
locked capacity_state, then waited for isolation_state; two statements in one transaction (a
Register batch writes a node a statement) did the same, and so did an INSERT ... ON CONFLICT
whose row-level updates fire before its statement-level inserts. A transaction that took them in
0012's order (changed a node's CPU, then another's accelerator model) waited for it: a deadlock,
which PostgreSQL breaks after `deadlock_timeout` (a second) by aborting one, SQLSTATE 40P01, an
error the controller does not retry (`db.database_failed` is false for it: INTERNAL to a client).

Here the capacity generation's move (0022's `maia_move_capacity_generation`, once per
transaction) first locks isolation_state's row (`FOR NO KEY UPDATE`, the lock an UPDATE of it
takes, without moving the version: the isolation watchdog reads nothing into it) unless the
transaction moved the isolation version already (0020's mark: it holds the lock). No transaction
then holds capacity_state's row without isolation_state's, whatever its statements and the order
of their rows: the two cannot wait for each other. A transaction that moves only the capacity
generation (a node's accelerator model and nothing the isolation rules read) now waits for one
that holds isolation_state's row (a plan commit that moved placements) to end. The trigger names
stay as they are. SQLite: unchanged (one writer at a time, no row locks: nothing to order).
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0023_capacity_lock_order"
down_revision: Union[str, Sequence[str], None] = "0022_capacity_triggers_rows"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

MOVE_FUNCTION = "maia_move_capacity_generation"  # 0022's
MOVED = "maia.capacity_generation_moved"  # 0022's transaction-local mark
ISOLATION_MOVED = "maia.isolation_version_moved"  # 0020's: the transaction holds isolation_state's row
BUMP = "UPDATE capacity_state SET generation = generation + 1 WHERE id = 1"
LOCK_ISOLATION = f"""IF current_setting('{ISOLATION_MOVED}', true) IS DISTINCT FROM 'on' THEN
            PERFORM 1 FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE;
        END IF;"""


def _move_function(first: str) -> str:
    """0022's move, `first` run before it."""
    return f"""CREATE OR REPLACE FUNCTION {MOVE_FUNCTION}() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('{MOVED}', true) IS DISTINCT FROM 'on' THEN
        {first}
        {BUMP};
        PERFORM set_config('{MOVED}', 'on', true);
    END IF;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_move_function(LOCK_ISOLATION))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_move_function(""))

"""capacity generation: also moved by a change of power (a node's idle power, a rack's or a row's budget)

Revision ID: 0036_capacity_power
Revises: 0035_event_retention
Create Date: 2026-12-07

The submit path refuses a shard that draws more power than any rack and row could give it
(controller/usecases/capacity.py, `PowerRoom`): what one node's shards could ever draw is its
rack's budget, or its row's, less the node's own idle power. So the capacity aggregates depend on
`nodes.idle_power_w`, `racks.power_budget_w` and `rows.power_budget_w`, and a change of one must
move the capacity generation as a change of a node's accelerators does. 0022's UPDATE triggers
are made again with those columns watched too: PostgreSQL row-level `WHEN` a watched column
`IS DISTINCT FROM` before, through 0022's once-a-transaction move (which 0023 made take
isolation_state's lock first); SQLite `WHEN` one `IS NOT` what it was. Inserts and deletes move it
already, whatever the columns.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0036_capacity_power"
down_revision: Union[str, Sequence[str], None] = "0035_event_retention"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BEFORE: dict[str, tuple[str, ...]] = {  # 0022's
    "nodes": ("rack_id", "accelerators", "accelerator_model", "hbm_gib"),
    "racks": ("row_id",),
    "rows": ("zone_id",),
}
WATCHED: dict[str, tuple[str, ...]] = {
    "nodes": (*BEFORE["nodes"], "idle_power_w"),
    "racks": (*BEFORE["racks"], "power_budget_w"),
    "rows": (*BEFORE["rows"], "power_budget_w"),
}
BUMP = "UPDATE capacity_state SET generation = generation + 1 WHERE id = 1"
BUMP_FUNCTION = "maia_bump_capacity_generation"  # 0022's: the once-a-transaction move


def _changed(columns: tuple[str, ...], differ: str) -> str:
    return " OR ".join(f"OLD.{column} {differ} NEW.{column}" for column in columns)


def _update_triggers(watched: dict[str, tuple[str, ...]]) -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table, columns in watched.items():
        name = f"trg_z_capacity_{table}_update"
        if postgresql:
            op.execute(f"DROP TRIGGER {name} ON {table}")
            op.execute(f"CREATE TRIGGER {name} AFTER UPDATE OF {', '.join(columns)} ON {table} "
                       f"FOR EACH ROW WHEN ({_changed(columns, 'IS DISTINCT FROM')}) "
                       f"EXECUTE FUNCTION {BUMP_FUNCTION}()")
        else:
            op.execute(f"DROP TRIGGER {name}")
            op.execute(f"CREATE TRIGGER {name} AFTER UPDATE OF {', '.join(columns)} ON {table} "
                       f"FOR EACH ROW WHEN {_changed(columns, 'IS NOT')} BEGIN {BUMP}; END")


def upgrade() -> None:
    _update_triggers(WATCHED)


def downgrade() -> None:
    _update_triggers(BEFORE)

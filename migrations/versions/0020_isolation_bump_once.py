"""isolation version: PostgreSQL's triggers move it once per transaction

Revision ID: 0020_isolation_bump_once
Revises: 0019_isolation_triggers_rows
Create Date: 2026-12-02

Each run of the isolation triggers' functions (0005, 0019) updated `isolation_state`'s one row
again. Since 0019 the UPDATE triggers are row-level: a statement that changed N watched rows
updated that row N times in its transaction, and each update first walked the versions of the row
the transaction had written before it (none can be pruned before the COMMIT): a 10,000-row UPDATE
of a watched column took 4-5 s instead of 0.4-0.9 s (docs/benchmarks.md, `rpgfix`), growing with
the square of the rows. A plan commit's executemany (a statement per placement moved) paid the same
since 0005.

The isolation watchdog only asks whether the version moved between the states it read (every
change of a transaction becomes visible with the version at its COMMIT), so one move per
transaction says as much: the first run in a transaction moves it and marks the transaction (a
transaction-local setting); the later ones see the mark and return. A savepoint rolled back to
undoes the move and the mark together, so a change after it moves the version again. The lock on
the row is taken where it was (at the transaction's first watched change). SQLite: unchanged.
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0020_isolation_bump_once"
down_revision: Union[str, Sequence[str], None] = "0019_isolation_triggers_rows"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BUMP_FUNCTION = "maia_bump_isolation_version"  # 0005's
ROWS_FUNCTION = "maia_bump_isolation_version_if_rows"  # 0019's
MOVE_FUNCTION = "maia_move_isolation_version"
MOVED = "maia.isolation_version_moved"  # the transaction-local mark
BUMP = "UPDATE isolation_state SET version = version + 1 WHERE id = 1"
ANY_ROW = """IF TG_OP = 'INSERT' THEN
        PERFORM 1 FROM new_rows LIMIT 1;
    ELSE
        PERFORM 1 FROM old_rows LIMIT 1;
    END IF;
    IF FOUND THEN
        {bump};
    END IF;"""


def _trigger_function(name: str, body: str) -> str:
    return f"""CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {body}
    RETURN NULL;
END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""CREATE FUNCTION {MOVE_FUNCTION}() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('{MOVED}', true) IS DISTINCT FROM 'on' THEN
        {BUMP};
        PERFORM set_config('{MOVED}', 'on', true);
    END IF;
END $$""")
    op.execute(_trigger_function(BUMP_FUNCTION, f"PERFORM {MOVE_FUNCTION}();"))
    op.execute(_trigger_function(ROWS_FUNCTION, ANY_ROW.format(bump=f"PERFORM {MOVE_FUNCTION}()")))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_trigger_function(BUMP_FUNCTION, f"{BUMP};"))
    op.execute(_trigger_function(ROWS_FUNCTION, ANY_ROW.format(bump=BUMP)))
    op.execute(f"DROP FUNCTION {MOVE_FUNCTION}()")

"""leader_lease: the fence a fenced COMMIT carries, as a function (PostgreSQL)

Revision ID: 0026_lease_fence_function
Revises: 0025_drop_leading_column_indexes
Create Date: 2026-12-05

Every fenced transaction's COMMIT carries the leader lease's check in its own message
(`controller/store/lease.py`, `fence_guard`). It was an anonymous `DO` block, which PostgreSQL
parses and compiles anew at every execution: ~0.06 ms of the server's CPU a commit, against
~0.015 ms for a call of this function, whose body and query plan each backend keeps after its
first call (docs/benchmarks.md, `fencefn`). Same check, same refusal: the row locked `FOR KEY
SHARE` when it names the holder and the token (and, with `live`, an expiry in the future on the
database's clock), else SQLSTATE MA001, which aborts the transaction. SQLite has no functions of
this kind; its controller fences by a SELECT of its own (`lease.fence`).
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0026_lease_fence_function"
down_revision: Union[str, Sequence[str], None] = "0025_drop_leading_column_indexes"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FUNCTION = "maia_lease_fence"  # called by name: controller/store/lease.py, FENCE_FUNCTION
REFUSED = "MA001"  # the SQLSTATE of a refusal: lease.FENCE_REFUSED

_CREATE = f"""
CREATE FUNCTION {FUNCTION}(p_holder TEXT, p_token BIGINT, p_live BOOLEAN) RETURNS void
LANGUAGE plpgsql AS $fence$
BEGIN
    PERFORM 1 FROM leader_lease WHERE id = 1 AND holder = p_holder AND token = p_token
        AND (NOT p_live OR expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION))
        FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'leader lease lost' USING ERRCODE = '{REFUSED}';
    END IF;
END
$fence$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {FUNCTION}(TEXT, BIGINT, BOOLEAN)")

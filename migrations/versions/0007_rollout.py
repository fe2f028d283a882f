"""rollout: resource versions, spec revisions, draining nodes, client request ids

Revision ID: 0007_rollout
Revises: 0006_leader_lease
Create Date: 2026-11-30

- `deployments.resource_version`: bumped on every spec change; an update names the version it
  was based on and is refused when that is stale (optimistic concurrency).
- `deployments.template_revision`: bumped when a change needs new replicas (shard, shards per
  replica, locality, spread); `placements.revision` says which revision a shard runs, and
  `deployments.revision_specs` keeps the specs of older revisions still running during a
  rolling update ({"revision": interchange deployment document}).
- `nodes.draining`: a drain in progress; the node's shards are replaced make-before-break.
- `client_requests`: a submit's or update's client request id, so a retried call is answered
  with the first result and writes nothing new.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007_rollout"
down_revision: Union[str, Sequence[str], None] = "0006_leader_lease"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch table copy on SQLite: that would drop migration 0005's triggers).
    op.add_column("deployments", sa.Column("resource_version", sa.BigInteger(), nullable=False, server_default="1"))
    op.add_column("deployments", sa.Column("template_revision", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("deployments", sa.Column("revision_specs", sa.JSON(), nullable=False, server_default="{}"))
    op.add_column("placements", sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("nodes", sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "client_requests",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("spec_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE",
                                name=op.f("fk_client_requests_deployment_id_deployments")),
        sa.PrimaryKeyConstraint("tenant_id", "request_id", name=op.f("pk_client_requests")),
    )
    op.create_index(op.f("ix_client_requests_deployment_id"), "client_requests", ["deployment_id"])


def downgrade() -> None:
    op.drop_table("client_requests")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("draining")
    with op.batch_alter_table("placements") as batch:
        batch.drop_column("revision")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("revision_specs")
        batch.drop_column("template_revision")
        batch.drop_column("resource_version")

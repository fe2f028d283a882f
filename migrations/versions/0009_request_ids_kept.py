"""client request ids outlive their deployment (no longer deleted with it)

Revision ID: 0009_request_ids_kept
Revises: 0008_node_lifecycle
Create Date: 2026-11-30

A submit retried after its deployment was deleted found its id gone (the foreign key
cascaded) and created the deployment again. `client_requests.deployment_id` is now set to null
when the deployment goes (ON DELETE SET NULL) and `deployment_name` keeps what the id was used
on, so the retry is refused naming it; such ids are pruned after `REQUEST_ID_RETENTION_S`.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0009_request_ids_kept"
down_revision: Union[str, Sequence[str], None] = "0008_node_lifecycle"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

FK = "fk_client_requests_deployment_id_deployments"


def upgrade() -> None:
    # client_requests has no triggers: a batch table copy on SQLite is safe.
    with op.batch_alter_table("client_requests") as batch:
        batch.add_column(sa.Column("deployment_name", sa.String(length=128), nullable=False, server_default=""))
        batch.drop_constraint(FK, type_="foreignkey")
        batch.alter_column("deployment_id", existing_type=sa.Integer(), nullable=True)
        batch.create_foreign_key(FK, "deployments", ["deployment_id"], ["id"], ondelete="SET NULL")
    op.execute("UPDATE client_requests SET deployment_name = "
               "(SELECT name FROM deployments WHERE deployments.id = client_requests.deployment_id)")


def downgrade() -> None:
    op.execute("DELETE FROM client_requests WHERE deployment_id IS NULL")
    with op.batch_alter_table("client_requests") as batch:
        batch.drop_constraint(FK, type_="foreignkey")
        batch.alter_column("deployment_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(FK, "deployments", ["deployment_id"], ["id"], ondelete="CASCADE")
        batch.drop_column("deployment_name")

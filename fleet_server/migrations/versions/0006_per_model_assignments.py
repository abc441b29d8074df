"""several models per device: assignments keyed by (device, model), device_models

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleet_server.db.types

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("model", sa.String(length=200), nullable=False, server_default="")
        )
    # every existing row is one device's one model: name it after its bundles
    op.execute(
        "UPDATE assignments SET model = COALESCE((SELECT bundles.name FROM bundles WHERE "
        "bundles.id = COALESCE(assignments.desired_bundle_id, assignments.shadow_bundle_id)), '')"
    )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_constraint("pk_assignments", type_="primary")
        batch_op.create_primary_key("pk_assignments", ["device_id", "model"])
        batch_op.alter_column("model", server_default=None)
    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("bundle_id", sa.String(length=40), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("updated_at", fleet_server.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_models_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "name", name=op.f("pk_device_models")),
    )
    op.execute(
        "INSERT INTO device_models (device_id, name, bundle_id, version, updated_at) "
        "SELECT id, current_name, current_bundle_id, current_version, enrolled_at FROM devices "
        "WHERE current_name IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_table("device_models")
    op.execute(
        "DELETE FROM assignments WHERE model <> '' AND EXISTS (SELECT 1 FROM assignments a2 "
        "WHERE a2.device_id = assignments.device_id AND a2.model < assignments.model)"
    )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_constraint("pk_assignments", type_="primary")
        batch_op.create_primary_key("pk_assignments", ["device_id"])
        batch_op.drop_column("model")

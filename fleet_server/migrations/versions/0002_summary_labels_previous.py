"""telemetry summaries: labelled-window figures and the replaced model's agreement

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("labels_count", sa.Integer()),
    ("labels_correct", sa.Integer()),
    ("labels", sa.JSON()),
    ("previous_version", sa.Integer()),
    ("previous_count", sa.Integer()),
    ("previous_errors", sa.Integer()),
    ("previous_agreement", sa.Float()),
)


def upgrade() -> None:
    with op.batch_alter_table("telemetry_summaries", schema=None) as batch_op:
        for name, type_ in _COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry_summaries", schema=None) as batch_op:
        for name, _ in reversed(_COLUMNS):
            batch_op.drop_column(name)

"""Deadline claims: which timeout service holds a saga's due deadline, and until when.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Two nullable columns on the instances table; existing rows start unclaimed. Table names carry
the configured prefix (``sagas_`` by default). SQLite goes through batch mode, which copies the
table where SQLite cannot alter it in place (dropping columns on downgrade).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _prefix() -> str:
    return str(
        context.config.attributes.get("table_prefix")
        or context.config.get_main_option("sagas_table_prefix")
        or "sagas_"
    )


def upgrade() -> None:
    with op.batch_alter_table(f"{_prefix()}instances") as batch:
        batch.add_column(sa.Column("deadline_claimed_by", sa.String(200), nullable=True))
        batch.add_column(
            sa.Column("deadline_claimed_until", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table(f"{_prefix()}instances") as batch:
        batch.drop_column("deadline_claimed_until")
        batch.drop_column("deadline_claimed_by")

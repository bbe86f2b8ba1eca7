"""Initial sagas tables: instances, history, outbox, inbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Table and index names carry the configured prefix (``sagas_`` by default). Types are spelled
out here, not imported from the application, so this revision never changes after release.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _prefix() -> str:
    return str(
        context.config.attributes.get("table_prefix")
        or context.config.get_main_option("sagas_table_prefix")
        or "sagas_"
    )


def _at(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    p = _prefix()
    op.create_table(
        f"{p}instances",
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("saga_type", sa.String(200), nullable=False),
        sa.Column("definition_version", sa.String(200), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempt_base", sa.Integer(), nullable=False),
        sa.Column("wait", sa.String(16), nullable=True),
        _at("deadline_at", nullable=True),
        _at("saga_deadline_at", nullable=True),
        _at("next_deadline_at", nullable=True),
        sa.Column("data", _JSON, nullable=False),
        sa.Column("steps", _JSON, nullable=False),
        sa.Column("error", _JSON, nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        _at("created_at", nullable=False),
        _at("updated_at", nullable=False),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        sa.Column("trace_context", _JSON, nullable=False),
        sa.PrimaryKeyConstraint("saga_id", name=f"pk_{p}instances"),
    )
    op.create_index(f"ix_{p}instances_status", f"{p}instances", ["status"])
    op.create_index(f"ix_{p}instances_saga_type", f"{p}instances", ["saga_type"])
    op.create_index(f"ix_{p}instances_updated_at", f"{p}instances", ["updated_at"])
    op.create_index(f"ix_{p}instances_next_deadline_at", f"{p}instances", ["next_deadline_at"])

    op.create_table(
        f"{p}history",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _at("at", nullable=False),
        sa.Column("input", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(32), nullable=True),
        sa.Column("to_status", sa.String(32), nullable=False),
        sa.Column("step", sa.String(200), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(200), nullable=True),
        sa.Column("message_id", sa.String(400), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{p}history"),
    )
    op.create_index(f"ix_{p}history_saga_id", f"{p}history", ["saga_id"])

    op.create_table(
        f"{p}outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("message_id", sa.String(400), nullable=False),
        sa.Column("message_type", sa.String(200), nullable=False),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        sa.Column("reply_to", sa.String(400), nullable=True),
        sa.Column("headers", _JSON, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        _at("timestamp", nullable=False),
        _at("created_at", nullable=False),
        _at("sent_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        _at("claimed_until", nullable=True),
        _at("available_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{p}outbox"),
    )
    op.create_index(f"ix_{p}outbox_pending", f"{p}outbox", ["sent_at", "id"])
    op.create_index(f"ix_{p}outbox_saga_id", f"{p}outbox", ["saga_id", "sent_at", "id"])

    op.create_table(
        f"{p}inbox",
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("message_id", sa.String(400), nullable=False),
        _at("processed_at", nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=f"pk_{p}inbox"),
    )
    op.create_index(f"ix_{p}inbox_processed_at", f"{p}inbox", ["processed_at"])


def downgrade() -> None:
    p = _prefix()
    for table in ("inbox", "outbox", "history", "instances"):
        op.drop_table(f"{p}{table}")

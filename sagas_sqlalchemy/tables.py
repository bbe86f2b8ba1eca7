"""The four sagas tables as SQLAlchemy Core metadata, named with a configurable prefix.

The prefix (``sagas_`` by default) lets the tables live beside a host application's own tables,
and lets tests run in one database side by side. Migrations (``migrations/versions``) create the
same schema; a test compares the two so they cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = ["DEFAULT_TABLE_PREFIX", "JSONType", "SagaTables", "UTCDateTime", "build_tables"]

DEFAULT_TABLE_PREFIX = "sagas_"

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
"""JSON everywhere, JSONB on PostgreSQL."""

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: values are stored as naive UTC
    text (which sorts and compares correctly) and come back with ``tzinfo=UTC`` attached.
    Naive datetimes are refused: a naive value cannot be told apart from local time.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Convert to UTC before writing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: sagas stores timezone-aware UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:  # noqa: ARG002
        """Return an aware UTC datetime."""
        if value is None:
            return None
        moment: datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class SagaTables:
    """The sagas tables of one prefix.

    Attributes:
        prefix: The table name prefix.
        metadata: Metadata holding exactly these four tables.
        instances: One row per saga instance (optimistic ``version``, deadline claims).
        history: The append-only audit trail.
        outbox: Messages committed with a state change, waiting to be published.
        inbox: Processed message ids per consumer.
    """

    prefix: str
    metadata: sa.MetaData
    instances: sa.Table
    history: sa.Table
    outbox: sa.Table
    inbox: sa.Table

    @property
    def version_table(self) -> str:
        """The Alembic version table of this prefix (``sagas_alembic_version`` by default)."""
        return f"{self.prefix}alembic_version"

    @property
    def names(self) -> frozenset[str]:
        """Every table name that belongs to sagas under this prefix, version table included."""
        return frozenset({*self.metadata.tables, self.version_table})


def build_tables(prefix: str = DEFAULT_TABLE_PREFIX) -> SagaTables:
    """Build the table metadata for ``prefix``.

    Args:
        prefix: Prepended to every table and index name; letters, digits and ``_`` only.

    Raises:
        ValueError: The prefix is not a plain identifier.
    """
    if not prefix or not prefix.replace("_", "a").isalnum() or not prefix.isascii():
        raise ValueError(f"table prefix {prefix!r} must be letters, digits and underscores")
    # Named primary keys, so constraint names match the migrations on every database.
    metadata = sa.MetaData(naming_convention={"pk": "pk_%(table_name)s"})
    p = prefix
    instances = sa.Table(
        f"{p}instances",
        metadata,
        sa.Column("saga_id", sa.String(200), primary_key=True),
        sa.Column("saga_type", sa.String(200), nullable=False),
        sa.Column("definition_version", sa.String(200), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempt_base", sa.Integer(), nullable=False),
        sa.Column("wait", sa.String(16), nullable=True),
        sa.Column("deadline_at", UTCDateTime(), nullable=True),
        sa.Column("saga_deadline_at", UTCDateTime(), nullable=True),
        sa.Column("next_deadline_at", UTCDateTime(), nullable=True),
        sa.Column("data", JSONType, nullable=False),
        sa.Column("steps", JSONType, nullable=False),
        sa.Column("error", JSONType, nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        sa.Column("trace_context", JSONType, nullable=False),
        # Which timeout service holds the saga's due deadline, and until when (a hint only).
        sa.Column("deadline_claimed_by", sa.String(200), nullable=True),
        sa.Column("deadline_claimed_until", UTCDateTime(), nullable=True),
        sa.Index(f"ix_{p}instances_status", "status"),
        sa.Index(f"ix_{p}instances_saga_type", "saga_type"),
        sa.Index(f"ix_{p}instances_updated_at", "updated_at"),
        sa.Index(f"ix_{p}instances_next_deadline_at", "next_deadline_at"),
    )
    history = sa.Table(
        f"{p}history",
        metadata,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
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
        sa.Index(f"ix_{p}history_saga_id", "saga_id"),
    )
    outbox = sa.Table(
        f"{p}outbox",
        metadata,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("message_id", sa.String(400), nullable=False),
        sa.Column("message_type", sa.String(200), nullable=False),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        sa.Column("reply_to", sa.String(400), nullable=True),
        sa.Column("headers", JSONType, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("claimed_until", UTCDateTime(), nullable=True),
        sa.Column("available_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        # Claims scan unsent rows in id order and look for earlier unsent rows of the same saga.
        sa.Index(f"ix_{p}outbox_pending", "sent_at", "id"),
        sa.Index(f"ix_{p}outbox_saga_id", "saga_id", "sent_at", "id"),
    )
    inbox = sa.Table(
        f"{p}inbox",
        metadata,
        sa.Column("consumer", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(400), primary_key=True),
        sa.Column("processed_at", UTCDateTime(), nullable=False),
        sa.Index(f"ix_{p}inbox_processed_at", "processed_at"),
    )
    return SagaTables(
        prefix=prefix,
        metadata=metadata,
        instances=instances,
        history=history,
        outbox=outbox,
        inbox=inbox,
    )

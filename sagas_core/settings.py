"""Settings of a sagas host and worker, from ``SAGAS_*`` environment variables and ``.env``.

A wrong value fails at start with a message naming the variable; URLs are never shown with their
password (use :func:`redact_url` before logging one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SagasSettings", "SettingsError", "load_settings", "redact_url"]

_DATABASE_SCHEMES = ("postgresql", "postgresql+psycopg", "postgresql+asyncpg", "sqlite+aiosqlite")
_AMQP_SCHEMES = ("amqp", "amqps")
ENV_PREFIX = "SAGAS_"


def redact_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***`` (safe to log and print)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class SettingsError(ValueError):
    """Settings that cannot work, explained per environment variable (no secret values)."""


class SagasSettings(BaseSettings):
    """Everything a worker needs to know; each field is the variable ``SAGAS_<NAME>``.

    Attributes:
        database_url: State store URL (``postgresql+psycopg://...`` or ``sqlite+aiosqlite:///...``).
            Unset: the embedded SQLite file at ``sqlite_path``.
        sqlite_path: The embedded SQLite file, used when no database URL is set.
        table_prefix: Prefix of the sagas tables.
        auto_migrate: Migrate a server database at start (SQLite always is).
        slow_statement_seconds: A store claim or save slower than this is logged as a warning
            and recorded (``saga.store.slow_statement.duration``).
        amqp_url: RabbitMQ URL. Unset: the in-process bus (participants must be in-process).
        rabbitmq_prefix: Prefix of every exchange and queue name.
        rabbitmq_quorum: Quorum queues (``false`` falls back to classic queues).
        rabbitmq_reply_affinity: Replies come back to the worker that sent the command (its
            own reply queue; after 5 s unclaimed they move to the group's queue).
        instance_id: This worker's stable name for its own reply queue (a pod or host name and
            slot), so a restarted worker takes up its queue again instead of leaving one behind
            (each left queue is deleted 5 minutes after its process stopped). Unique per live
            process. Unset: a random id per process.
        delivery_limit: Deliveries of a failing message before it is dead-lettered.
        group: The orchestrator group (names the reply queue).
        concurrency: Messages handled at once per consumer.
        prefetch: Messages the broker sends ahead (default: the concurrency).
        graceful_timeout: Seconds to finish in-flight work and flush the outbox at shutdown.
        timeout_interval: Seconds between polls for due deadlines (at least, with
            ``timeout_idle_interval``).
        timeout_idle_interval: Poll when a deadline this worker committed is due, otherwise
            every this many seconds (``none``: every ``timeout_interval``).
        log_level: Logging level.
        log_format: ``text`` or ``json`` (one object a line).
        health_port: Serve ``/health`` and ``/ready`` on 127.0.0.1 at this port.
        circuit_failures: Consecutive timeouts or transient failures of one destination that
            open its circuit (commands to it then wait instead of failing); unset: no breaker.
        circuit_open_seconds: How long an open circuit waits before a probe goes through.
        status_events: Status events published to the saga-events topic: ``all`` (every
            change, per step too), ``lifecycle`` (the saga's own changes) or ``none``.
        tune_gc: ``sagas worker`` tunes the garbage collector for a long-running process
            (:func:`sagas_core.runtime.tune_gc`); ``false`` keeps Python's own settings.
        max_message_bytes: The largest reply or event body the orchestrator parses; a larger
            one is dead-lettered unparsed, with the reason.
        max_saga_data_bytes: The most a saga's data (and one reply's data) may take as JSON: a
            reply that would pass it fails its step, a start over it is refused.
        reply_users: The broker user of each destination's participant, as a JSON object
            (``{"shipping": "shipping-svc"}``): replies for that destination's steps must carry
            that broker-validated AMQP ``user_id``. Destinations not listed are not checked.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    database_url: str | None = Field(default=None, repr=False)
    sqlite_path: Path = Path(".sagas/sagas.sqlite3")
    table_prefix: str = Field(default="sagas_", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    auto_migrate: bool = False
    slow_statement_seconds: float = Field(default=1.0, ge=0, le=3600)
    amqp_url: str | None = Field(default=None, repr=False)
    rabbitmq_prefix: str = Field(default="sagas", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,60}$")
    rabbitmq_quorum: bool = True
    rabbitmq_reply_affinity: bool = True
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
    delivery_limit: int = Field(default=5, ge=0, le=1000)
    group: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,60}$")
    concurrency: int = Field(default=16, ge=1, le=10_000)
    prefetch: int | None = Field(default=None, ge=1, le=65_535)
    graceful_timeout: float = Field(default=30.0, gt=0, le=3600)
    timeout_interval: float = Field(default=0.1, gt=0, le=60)
    timeout_idle_interval: float | None = Field(default=1.0, gt=0, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    health_port: int | None = Field(default=None, ge=1, le=65_535)
    circuit_failures: int | None = Field(default=None, ge=1, le=10_000)
    circuit_open_seconds: float = Field(default=30.0, gt=0, le=86_400)
    status_events: Literal["all", "lifecycle", "none"] = "all"
    tune_gc: bool = True
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    max_saga_data_bytes: int = Field(default=256 * 1024, ge=1024, le=512 * 1024 * 1024)
    reply_users: dict[str, str] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("timeout_idle_interval", mode="before")
    @classmethod
    def _idle_off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return value

    @field_validator("timeout_idle_interval")
    @classmethod
    def _idle_not_shorter(cls, value: float | None, info: ValidationInfo) -> float | None:
        interval = info.data.get("timeout_interval")
        if value is not None and interval is not None and value < interval:
            raise ValueError(
                f"must not be shorter than {ENV_PREFIX}TIMEOUT_INTERVAL ({interval} s)"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}; use one of {', '.join(_DATABASE_SCHEMES)}"
            )
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in _AMQP_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r}; use amqp:// or amqps://")
        return value

    def describe(self) -> dict[str, object]:
        """The settings as a dict safe to log: URLs redacted."""
        values = self.model_dump(mode="json")
        values["database_url"] = redact_url(self.database_url)
        values["amqp_url"] = redact_url(self.amqp_url)
        return values


def load_settings(**overrides: object) -> SagasSettings:
    """Read the settings from the environment (and ``.env``), applying ``overrides``.

    Raises:
        SettingsError: naming each wrong variable and why, never echoing its value.
    """
    try:
        return SagasSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None

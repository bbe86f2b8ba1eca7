"""The package surface: pinned exports, the install hint, URL handling and UTC datetimes."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

import sagas_sqlalchemy
from sagas_sqlalchemy.engine import async_url, sync_url
from sagas_sqlalchemy.tables import UTCDateTime, build_tables


def test_public_names_are_pinned() -> None:
    assert sagas_sqlalchemy.__all__ == [
        "DEFAULT_TABLE_PREFIX",
        "INSTALL_SAGAS_SQLALCHEMY",
        "SagaTables",
        "SqlIdempotencyStore",
        "SqlSagaStore",
        "build_outcomes_table",
        "build_tables",
        "create_engine",
        "create_store",
    ]


def test_a_missing_sqlalchemy_raises_an_import_error_with_the_install_hint() -> None:
    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "try:\n    import sagas_sqlalchemy\n"
        "except ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="."
    )
    assert "pip install 'sagas-orchestrator[sqlalchemy]'" in result.stdout


@pytest.mark.parametrize(
    ("given", "for_runtime", "for_alembic"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite+aiosqlite", "sqlite+pysqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite", "sqlite+pysqlite"),
    ],
)
def test_urls_map_to_an_async_driver_for_the_store_and_a_sync_one_for_alembic(
    given: str, for_runtime: str, for_alembic: str
) -> None:
    assert async_url(given).drivername == for_runtime
    assert sync_url(given).drivername == for_alembic


def test_datetimes_are_stored_in_utc_and_naive_ones_are_refused() -> None:
    column = UTCDateTime()
    plus_two = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    sqlite = sa.create_engine("sqlite://").dialect

    naive_noon = datetime(2030, 1, 1, 12, 0)  # noqa: DTZ001 - how SQLite hands values back

    assert column.process_bind_param(plus_two, sqlite) == naive_noon
    assert column.process_result_value(naive_noon, sqlite) == datetime(
        2030, 1, 1, 12, 0, tzinfo=UTC
    )
    with pytest.raises(ValueError, match="naive"):
        column.process_bind_param(datetime(2030, 1, 1), sqlite)  # noqa: DTZ001


def test_table_prefixes_must_be_plain_identifiers() -> None:
    assert build_tables("app_sagas_").instances.name == "app_sagas_instances"
    with pytest.raises(ValueError, match="prefix"):
        build_tables("bad-prefix; drop table x")

"""The Alembic migrations: up from empty to head, down to base, no drift from the table
metadata, a version table of their own, and the embedded SQLite default migrating itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from sagas_abstractions import StoreError
from sagas_core.cli import app
from sagas_sqlalchemy import build_tables, create_store
from sagas_sqlalchemy.engine import sync_url
from sagas_sqlalchemy.migrate import downgrade, migrations_dir, upgrade
from sagas_sqlalchemy.migrate import drift as migrate_drift
from sagas_sqlalchemy.store import _instance_row
from tests.contracts.store_contract import T0, insert, make_instance
from tests.integration.sqlalchemy.sql_support import sqlite_url, unique_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(url: str) -> Iterator[str]:
    """A fresh prefix; whatever the test leaves behind is dropped afterwards."""
    chosen = unique_prefix()
    yield chosen
    tables = build_tables(chosen)
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.begin() as conn:
            tables.metadata.drop_all(conn)
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{tables.version_table}"'))
    finally:
        engine.dispose()


def inspect(url: str, action: Any) -> Any:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return action(conn)
    finally:
        engine.dispose()


def table_names(url: str, prefix: str = "") -> set[str]:
    """Tables whose name starts with ``prefix`` (other test runs may share the database)."""
    names = inspect(url, lambda conn: sa.inspect(conn).get_table_names())
    return {name for name in names if name.startswith(prefix)}


def drift(url: str, prefix: str) -> list[str]:
    return migrate_drift(url, table_prefix=prefix)


def test_migrations_live_in_the_top_level_directory_of_a_checkout() -> None:
    found = migrations_dir()
    assert found == Path(__file__).resolve().parents[3] / "migrations"
    assert (found / "versions" / "0001_initial.py").is_file()


def test_a_copy_packaged_inside_the_wheel_is_preferred(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "sagas_sqlalchemy"
    (package / "migrations").mkdir(parents=True)
    (package / "migrations" / "env.py").touch()

    assert migrations_dir(package) == package / "migrations"


def test_missing_migrations_are_reported_with_where_they_were_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sagas migrations not found"):
        migrations_dir(tmp_path / "sagas_sqlalchemy")


def test_upgrade_to_head_creates_the_tables_with_no_drift_and_downgrade_removes_them(
    url: str, prefix: str
) -> None:
    tables = build_tables(prefix)
    assert table_names(url, prefix) == set()

    upgrade(url, table_prefix=prefix)

    assert table_names(url, prefix) == set(tables.names)
    assert drift(url, prefix) == []

    downgrade(url, "base", table_prefix=prefix)

    assert table_names(url, prefix) == {tables.version_table}


def test_the_version_table_is_our_own_and_records_head(url: str, prefix: str) -> None:
    had_plain_version_table = "alembic_version" in table_names(url)

    upgrade(url, table_prefix=prefix)

    version_table = f"{prefix}alembic_version"
    assert version_table in table_names(url, prefix)
    assert ("alembic_version" in table_names(url)) == had_plain_version_table
    query: sa.Select[Any] = sa.select(sa.column("version_num")).select_from(sa.table(version_table))
    versions = inspect(url, lambda conn: conn.execute(query).all())
    assert [row[0] for row in versions] == ["0002"]


async def test_deadline_claims_migrate_over_existing_sagas_and_downgrade_keeps_them(
    url: str, prefix: str
) -> None:
    upgrade(url, "0001", table_prefix=prefix)
    instances = build_tables(prefix).instances
    row = {
        name: value
        for name, value in _instance_row(make_instance("old", deadline_at=T0)).items()
        if not name.startswith("deadline_claimed")
    }
    at_0001 = sa.table(instances.name, *(sa.column(name, instances.c[name].type) for name in row))
    inspect(url, lambda conn: (conn.execute(sa.insert(at_0001).values(row)), conn.commit()))

    upgrade(url, table_prefix=prefix)

    assert drift(url, prefix) == []
    store = create_store(url, table_prefix=prefix, migrate=False)
    try:
        claimed = await store.claim_due(T0, 10, owner="a", lease=timedelta(seconds=5))
        assert [saga.saga_id for saga in claimed] == ["old"]
        assert await store.claim_due(T0, 10, owner="b", lease=timedelta(seconds=5)) == []
    finally:
        await store.close()

    downgrade(url, "0001", table_prefix=prefix)

    columns = inspect(url, lambda conn: sa.inspect(conn).get_columns(instances.name))
    indexes = inspect(url, lambda conn: sa.inspect(conn).get_indexes(instances.name))
    assert {column["name"] for column in columns} == set(row)
    assert {index["name"] for index in indexes} == {index.name for index in instances.indexes}
    kept = inspect(url, lambda conn: conn.execute(sa.select(at_0001.c.saga_id)).all())
    assert [saga_id for (saga_id,) in kept] == ["old"]


def test_upgrading_twice_is_a_no_op(url: str, prefix: str) -> None:
    upgrade(url, table_prefix=prefix)
    upgrade(url, table_prefix=prefix)

    assert drift(url, prefix) == []


def test_the_default_prefix_uses_sagas_alembic_version() -> None:
    assert build_tables().version_table == "sagas_alembic_version"


@pytest.mark.postgres
async def test_concurrent_upgrades_are_serialized(postgres_url: str) -> None:
    prefix = unique_prefix()
    try:
        await asyncio.gather(
            *(asyncio.to_thread(upgrade, postgres_url, table_prefix=prefix) for _ in range(4))
        )
        assert drift(postgres_url, prefix) == []
    finally:
        downgrade(postgres_url, "base", table_prefix=prefix)
        inspect(
            postgres_url,
            lambda conn: (
                conn.execute(sa.text(f"DROP TABLE {prefix}alembic_version")),
                conn.commit(),
            ),
        )


async def test_the_embedded_sqlite_store_migrates_on_first_use_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    first = create_store(url)
    try:
        await first.save([insert(make_instance("kept"))])
    finally:
        await first.close()

    again = create_store(url)
    try:
        assert await again.load("kept") == make_instance("kept")
    finally:
        await again.close()
    assert "sagas_alembic_version" in table_names(url)
    assert drift(url, "sagas_") == []


@pytest.mark.postgres
async def test_a_server_database_is_never_migrated_unless_asked(postgres_url: str) -> None:
    store = create_store(postgres_url, table_prefix=unique_prefix())
    try:
        with pytest.raises(StoreError) as caught:
            await store.load("anything")
    finally:
        await store.close()

    assert "UndefinedTable" in str(caught.value) or "does not exist" in str(caught.value)


@pytest.mark.postgres
async def test_a_server_database_migrates_on_first_use_when_asked(postgres_url: str) -> None:
    prefix = unique_prefix()
    store = create_store(postgres_url, table_prefix=prefix, migrate=True)
    try:
        await store.save([insert(make_instance())])
        assert await store.load("saga-1") == make_instance()
        assert drift(postgres_url, prefix) == []
    finally:
        await store.drop_tables()
        await store.close()


def test_the_drift_check_notices_a_schema_that_differs(url: str, prefix: str) -> None:
    upgrade(url, table_prefix=prefix)
    index = f"ix_{prefix}instances_status"
    inspect(url, lambda conn: (conn.execute(sa.text(f"DROP INDEX {index}")), conn.commit()))

    assert drift(url, prefix) == [f"add_index: {index}"]


def test_sagas_migrate_check_exits_1_naming_each_difference_and_0_when_none(
    url: str, prefix: str
) -> None:
    runner = CliRunner()
    check = ["migrate", "--url", url, "--table-prefix", prefix, "--check"]

    never_migrated = runner.invoke(app, check)
    assert never_migrated.exit_code == 1, never_migrated.output
    assert f"add_table: {prefix}instances" in never_migrated.output
    assert "difference(s)" in never_migrated.output
    assert not table_names(url, prefix)  # --check migrates nothing

    upgrade(url, table_prefix=prefix)
    matching = runner.invoke(app, check)
    assert matching.exit_code == 0, matching.output
    assert "match this version's schema" in matching.output

    column = f"ALTER TABLE {prefix}instances ADD COLUMN edited_by_hand TEXT"
    inspect(url, lambda conn: (conn.execute(sa.text(column)), conn.commit()))
    edited = runner.invoke(app, check)
    assert edited.exit_code == 1, edited.output
    assert "remove_column" in edited.output
    assert "edited_by_hand" in edited.output

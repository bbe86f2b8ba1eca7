"""The embedded default store, and the order sample surviving ``kill -9`` mid-batch.

``open_store()`` with no URL is a SQLite file created and migrated on first use. The sample
keeps its sagas there, so a run killed while sagas are in flight is finished by the next run:
every saga of the killed run ends as its scenario expects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sagas_abstractions import SagaStatus
from sagas_core import close_store, open_store
from sagas_core.embedded import DEFAULT_SQLITE_PATH, SQLITE_PATH_ENV
from sagas_core.testing import InMemorySagaStore
from sagas_sqlalchemy import SqlSagaStore, build_tables
from sagas_sqlalchemy.migrate import downgrade
from samples.order_processing.demo import scenarios
from tests.contracts.store_contract import insert, make_instance

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
ACTIVE = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


def sqlite_tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


# ---------------------------------------------------------------------- open_store


async def test_open_store_without_a_url_creates_and_migrates_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SQLITE_PATH_ENV, raising=False)

    store = await open_store()
    try:
        await store.save([insert(make_instance())])
    finally:
        await close_store(store)

    path = tmp_path / DEFAULT_SQLITE_PATH
    assert path == tmp_path / ".sagas" / "sagas.sqlite3"
    assert {"sagas_instances", "sagas_alembic_version"} <= sqlite_tables(path)
    reopened = await open_store()  # the second open finds the file and its data
    try:
        assert await reopened.load("saga-1") is not None
    finally:
        await close_store(reopened)


async def test_open_store_takes_the_file_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    configured = tmp_path / "from-env" / "state.sqlite3"
    monkeypatch.setenv(SQLITE_PATH_ENV, str(configured))

    await close_store(await open_store())

    assert "sagas_instances" in sqlite_tables(configured)
    assert not (tmp_path / ".sagas").exists()


async def test_an_explicit_sqlite_path_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SQLITE_PATH_ENV, str(tmp_path / "env.sqlite3"))
    chosen = tmp_path / "deep" / "er" / "chosen.sqlite3"

    await close_store(await open_store(sqlite_path=chosen))

    assert "sagas_instances" in sqlite_tables(chosen)
    assert not (tmp_path / "env.sqlite3").exists()


async def test_a_sqlite_url_is_migrated_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "by-url.db"

    store = await open_store(f"sqlite+aiosqlite:///{path}")
    await close_store(store)

    assert isinstance(store, SqlSagaStore)
    assert "sagas_instances" in sqlite_tables(path)


@pytest.mark.postgres
async def test_a_server_database_is_migrated_only_when_asked(postgres_url: str) -> None:
    prefix = f"sagas_t{uuid.uuid4().hex[:10]}_"
    tables = build_tables(prefix)

    async def present(store: SqlSagaStore) -> bool:
        async with store.engine.connect() as conn:
            names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        return tables.instances.name in names

    untouched = await open_store(postgres_url, table_prefix=prefix)
    try:
        assert isinstance(untouched, SqlSagaStore)
        assert not await present(untouched)
    finally:
        await close_store(untouched)
    migrated = await open_store(postgres_url, table_prefix=prefix, migrate=True)
    try:
        assert isinstance(migrated, SqlSagaStore)
        assert await present(migrated)
    finally:
        await close_store(migrated)
        downgrade(postgres_url, "base", table_prefix=prefix)
        engine = sa.create_engine(postgres_url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{tables.version_table}"'))
        finally:
            engine.dispose()


async def test_without_the_sql_extra_open_store_raises_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "sagas_sqlalchemy", None)

    with pytest.raises(ImportError, match=r"pip install 'sagas-orchestrator\[sqlalchemy\]'"):
        await open_store()


async def test_without_the_sql_extra_allow_memory_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "sagas_sqlalchemy", None)

    with caplog.at_level(logging.WARNING, logger="sagas.embedded"):
        store = await open_store(allow_memory=True)

    assert isinstance(store, InMemorySagaStore)
    assert "kept in memory" in caplog.text
    await close_store(store)


# ---------------------------------------------------------------------- the sample survives kill -9

SAMPLE = [sys.executable, "-m", "samples.order_processing"]
START_WITHIN = 30.0
RESUME_WITHIN = 60.0
POLL = 0.01


def sample_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "140", "NO_COLOR": "1"}


def saga_rows(path: Path) -> list[tuple[str, str, str]]:
    """(saga id, correlation id, status) of every saga in the file; [] while it is not ready."""
    if not path.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            conn.execute("PRAGMA busy_timeout = 1000")
            rows = conn.execute(
                "SELECT saga_id, correlation_id, status FROM sagas_instances"
            ).fetchall()
    except sqlite3.OperationalError:  # not migrated yet, or busy for a moment
        return []
    return [(str(a), str(b), str(c)) for a, b, c in rows]


@contextlib.contextmanager
def sample_process(db: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*SAMPLE, "--db", str(db)],
            cwd=db.parent,
            env=sample_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def kill_mid_batch(db: Path, log: Path) -> list[tuple[str, str, str]]:
    """Run the sample, ``kill -9`` it mid-batch: some sagas finished, some in flight."""
    with sample_process(db, log) as process:
        deadline = time.monotonic() + START_WITHIN
        for _ in range(int(START_WITHIN / POLL)):
            statuses = {status in ACTIVE for *_, status in saga_rows(db)}
            if statuses == {True, False}:
                process.send_signal(signal.SIGKILL)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the sample never had sagas in flight:\n{log.read_text()}")
            time.sleep(POLL)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
    return saga_rows(db)


@pytest.mark.slow
def test_the_sample_killed_mid_batch_finishes_its_sagas_on_the_next_run(tmp_path: Path) -> None:
    db = tmp_path / "demo.sqlite3"
    first = kill_mid_batch(db, tmp_path / "first.log")
    in_flight = [saga_id for saga_id, _, status in first if status in ACTIVE]
    assert in_flight

    began = time.monotonic()
    second = subprocess.run(
        [*SAMPLE, "--db", str(db)],
        cwd=tmp_path,
        env=sample_environment(),
        capture_output=True,
        text=True,
        timeout=RESUME_WITHIN,
        check=False,
    )
    took = time.monotonic() - began

    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert f"Resuming {len(in_flight)} saga(s) left active by a previous run." in output
    assert output.count("(resumed)") == len(in_flight)
    expected = {scenario.order.order_id: scenario.expected.value for scenario in scenarios()}
    final = {saga_id: (order, status) for saga_id, order, status in saga_rows(db)}
    for saga_id, order, _ in first:
        assert final[saga_id] == (order, expected[order]), output
    assert len(final) == len(first) + len(expected)  # the second run's own batch
    assert not [row for row in saga_rows(db) if row[2] in ACTIVE]
    assert took < RESUME_WITHIN

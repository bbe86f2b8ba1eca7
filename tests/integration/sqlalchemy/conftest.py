"""Fixtures of the SQL store's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa

from sagas_sqlalchemy import SqlSagaStore
from tests.integration.sqlalchemy.sql_support import sql_store, sqlite_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test runs on a fresh SQLite file and on the PostgreSQL test database."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield cast("str", request.getfixturevalue("postgres_url"))


@pytest.fixture
async def psycopg_store(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    """A store on fresh PostgreSQL tables through psycopg (the hot path with group commit)."""
    url = sa.make_url(postgres_url).set(drivername="postgresql+psycopg")
    async with sql_store(url.render_as_string(hide_password=False)) as store:
        yield store

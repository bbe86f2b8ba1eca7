"""Fixtures of the SQL store's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from tests.integration.sqlalchemy.sql_support import sqlite_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test runs on a fresh SQLite file and on the PostgreSQL test database."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield cast("str", request.getfixturevalue("postgres_url"))

"""``sagas prune`` deletes old inbox and published outbox rows, and only those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagas_core.cli import app

pytestmark = pytest.mark.integration


def test_prune_deletes_old_dedupe_and_published_rows_and_nothing_else(tmp_path: Path) -> None:
    database = tmp_path / "sagas.sqlite3"
    subprocess.run(
        [sys.executable, "-m", "samples.order_processing", "--db", str(database)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    url = f"sqlite+aiosqlite:///{database}"
    runner = CliRunner()

    kept = runner.invoke(app, ["prune", "--db", url, "--older-than", "7d"])
    pruned = runner.invoke(app, ["prune", "--db", url, "--older-than", "0s"])
    again = runner.invoke(app, ["prune", "--db", url, "--older-than", "0s"])
    listed = runner.invoke(app, ["list", "--db", url])

    assert kept.exit_code == 0, kept.output
    assert "pruned 0 inbox and 0 outbox" in kept.output
    assert pruned.exit_code == 0, pruned.output
    assert "pruned 0 inbox" not in pruned.output
    assert "pruned 0 inbox and 0 outbox" in again.output
    assert listed.exit_code == 0
    assert "sagas (8)" in listed.output  # the sagas themselves stay


def test_prune_refuses_a_duration_it_cannot_read(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.sqlite3'}"
    result = CliRunner().invoke(app, ["prune", "--db", url, "--older-than", "a week"])
    assert result.exit_code == 2
    assert "expected a duration" in result.output

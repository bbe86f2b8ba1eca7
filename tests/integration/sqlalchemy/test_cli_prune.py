"""``sagas prune`` deletes old inbox and published outbox rows; ``list``/``show --json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sagas_core.cli import app

pytestmark = pytest.mark.integration


def _demo_database(directory: Path) -> str:
    """The URL of a SQLite file the order sample ran its 8 orders in."""
    database = directory / "sagas.sqlite3"
    subprocess.run(
        [sys.executable, "-m", "samples.order_processing", "--db", str(database)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return f"sqlite+aiosqlite:///{database}"


def test_prune_deletes_old_dedupe_and_published_rows_and_nothing_else(tmp_path: Path) -> None:
    url = _demo_database(tmp_path)
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


def test_list_and_show_print_json_for_scripts(tmp_path: Path) -> None:
    url = _demo_database(tmp_path)
    runner = CliRunner()

    listed = runner.invoke(app, ["list", "--db", url, "--status", "compensated", "--json"])
    sagas = json.loads(listed.output)
    shown = runner.invoke(app, ["show", sagas[0]["saga_id"], "--db", url, "--json"])
    document = json.loads(shown.output)

    assert listed.exit_code == 0, listed.output
    assert len(sagas) == 5  # the demo's five compensated orders
    assert {saga["status"] for saga in sagas} == {"compensated"}
    assert shown.exit_code == 0, shown.output
    assert document["saga"]["saga_id"] == sagas[0]["saga_id"]
    assert document["history"][0]["input"] == "Start"
    assert document["history"][-1]["to_status"] == "compensated"
    # Reply tokens are secrets: kept with the steps, never printed.
    assert all("reply_token" not in step for saga in sagas for step in saga["steps"])
    assert all("reply_token" not in step for step in document["saga"]["steps"])

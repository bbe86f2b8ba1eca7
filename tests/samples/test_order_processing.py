"""The order-processing sample runs as ``python -m samples.order_processing`` (no CLI command)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sagas_core.cli import app
from samples.order_processing.__main__ import main


def test_the_order_sample_runs_in_memory_and_ends_as_expected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--memory"]) == 0
    assert "ended as expected" in capsys.readouterr().out


def test_the_cli_has_no_demo_command_the_core_would_have_to_import_the_samples_for() -> None:
    result = CliRunner().invoke(app, ["demo", "--memory"])
    assert result.exit_code != 0
    assert "No such command" in result.output

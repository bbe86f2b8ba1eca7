"""The host wires settings into the runtime; settings fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from sagas_core import SagaBuilder, SagaHost, SettingsError, load_settings


class Data(BaseModel):
    n: int = 0


async def noop(data: Data) -> None:
    return None


saga = SagaBuilder("host-demo", data=Data).step("only").run(noop).build()


async def test_a_host_runs_without_a_breaker_unless_the_settings_ask_for_one() -> None:
    async with SagaHost.builder().use_memory().add_saga(saga).build() as host:
        assert host.runtime.orchestrator.breaker is None
        done = await host.wait_for((await host.start_saga(saga, Data())).saga_id, timeout=5)
        assert done.status.value == "completed"


async def test_circuit_settings_give_the_orchestrator_a_breaker() -> None:
    host = (
        SagaHost.builder()
        .use_memory()
        .configure(circuit_failures=2, circuit_open_seconds=5)
        .add_saga(saga)
        .build()
    )
    async with host:
        breaker = host.runtime.orchestrator.breaker
        assert breaker is not None
        assert breaker.failure_threshold == 2
        assert breaker.open_for.total_seconds() == 5


def test_a_zero_circuit_threshold_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGAS_CIRCUIT_FAILURES", "0")
    with pytest.raises(SettingsError, match="SAGAS_CIRCUIT_FAILURES"):
        load_settings()


def test_settings_never_show_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAS_AMQP_URL", "amqp://app:hunter2@127.0.0.1:5672/")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.describe())


def test_a_host_without_sagas_or_participants_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one saga"):
        SagaHost.builder().use_memory().build()


def test_cli_errors_keep_the_bracketed_saga_context_rich_would_take_for_markup() -> None:
    from sagas_core import cli  # noqa: PLC0415 - the CLI module only here

    with cli.errors.capture() as captured:
        cli._fail("cannot resolve a running saga [saga='shop', id='o-7']")
    assert "[saga='shop', id='o-7']" in captured.get()


def test_console_script_targets_resolve_from_the_current_directory(tmp_path: Path) -> None:
    # A console script (unlike `python -m`) has no current directory on its import path.
    (tmp_path / "shop.py").write_text("from sagas_core import Participant\np = Participant('x')\n")
    script = Path(sys.executable).with_name("sagas")

    missing = subprocess.run(
        [str(script), "participant", "shop:nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    nowhere = subprocess.run(
        [str(script), "participant", "nomodule:p"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert missing.returncode == 2
    assert "'shop' has no attribute 'nope'" in missing.stderr  # shop.py itself was imported
    assert nowhere.returncode == 2
    assert "cannot import 'nomodule'" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr


def test_the_status_events_setting_is_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGAS_STATUS_EVENTS", "some")
    with pytest.raises(SettingsError, match="SAGAS_STATUS_EVENTS"):
        load_settings()
    monkeypatch.setenv("SAGAS_STATUS_EVENTS", "lifecycle")
    assert load_settings().status_events == "lifecycle"


def test_the_idle_timeout_interval_setting_is_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().timeout_idle_interval == 1.0
    monkeypatch.setenv("SAGAS_TIMEOUT_INTERVAL", "0.5")
    monkeypatch.setenv("SAGAS_TIMEOUT_IDLE_INTERVAL", "0.2")
    with pytest.raises(SettingsError, match=r"SAGAS_TIMEOUT_IDLE_INTERVAL.*SAGAS_TIMEOUT_INTERVAL"):
        load_settings()
    monkeypatch.setenv("SAGAS_TIMEOUT_IDLE_INTERVAL", "none")
    assert load_settings().timeout_idle_interval is None
    monkeypatch.setenv("SAGAS_TIMEOUT_IDLE_INTERVAL", "5")
    assert load_settings().timeout_idle_interval == 5.0

"""The core finds transports and stores by entry point or registration, never by importing them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from sagas_core import SagaBuilder, SagaHost, open_store
from sagas_core.cli import app
from sagas_core.memory import InMemoryBus, InMemorySagaStore
from sagas_core.plugins import (
    STORES_GROUP,
    TRANSPORTS_GROUP,
    PluginNotFound,
    StorePlugin,
    TransportPlugin,
    register_store,
    register_transport,
    store_for,
    transport_for,
    transport_named,
    unregister_store,
    unregister_transport,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from sagas_abstractions import MessageBus, SagaRepository
    from sagas_core.settings import SagasSettings

ROOT = Path(__file__).resolve().parents[2]


class Data(BaseModel):
    n: int = 0


async def noop(data: Data) -> None:
    return None


saga = SagaBuilder("plugin-demo", data=Data).step("only").run(noop).build()


class FakeTransport:
    def __init__(self, name: str = "fake", schemes: frozenset[str] = frozenset({"amqp"})) -> None:
        self.name = name
        self.schemes = schemes
        self.connected: list[tuple[str, SagasSettings]] = []
        self.runs: list[list[str]] = []
        self.bus = InMemoryBus()

    async def connect(self, url: str, settings: SagasSettings) -> MessageBus:
        self.connected.append((url, settings))
        return self.bus

    def run_participants(self, argv: Sequence[str]) -> int:
        self.runs.append(list(argv))
        return 7


class FakeStore:
    def __init__(self, schemes: frozenset[str] = frozenset({"fake"})) -> None:
        self.name = "fake-store"
        self.schemes = schemes
        self.opened: list[tuple[str, bool | None, dict[str, Any]]] = []
        self.upgrades: list[tuple[str, str, str]] = []

    async def open_store(
        self, url: str, *, migrate: bool | None = None, **options: Any
    ) -> SagaRepository:
        self.opened.append((url, migrate, options))
        return InMemorySagaStore()

    def upgrade(self, url: str, revision: str, *, table_prefix: str) -> None:
        self.upgrades.append((url, revision, table_prefix))


@pytest.fixture
def transport() -> Iterator[FakeTransport]:
    plugin = FakeTransport()
    register_transport(plugin)
    yield plugin
    unregister_transport(plugin)


@pytest.fixture
def store() -> Iterator[FakeStore]:
    plugin = FakeStore()
    register_store(plugin)
    yield plugin
    unregister_store(plugin)


def test_the_fakes_are_plugins() -> None:
    assert isinstance(FakeTransport(), TransportPlugin)
    assert isinstance(FakeStore(), StorePlugin)


def test_the_installed_distribution_declares_the_rabbitmq_and_sql_adapters() -> None:
    assert transport_for("amqps://broker/").name == "rabbitmq"
    assert {"amqp", "amqps"} <= set(transport_named("rabbitmq").schemes)
    for url in ("postgresql+psycopg://db/app", "postgresql+asyncpg://db/app", "sqlite:///x.db"):
        assert store_for(url).name == "sqlalchemy", url
    assert {TRANSPORTS_GROUP, STORES_GROUP} == {"sagas.transports", "sagas.stores"}


def test_a_registered_transport_comes_before_the_installed_one(transport: FakeTransport) -> None:
    assert transport_for("amqp://broker/") is transport
    assert transport_named("fake") is transport


async def test_the_host_connects_the_bus_through_the_transport_for_the_url_scheme(
    transport: FakeTransport,
) -> None:
    host = (
        SagaHost.builder()
        .use_memory()
        .configure(amqp_url="amqp://guest:guest@broker:5672/", rabbitmq_prefix="shop")
        .add_saga(saga)
        .build()
    )
    async with host:
        assert host.runtime.bus is transport.bus
        done = await host.wait_for((await host.start_saga(saga, Data())).saga_id, timeout=5)
        assert done.status.value == "completed"
    [(url, settings)] = transport.connected
    assert url == "amqp://guest:guest@broker:5672/"
    assert settings.rabbitmq_prefix == "shop"


async def test_without_the_transport_the_host_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "sagas_rabbitmq", None)  # as if aio-pika were missing
    with pytest.raises(PluginNotFound) as missing:
        transport_for("amqp://broker/")
    assert missing.value.not_installed
    assert missing.value.load_errors

    host = SagaHost.builder().use_memory().configure(amqp_url="amqp://broker/").add_saga(saga)
    with pytest.raises(
        ImportError, match=r"transport is missing: pip install 'sagas-orchestrator\[rabbitmq\]'"
    ):
        await host.build().start()


async def test_open_store_uses_the_store_for_the_url_scheme(store: FakeStore) -> None:
    opened = await open_store("fake://somewhere/db", migrate=True, table_prefix="t_")
    assert isinstance(opened, InMemorySagaStore)
    assert store.opened == [("fake://somewhere/db", True, {"table_prefix": "t_"})]


async def test_the_embedded_file_is_opened_by_the_store_that_serves_sqlite(
    tmp_path: Path,
) -> None:
    plugin = FakeStore(schemes=frozenset({"sqlite"}))
    register_store(plugin)
    try:
        await open_store(sqlite_path=tmp_path / "state" / "s.db")
    finally:
        unregister_store(plugin)
    [(url, migrate, _)] = plugin.opened
    assert url == f"sqlite+aiosqlite:///{tmp_path / 'state' / 's.db'}"
    assert migrate is None
    assert (tmp_path / "state").is_dir()


async def test_a_url_no_installed_store_serves_is_named_not_blamed_on_a_missing_extra() -> None:
    with pytest.raises(PluginNotFound, match=r"no store serves 'mongodb://'.*sqlalchemy") as err:
        await open_store("mongodb://db/app")
    assert not err.value.not_installed


def test_an_unknown_transport_name_says_how_to_get_one() -> None:
    with pytest.raises(PluginNotFound, match=r"no transport for 'nats' is installed or registered"):
        transport_named("nats")


def test_registering_something_that_is_not_a_plugin_is_refused() -> None:
    with pytest.raises(TypeError, match="not a TransportPlugin"):
        register_transport(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a StorePlugin"):
        register_store(FakeTransport())  # type: ignore[arg-type]


def test_sagas_participant_runs_the_named_transport_with_the_target_and_its_options(
    transport: FakeTransport,
) -> None:
    result = CliRunner().invoke(
        app, ["participant", "shop:inventory", "--transport", "fake", "--prefix", "shop"]
    )
    assert result.exit_code == 7, result.output
    assert transport.runs == [["shop:inventory", "--prefix", "shop"]]


def test_sagas_participant_with_an_unknown_transport_fails_clearly() -> None:
    result = CliRunner().invoke(app, ["participant", "shop:inventory", "--transport", "nats"])
    assert result.exit_code == 2
    assert "no transport for 'nats'" in result.output


def test_sagas_migrate_upgrades_through_the_store_for_the_url(store: FakeStore) -> None:
    result = CliRunner().invoke(
        app, ["migrate", "--url", "fake://db/app", "--revision", "0001", "--table-prefix", "x_"]
    )
    assert result.exit_code == 0, result.output
    assert "sagas tables migrated to 0001" in result.output
    assert store.upgrades == [("fake://db/app", "0001", "x_")]


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (
            ["migrate", "--url", "sqlite+aiosqlite:///x.db"],
            "pip install 'sagas-orchestrator[sqlalchemy]'",
        ),
        (["participant", "shop:inventory"], "pip install 'sagas-orchestrator[rabbitmq]'"),
    ],
    ids=["migrate", "participant"],
)
def test_a_missing_extra_is_reported_with_the_adapters_own_install_hint(
    argv: list[str], hint: str
) -> None:
    code = (
        "import sys\n"
        "for name in ('sqlalchemy', 'aio_pika'):\n    sys.modules[name] = None\n"
        "from sagas_core.cli import main\n"
        f"sys.argv = ['sagas', *{argv!r}]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert hint in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr

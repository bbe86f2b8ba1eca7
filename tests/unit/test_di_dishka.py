"""The dishka adapter: APP scope for singletons, a REQUEST scope per handled command."""

# No ``from __future__ import annotations``: FastAPI and dishka read the annotations at runtime.

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import fastapi
import httpx
import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ReplyMessage,
    ReplyStatus,
    SagaStatus,
    StepKind,
)
from sagas_core import MissingDependency, Participant, SagaBuilder, SagaHost, SagaRuntime
from sagas_core.codec import decode_reply, encode_command
from sagas_core.di import ScopedResolver
from sagas_core.testing import InMemoryBus

dishka = pytest.importorskip("dishka")

from dishka import AsyncContainer, Provider, Scope, make_async_container, provide  # noqa: E402

from sagas_core.integrations.dishka import INSTALL_DISHKA, DishkaResolver  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AT = datetime(2030, 1, 1, tzinfo=UTC)
WAIT = 5.0


class Reserve(BaseModel):
    sku: str


class Catalog:
    """An APP-scoped singleton."""


class Session:
    """A REQUEST-scoped resource."""

    def __init__(self, number: int, catalog: Catalog) -> None:
        self.number = number
        self.catalog = catalog


class Unprovided:
    """Nothing provides this."""


class AppProvider(Provider):
    """APP and REQUEST providers that record what they do."""

    def __init__(self, *, fail_close: Exception | None = None) -> None:
        super().__init__()
        self.log: list[str] = []
        self.opened = 0
        self.fail_close = fail_close

    catalog = provide(Catalog, scope=Scope.APP)

    @provide(scope=Scope.REQUEST)
    async def session(self, catalog: Catalog) -> AsyncIterator[Session]:
        self.opened += 1
        session = Session(self.opened, catalog)
        self.log.append(f"open {session.number}")
        yield session
        self.log.append(f"close {session.number}")
        if self.fail_close is not None:
            raise self.fail_close


def command(saga_id: str = "saga-1") -> Envelope:
    return encode_command(
        CommandMessage(
            message_id=f"{saga_id}:reserve:execute:1",
            saga_id=saga_id,
            saga_type="order",
            step="reserve",
            attempt=1,
            kind=StepKind.EXECUTE,
            command_type="Reserve",
            destination="inventory",
            payload={"sku": "A-1"},
            idempotency_key=f"{saga_id}:reserve",
            reply_to="sagas.replies.test",
            created_at=AT,
        )
    )


async def reply_of(participant: Participant, envelope: Envelope) -> ReplyMessage:
    answered = await participant.process(envelope)
    assert answered is not None
    return decode_reply(answered)


@pytest.fixture
async def provider() -> AppProvider:
    return AppProvider()


@pytest.fixture
async def container(provider: AppProvider) -> AsyncIterator[AsyncContainer]:
    container = make_async_container(provider)
    yield container
    await container.close()


def test_the_dishka_resolver_is_a_scoped_resolver(container: AsyncContainer) -> None:
    assert isinstance(DishkaResolver(container), ScopedResolver)


async def test_handlers_get_app_singletons_and_a_request_scope_finalized_per_command(
    provider: AppProvider, container: AsyncContainer
) -> None:
    participant = Participant("inventory", dependencies=DishkaResolver(container))
    seen: list[tuple[Catalog, int]] = []

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, catalog: Catalog, session: Session) -> None:
        assert session.catalog is catalog
        seen.append((catalog, session.number))
        provider.log.append(f"handle {session.number}")

    await participant.process(command("saga-1"))
    await participant.process(command("saga-2"))

    assert [number for _, number in seen] == [1, 2]
    assert seen[0][0] is seen[1][0]
    assert provider.log == ["open 1", "handle 1", "close 1", "open 2", "handle 2", "close 2"]


async def test_the_request_scope_is_finalized_when_the_handler_raises(
    provider: AppProvider, container: AsyncContainer
) -> None:
    participant = Participant("inventory", dependencies=DishkaResolver(container))

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Session) -> None:
        raise RuntimeError("out of stock")

    reply = await reply_of(participant, command())

    assert reply.status is ReplyStatus.FAILED
    assert provider.log == ["open 1", "close 1"]


async def test_a_transient_error_in_a_request_finalizer_makes_the_command_retryable() -> None:
    provider = AppProvider(fail_close=ConnectionError("database went away"))
    container = make_async_container(provider)
    participant = Participant("inventory", dependencies=DishkaResolver(container))

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Session) -> None:
        return None

    try:
        reply = await reply_of(participant, command())
    finally:
        await container.close()

    assert reply.error is not None
    assert reply.error.retryable
    assert "ConnectionError: database went away" in reply.error.message


async def test_attaching_with_a_type_the_container_lacks_fails_naming_type_and_handler(
    provider: AppProvider, container: AsyncContainer
) -> None:
    participant = Participant("inventory", dependencies=DishkaResolver(container))
    bus = InMemoryBus()

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Session, missing: Unprovided) -> None:
        return None

    with pytest.raises(MissingDependency, match=r"handler .*reserve needs Unprovided"):
        await participant.attach(bus)

    assert provider.opened == 0  # checking created no REQUEST-scoped instance
    await bus.close()


class OrderData(BaseModel):
    order_id: str
    sessions: list[int] = []


async def record_session(order: OrderData, session: Session, catalog: Catalog) -> dict[str, object]:
    assert session.catalog is catalog
    return {"sessions": [*order.sessions, session.number]}


async def test_local_steps_get_dishka_dependencies_with_a_request_scope_per_command(
    provider: AppProvider, container: AsyncContainer
) -> None:
    saga = (
        SagaBuilder("dishka-order", data=OrderData)
        .step("first")
        .run(record_session)
        .step("second")
        .run(record_session)
        .build()
    )
    async with SagaRuntime(sagas=[saga], dependencies=DishkaResolver(container)) as runtime:
        started = await runtime.start_saga(saga, OrderData(order_id="o-1"), saga_id="saga-1")
        done = await runtime.wait_for(started.saga_id, timeout=WAIT)

    assert done.status is SagaStatus.COMPLETED
    assert done.data["sessions"] == [1, 2]
    assert provider.log == ["open 1", "close 1", "open 2", "close 2"]


# ---------------------------------------------------------------------- FastAPI, one container


async def test_a_fastapi_app_and_the_host_share_one_dishka_container(
    provider: AppProvider, container: AsyncContainer
) -> None:
    from dishka.integrations.fastapi import DishkaRoute, FromDishka, setup_dishka  # noqa: PLC0415

    saga = SagaBuilder("dishka-order", data=OrderData).step("first").run(record_session).build()
    host = (
        SagaHost.builder()
        .use_memory()
        .add_saga(saga)
        .use_dependencies(DishkaResolver(container))
        .build()
    )
    app = fastapi.FastAPI()
    router = fastapi.APIRouter(route_class=DishkaRoute)
    catalogs: list[Catalog] = []

    @router.post("/orders/{order_id}")
    async def place(order_id: str, catalog: FromDishka[Catalog]) -> dict[str, object]:
        catalogs.append(catalog)
        started = await host.start_saga(saga, OrderData(order_id=order_id))
        done = await host.wait_for(started.saga_id, timeout=WAIT)
        return {"status": done.status.value, "sessions": done.data["sessions"]}

    app.include_router(router)
    setup_dishka(container, app)

    async with host:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/orders/o-1")

    assert response.status_code == 200
    assert response.json() == {"status": "completed", "sessions": [1]}
    assert catalogs == [await container.get(Catalog)]  # the web route and the step share it


# ---------------------------------------------------------------------- optional dependency


def test_importing_sagas_core_and_the_adapter_module_does_not_import_dishka() -> None:
    code = (
        "import json, sys, sagas_core, sagas_core.integrations.dishka\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'dishka')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_adapter_says_how_to_install_dishka_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, container: AsyncContainer
) -> None:
    for name in [m for m in sys.modules if m == "dishka" or m.startswith("dishka.")]:
        monkeypatch.setitem(sys.modules, name, None)

    with pytest.raises(ImportError, match=r"pip install 'sagas-orchestrator\[dishka\]'"):
        DishkaResolver(container)
    assert "sagas-orchestrator[dishka]" in INSTALL_DISHKA

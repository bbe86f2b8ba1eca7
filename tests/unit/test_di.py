"""Dependency injection: singletons, per-message scopes and their finalizers, checks at attach."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ReplyMessage,
    ReplyStatus,
    RetryableError,
    SagaStatus,
    StepKind,
)
from sagas_core import (
    CommandContext,
    Dependencies,
    MissingDependency,
    Participant,
    SagaBuilder,
    SagaHost,
    SagaRuntime,
)
from sagas_core.codec import decode_reply, encode_command
from sagas_core.di import MessageScope, ScopedResolver
from sagas_core.testing import InMemoryBus

T = TypeVar("T")
AT = datetime(2030, 1, 1, tzinfo=UTC)
WAIT = 5.0


class Reserve(BaseModel):
    sku: str


class Stock:
    """A singleton service."""

    made = 0

    def __init__(self) -> None:
        Stock.made += 1


class Session:
    """A per-message resource that records its life."""

    def __init__(self, log: list[str], name: str = "session") -> None:
        self.log = log
        self.name = name
        log.append(f"open {name}")

    def close(self) -> None:
        self.log.append(f"close {self.name}")


class AsyncSession(Session):
    async def aclose(self) -> None:
        self.log.append(f"aclose {self.name}")


class Other(Session):
    """A second per-message resource."""


def command(saga_id: str = "saga-1", *, step: str = "reserve") -> Envelope:
    return encode_command(
        CommandMessage(
            message_id=f"{saga_id}:{step}:execute:1",
            saga_id=saga_id,
            saga_type="order",
            step=step,
            attempt=1,
            kind=StepKind.EXECUTE,
            command_type="Reserve",
            destination="inventory",
            payload={"sku": "A-1"},
            idempotency_key=f"{saga_id}:{step}",
            reply_to="sagas.replies.test",
            created_at=AT,
        )
    )


async def reply_of(participant: Participant, envelope: Envelope) -> ReplyMessage:
    answered = await participant.process(envelope)
    assert answered is not None
    return decode_reply(answered)


# ---------------------------------------------------------------------- lifetimes


async def test_a_singleton_factory_is_called_once_across_messages() -> None:
    Stock.made = 0
    dependencies = Dependencies().provide(Stock, factory=Stock)
    participant = Participant("inventory", dependencies=dependencies)
    seen: list[Stock] = []

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, stock: Stock) -> None:
        seen.append(stock)

    for saga_id in ("saga-1", "saga-2", "saga-3"):
        await participant.process(command(saga_id))

    assert Stock.made == 1
    assert len({id(stock) for stock in seen}) == 1


async def test_a_message_scoped_factory_is_called_per_command_and_closed_after_it() -> None:
    log: list[str] = []
    dependencies = Dependencies().provide(Session, factory=lambda: Session(log), scope="message")
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, first: Session, again: Session) -> None:
        assert first is again  # one instance per message, however often it is asked for
        log.append(f"handle {cmd.sku}")

    await participant.process(command("saga-1"))
    await participant.process(command("saga-2"))

    assert log == ["open session", "handle A-1", "close session"] * 2


async def test_a_message_scoped_instance_is_closed_even_when_the_handler_raises() -> None:
    log: list[str] = []
    dependencies = Dependencies().provide(
        AsyncSession, factory=lambda: AsyncSession(log), scope="message"
    )
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: AsyncSession) -> None:
        raise RuntimeError("out of stock")

    reply = await reply_of(participant, command())

    assert reply.status is ReplyStatus.FAILED
    assert reply.error is not None
    assert reply.error.message == "RuntimeError: out of stock"
    assert log == ["open session", "aclose session"]  # aclose() is preferred over close()


async def test_an_async_factory_is_awaited_and_its_instance_finalized() -> None:
    log: list[str] = []

    async def open_session() -> AsyncSession:
        return AsyncSession(log)

    dependencies = Dependencies().provide(AsyncSession, factory=open_session, scope="message")
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: AsyncSession) -> None:
        assert isinstance(session, AsyncSession)
        log.append("handle")

    await participant.process(command())

    assert log == ["open session", "handle", "aclose session"]


async def test_an_async_generator_factory_commits_after_success_and_rolls_back_on_error() -> None:
    log: list[str] = []

    async def unit_of_work() -> AsyncIterator[Session]:
        session = Session(log, "uow")
        try:
            yield session
        except Exception as exc:
            log.append(f"rollback after {type(exc).__name__}")
            raise
        else:
            log.append("commit")
        finally:
            log.append("end")

    dependencies = Dependencies().provide(Session, factory=unit_of_work, scope="message")
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Session, context: CommandContext) -> None:
        if context.saga_id == "saga-bad":
            raise ValueError("bad sku")

    good = await reply_of(participant, command("saga-good"))
    bad = await reply_of(participant, command("saga-bad"))

    assert (good.status, bad.status) == (ReplyStatus.SUCCEEDED, ReplyStatus.FAILED)
    # The generator owns the instance: its close() is not called on top.
    assert log == ["open uow", "commit", "end", "open uow", "rollback after ValueError", "end"]


async def test_a_sync_generator_factory_is_finalized_after_each_command() -> None:
    log: list[str] = []

    def session() -> Iterator[Session]:
        yield Session(log)
        log.append("finalized")

    dependencies = Dependencies().provide(Session, factory=session, scope="message")
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Session) -> None:
        log.append("handle")

    await participant.process(command("saga-1"))
    await participant.process(command("saga-2"))

    assert log == ["open session", "handle", "finalized"] * 2


async def test_message_scoped_instances_are_finalized_in_reverse_order_of_creation() -> None:
    log: list[str] = []
    dependencies = (
        Dependencies()
        .provide(Session, factory=lambda: Session(log, "first"), scope="message")
        .provide(Other, factory=lambda: Other(log, "second"), scope="message")
    )
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, first: Session, second: Other) -> None:
        return None

    await participant.process(command())

    assert log == ["open first", "open second", "close second", "close first"]


# ---------------------------------------------------------------------- finalizer errors


class BrokenSession(Session):
    error: Exception = RuntimeError("commit failed")

    def close(self) -> None:
        super().close()
        raise self.error


async def test_a_finalizer_error_after_success_fails_the_command_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    dependencies = Dependencies().provide(
        BrokenSession, factory=lambda: BrokenSession(log), scope="message"
    )
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: BrokenSession) -> dict[str, str]:
        return {"reservation_id": "r-1"}

    with caplog.at_level(logging.ERROR, logger="sagas.participant"):
        reply = await reply_of(participant, command())

    assert reply.status is ReplyStatus.FAILED
    assert reply.error is not None
    assert reply.error.message == "finalizing dependencies failed: RuntimeError: commit failed"
    assert not reply.error.retryable
    assert "succeeded but finalizing its dependencies failed" in caplog.text
    assert log == ["open session", "close session"]


@pytest.mark.parametrize(
    "error", [ConnectionError("lost"), RetryableError("busy")], ids=["transient", "retryable"]
)
async def test_a_transient_finalizer_error_makes_the_command_retryable(error: Exception) -> None:
    Flaky.error = error
    dependencies = Dependencies().provide(Flaky, factory=lambda: Flaky([]), scope="message")
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Flaky) -> None:
        return None

    reply = await reply_of(participant, command())

    assert reply.status is ReplyStatus.FAILED
    assert reply.error is not None
    assert reply.error.retryable


async def test_a_finalizer_error_after_a_handler_error_is_logged_and_the_handler_error_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dependencies = Dependencies().provide(
        BrokenSession, factory=lambda: BrokenSession([]), scope="message"
    )
    participant = Participant("inventory", dependencies=dependencies)

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: BrokenSession) -> None:
        raise RetryableError("inventory locked")

    with caplog.at_level(logging.ERROR, logger="sagas.participant"):
        reply = await reply_of(participant, command())

    assert reply.error is not None
    assert (reply.error.message, reply.error.retryable) == ("inventory locked", True)
    assert "finalizing the dependencies of Reserve failed after the handler failed" in caplog.text


class Flaky(BrokenSession):
    """Fails to close with whatever error the test sets."""


# ---------------------------------------------------------------------- checks at attach


async def test_attaching_with_a_missing_dependency_fails_naming_the_type_and_the_handler() -> None:
    participant = Participant("inventory")
    bus = InMemoryBus()

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, stock: Stock) -> None:
        return None

    with pytest.raises(MissingDependency, match=r"handler .*reserve needs Stock") as raised:
        await participant.attach(bus)

    assert "nothing provides Stock" in str(raised.value)
    await bus.close()


async def test_checking_dependencies_at_attach_creates_no_message_scoped_instance() -> None:
    log: list[str] = []
    dependencies = Dependencies().provide(Session, factory=lambda: Session(log), scope="message")
    participant = Participant("inventory", dependencies=dependencies)
    bus = InMemoryBus()

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, session: Session) -> None:
        return None

    subscription = await participant.attach(bus)

    assert log == []
    await subscription.close()
    await bus.close()


def test_a_message_scoped_dependency_cannot_be_resolved_outside_a_message() -> None:
    dependencies = Dependencies().provide(Session, factory=lambda: Session([]), scope="message")

    with pytest.raises(MissingDependency, match=r"Session is message-scoped"):
        dependencies.resolve(Session)


def test_provide_refuses_a_message_scoped_instance_and_an_async_singleton_factory() -> None:
    async def make() -> Stock:
        return Stock()

    with pytest.raises(ValueError, match=r"an instance is a singleton"):
        Dependencies().provide(Stock, Stock(), scope="message")
    with pytest.raises(TypeError, match=r"singleton factory must be a plain function"):
        Dependencies().provide(Stock, factory=make)
    with pytest.raises(ValueError, match=r"scope must be"):
        Dependencies().provide(Stock, factory=Stock, scope="request")  # type: ignore[arg-type]


def test_the_built_in_dependencies_are_a_scoped_resolver() -> None:
    assert isinstance(Dependencies(), ScopedResolver)


# ---------------------------------------------------------------------- other resolvers


class PlainResolver:
    """A resolver from before scopes existed: one resolve() method."""

    def __init__(self, stock: Stock) -> None:
        self.stock = stock

    def resolve(self, dependency: type[T]) -> T:
        if dependency is Stock:
            return self.stock  # type: ignore[return-value]
        raise MissingDependency(f"nothing provides {dependency.__name__}")


class AsyncContainerResolver(PlainResolver):
    """An async container without scopes: resolve() hands back an awaitable."""

    def resolve(self, dependency: type[T]) -> Any:
        async def get() -> T:
            return super(AsyncContainerResolver, self).resolve(dependency)

        return get()


@pytest.mark.parametrize("resolver_type", [PlainResolver, AsyncContainerResolver])
async def test_a_resolver_without_scopes_still_injects_and_async_results_are_awaited(
    resolver_type: type[PlainResolver],
) -> None:
    stock = Stock()
    participant = Participant("inventory", dependencies=resolver_type(stock))
    bus = InMemoryBus()
    seen: list[Stock] = []

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, injected: Stock) -> None:
        seen.append(injected)

    subscription = await participant.attach(bus)  # the check closes an unawaited coroutine
    await participant.process(command())

    assert seen == [stock]
    await subscription.close()
    await bus.close()


class Pending(Awaitable[int]):
    """A dependency that is awaitable itself (a future-like handle)."""

    def __await__(self) -> Any:
        raise AssertionError("must not be awaited")


async def test_an_injected_dependency_that_is_itself_awaitable_is_not_awaited() -> None:
    pending = Pending()
    participant = Participant("inventory", dependencies=Dependencies().provide(Pending, pending))
    seen: list[Pending] = []

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve, value: Pending) -> None:
        seen.append(value)

    await participant.process(command())

    assert seen == [pending]


# ---------------------------------------------------------------------- local steps, the host


class OrderData(BaseModel):
    order_id: str
    sessions: list[str] = []


async def test_local_steps_get_a_fresh_message_scoped_dependency_per_command() -> None:
    log: list[str] = []
    opened = iter(range(1, 100))

    def session() -> Session:
        return Session(log, f"s{next(opened)}")

    async def first(order: OrderData, session: Session) -> dict[str, list[str]]:
        return {"sessions": [*order.sessions, session.name]}

    async def second(order: OrderData, session: Session, stock: Stock) -> dict[str, list[str]]:
        return {"sessions": [*order.sessions, session.name]}

    saga = (
        SagaBuilder("scoped", data=OrderData)
        .step("first")
        .run(first)
        .step("second")
        .run(second)
        .build()
    )
    dependencies = (
        Dependencies().provide(Session, factory=session, scope="message").provide(Stock, Stock())
    )
    async with SagaRuntime(sagas=[saga], dependencies=dependencies) as runtime:
        started = await runtime.start_saga(saga, OrderData(order_id="o-1"), saga_id="saga-1")
        done = await runtime.wait_for(started.saga_id, timeout=WAIT)

    assert done.status is SagaStatus.COMPLETED
    assert done.data["sessions"] == ["s1", "s2"]
    assert log == ["open s1", "close s1", "open s2", "close s2"]


def test_the_host_builder_provides_message_scoped_dependencies_or_takes_a_resolver() -> None:
    saga = SagaBuilder("noop", data=OrderData).step("only").run(_noop).build()
    built = (
        SagaHost.builder()
        .use_memory()
        .add_saga(saga)
        .provide(Session, factory=lambda: Session([]), scope="message")
        .build()
    )
    assert isinstance(built.dependencies, Dependencies)
    assert Session in built.dependencies

    resolver = PlainResolver(Stock())
    builder = SagaHost.builder().use_memory().add_saga(saga).use_dependencies(resolver)
    assert builder.build().dependencies is resolver
    with pytest.raises(TypeError, match=r"register the dependency in that container"):
        builder.provide(Stock, Stock())


async def _noop(order: OrderData) -> None:
    return None


def test_message_scope_is_a_public_protocol() -> None:
    scope: type[Any] = MessageScope
    assert scope.__name__ == "MessageScope"

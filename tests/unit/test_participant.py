"""The participant side: parsing, deduplication, ordering, error mapping and injection."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ParticipantError,
    ReplyMessage,
    ReplyStatus,
    RetryableError,
    RouteKind,
    StepKind,
)
from sagas_core import (
    CommandContext,
    Dependencies,
    MissingDependency,
    Participant,
    SagaBuilder,
    SagaRuntime,
)
from sagas_core.codec import HEADER_REASON, HEADER_STEP, decode_reply, encode_command
from sagas_core.testing import FakeClock, InMemoryBus

AT = datetime(2030, 1, 1, tzinfo=UTC)
REPLY_QUEUE = "sagas.replies.test"


class ReserveInventory(BaseModel):
    sku: str
    qty: int


class ReleaseInventory(BaseModel):
    sku: str


class Reserved(BaseModel):
    reservation_id: str


class StockService:
    def __init__(self) -> None:
        self.reserved: list[str] = []

    async def reserve(self, sku: str) -> str:
        self.reserved.append(sku)
        return f"r-{len(self.reserved)}"


def command_envelope(
    command_type: str = "ReserveInventory",
    *,
    payload: dict[str, Any] | None = None,
    kind: StepKind = StepKind.EXECUTE,
    attempt: int = 1,
    step: str = "reserve",
    saga_id: str = "saga-1",
    reply_to: str | None = REPLY_QUEUE,
) -> Envelope:
    suffix = ":compensate" if kind is StepKind.COMPENSATE else ""
    return encode_command(
        CommandMessage(
            message_id=f"{saga_id}:{step}:{kind.value}:{attempt}",
            saga_id=saga_id,
            saga_type="order",
            step=step,
            attempt=attempt,
            kind=kind,
            command_type=command_type,
            destination="inventory",
            payload={"sku": "A-1", "qty": 2} if payload is None else payload,
            idempotency_key=f"{saga_id}:{step}{suffix}",
            reply_to=reply_to,
            created_at=AT,
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
    )


async def reply_of(participant: Participant, envelope: Envelope) -> ReplyMessage:
    answered = await participant.process(envelope)
    assert answered is not None
    assert (answered.route, answered.key) == (RouteKind.REPLY, REPLY_QUEUE)
    return decode_reply(answered)


def inventory(**kwargs: Any) -> Participant:
    return Participant("inventory", clock=FakeClock(AT), **kwargs)


# ---------------------------------------------------------------------- parsing and routing


async def test_a_successful_handler_replies_with_its_returned_model() -> None:
    participant = inventory()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> Reserved:
        return Reserved(reservation_id=f"r-{cmd.sku}-{cmd.qty}")

    reply = await reply_of(participant, command_envelope())

    assert reply.status is ReplyStatus.SUCCEEDED
    assert reply.data == {"reservation_id": "r-A-1-2"}
    assert (reply.saga_id, reply.step, reply.attempt, reply.kind) == (
        "saga-1",
        "reserve",
        1,
        StepKind.EXECUTE,
    )
    assert reply.message_id == "saga-1:reserve:execute:1:reply"
    assert reply.in_reply_to == "saga-1:reserve:execute:1"


@pytest.mark.parametrize(
    ("returned", "data"),
    [(None, {}), ({"when": AT}, {"when": "2030-01-01T00:00:00Z"})],
)
async def test_a_handler_may_return_a_mapping_or_none(
    returned: dict[str, Any] | None, data: dict[str, Any]
) -> None:
    participant = inventory()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> dict[str, Any] | None:
        return returned

    reply = await reply_of(participant, command_envelope())

    assert reply.data == data


async def test_a_handler_returning_an_unsupported_type_fails_the_step() -> None:
    participant = inventory()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> int:
        return 42

    reply = await reply_of(participant, command_envelope())

    assert reply.error is not None
    assert reply.error.code == "handler_error"
    assert "not int" in reply.error.message


async def test_a_bad_payload_is_a_permanent_failure_that_names_the_field() -> None:
    participant = inventory()
    ran: list[ReserveInventory] = []

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        ran.append(cmd)

    reply = await reply_of(participant, command_envelope(payload={"sku": "A-1", "qty": "lots"}))

    assert reply.status is ReplyStatus.FAILED
    assert reply.error is not None
    assert (reply.error.code, reply.error.retryable) == ("invalid_command", False)
    assert "qty" in reply.error.message
    assert ran == []


async def test_an_unknown_command_type_fails_naming_the_handled_types() -> None:
    participant = inventory()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        return None

    reply = await reply_of(participant, command_envelope("ShipParcel"))

    assert reply.error is not None
    assert reply.error.code == "unknown_command"
    assert "no handler for ShipParcel (handles: ReserveInventory)" in reply.error.message


async def test_a_handler_can_be_registered_under_another_wire_name() -> None:
    participant = inventory()

    @participant.handles(ReserveInventory, name="inventory.reserve")
    async def reserve(cmd: ReserveInventory) -> None:
        return None

    reply = await reply_of(participant, command_envelope("inventory.reserve"))

    assert reply.status is ReplyStatus.SUCCEEDED
    assert participant.command_types == ("inventory.reserve",)


# ---------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("raised", "code", "retryable", "message"),
    [
        (RetryableError("warehouse busy"), "transient", True, "warehouse busy"),
        (RetryableError("rate limited", code="throttled"), "throttled", True, "rate limited"),
        (ParticipantError("none left", code="out_of_stock"), "out_of_stock", False, "none left"),
        (ParticipantError("nope"), "step_failed", False, "nope"),
        (TimeoutError("db timed out"), "transient", True, "TimeoutError: db timed out"),
        (ConnectionError("reset"), "transient", True, "ConnectionError: reset"),
        (KeyError("sku"), "handler_error", False, "KeyError: 'sku'"),
    ],
)
async def test_exceptions_map_to_failed_replies(
    raised: Exception, code: str, retryable: bool, message: str
) -> None:
    participant = inventory()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        raise raised

    reply = await reply_of(participant, command_envelope())

    assert reply.status is ReplyStatus.FAILED
    assert reply.error is not None
    assert (reply.error.code, reply.error.retryable, reply.error.message) == (
        code,
        retryable,
        message,
    )


async def test_retryable_exceptions_are_configurable() -> None:
    participant = inventory(retryable_exceptions=(LookupError,))

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        raise KeyError("sku")

    reply = await reply_of(participant, command_envelope())

    assert reply.error is not None
    assert reply.error.retryable


# ---------------------------------------------------------------------- idempotency and ordering


async def test_a_duplicate_delivery_returns_the_identical_reply_without_running_the_handler() -> (
    None
):
    participant = inventory()
    runs = 0

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> Reserved:
        nonlocal runs
        runs += 1
        return Reserved(reservation_id=f"r-{runs}")

    envelope = command_envelope()
    first = await participant.process(envelope)
    second = await participant.process(envelope)

    assert runs == 1
    assert first is not None
    assert second is not None
    assert first.message_id == second.message_id
    assert first.body == second.body
    assert json.loads(second.body)["data"] == {"reservation_id": "r-1"}


async def test_concurrent_duplicates_run_the_handler_once() -> None:
    participant = inventory()
    runs = 0

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> Reserved:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return Reserved(reservation_id=f"r-{runs}")

    envelope = command_envelope()
    async with asyncio.timeout(2):
        replies = await asyncio.gather(*(participant.process(envelope) for _ in range(3)))

    assert runs == 1
    assert len({reply.body for reply in replies if reply is not None}) == 1


async def test_a_retry_with_the_same_idempotency_key_returns_the_cached_outcome() -> None:
    participant = inventory()
    runs = 0

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> Reserved:
        nonlocal runs
        runs += 1
        return Reserved(reservation_id="r-1")

    await participant.process(command_envelope(attempt=1))
    retry = await reply_of(participant, command_envelope(attempt=2))

    assert runs == 1
    assert retry.attempt == 2
    assert retry.message_id == "saga-1:reserve:execute:2:reply"
    assert retry.data == {"reservation_id": "r-1"}


async def test_a_retryable_failure_is_not_cached_so_the_retry_runs_again() -> None:
    participant = inventory()
    runs = 0

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> Reserved:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RetryableError("busy")
        return Reserved(reservation_id="r-1")

    first = await reply_of(participant, command_envelope(attempt=1))
    second = await reply_of(participant, command_envelope(attempt=2))

    assert runs == 2
    assert first.status is ReplyStatus.FAILED
    assert second.status is ReplyStatus.SUCCEEDED


async def test_a_permanent_failure_is_cached_for_the_retry() -> None:
    participant = inventory()
    runs = 0

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        nonlocal runs
        runs += 1
        raise ParticipantError("none left", code="out_of_stock")

    await participant.process(command_envelope(attempt=1))
    second = await reply_of(participant, command_envelope(attempt=2))

    assert runs == 1
    assert second.error is not None
    assert second.error.code == "out_of_stock"


async def test_an_execute_arriving_after_its_compensation_is_refused_as_cancelled() -> None:
    participant = inventory()
    ran: list[str] = []

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        ran.append("execute")

    @participant.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory) -> None:
        ran.append("compensate")

    compensated = await reply_of(
        participant, command_envelope("ReleaseInventory", kind=StepKind.COMPENSATE)
    )
    late = await reply_of(participant, command_envelope())

    assert compensated.status is ReplyStatus.SUCCEEDED
    assert late.status is ReplyStatus.FAILED
    assert late.error is not None
    assert (late.error.code, late.error.retryable) == ("cancelled", False)
    assert ran == ["compensate"]


async def test_a_compensation_waits_for_the_execution_still_running_for_its_step() -> None:
    participant = inventory()
    order: list[str] = []
    executing = asyncio.Event()
    finish = asyncio.Event()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        order.append("execute started")
        executing.set()
        await finish.wait()
        order.append("execute finished")

    @participant.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory) -> None:
        order.append("compensate")

    async with asyncio.timeout(2):
        execution = asyncio.create_task(participant.process(command_envelope()))
        await executing.wait()
        compensation = asyncio.create_task(
            participant.process(command_envelope("ReleaseInventory", kind=StepKind.COMPENSATE))
        )
        await asyncio.sleep(0.02)
        assert order == ["execute started"]
        finish.set()
        await asyncio.gather(execution, compensation)

    assert order == ["execute started", "execute finished", "compensate"]


async def test_commands_for_different_steps_do_not_wait_for_each_other() -> None:
    participant = inventory()
    release_first = asyncio.Event()
    done: list[str] = []

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory, context: CommandContext) -> None:
        if context.step == "first":
            await release_first.wait()
        done.append(context.step)

    async with asyncio.timeout(2):
        first = asyncio.create_task(participant.process(command_envelope(step="first")))
        await participant.process(command_envelope(step="second"))
        assert done == ["second"]
        release_first.set()
        await first


# ---------------------------------------------------------------------- dependency injection


async def test_handlers_get_dependencies_by_type_and_the_command_context() -> None:
    stock = StockService()
    participant = inventory(dependencies=Dependencies().provide(StockService, stock))
    contexts: list[CommandContext] = []

    @participant.handles(ReserveInventory)
    async def reserve(
        cmd: ReserveInventory, service: StockService, context: CommandContext
    ) -> Reserved:
        contexts.append(context)
        return Reserved(reservation_id=await service.reserve(cmd.sku))

    reply = await reply_of(participant, command_envelope(attempt=3))

    assert reply.data == {"reservation_id": "r-1"}
    assert stock.reserved == ["A-1"]
    [context] = contexts
    assert (context.saga_id, context.saga_type, context.step) == ("saga-1", "order", "reserve")
    assert (context.attempt, context.kind) == (3, StepKind.EXECUTE)
    assert context.idempotency_key == "saga-1:reserve"
    assert context.message_id == "saga-1:reserve:execute:3"
    assert context.headers["traceparent"].startswith("00-")


async def test_provide_registers_a_dependency_on_the_built_in_resolver() -> None:
    stock = StockService()
    participant = inventory().provide(StockService, stock)

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory, service: StockService) -> None:
        await service.reserve(cmd.sku)

    await participant.process(command_envelope())

    assert stock.reserved == ["A-1"]


async def test_attaching_with_a_missing_dependency_fails_before_consuming() -> None:
    participant = inventory()
    bus = InMemoryBus()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory, service: StockService) -> None:
        return None

    with pytest.raises(MissingDependency, match=r"nothing provides StockService"):
        await participant.attach(bus)

    await bus.publish([command_envelope()])
    assert bus.queued(RouteKind.COMMAND, "inventory") == 1
    await bus.close()


def test_registering_a_sync_function_or_a_second_handler_is_refused() -> None:
    participant = inventory()

    def sync(cmd: ReserveInventory) -> None:
        return None

    async def handler(cmd: ReserveInventory) -> None:
        return None

    with pytest.raises(TypeError, match="must be an async function"):
        participant.register("ReserveInventory", ReserveInventory, sync)  # type: ignore[arg-type]
    participant.register("ReserveInventory", ReserveInventory, handler)
    with pytest.raises(ValueError, match="already has a handler"):
        participant.register("ReserveInventory", ReserveInventory, handler)


def test_a_handler_parameter_without_annotation_is_refused() -> None:
    participant = inventory()

    async def handler(cmd: ReserveInventory, service) -> None:  # type: ignore[no-untyped-def]  # noqa: ANN001
        return None

    with pytest.raises(TypeError, match="'service' needs a type annotation"):
        participant.register("ReserveInventory", ReserveInventory, handler)


# ---------------------------------------------------------------------- over a bus


async def test_an_attached_participant_replies_on_the_reply_queue() -> None:
    bus = InMemoryBus()
    participant = inventory()

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> Reserved:
        return Reserved(reservation_id="r-1")

    await participant.attach(bus)
    await bus.publish([command_envelope()])
    await bus.wait_idle(timeout=2)

    assert bus.queued(RouteKind.REPLY, REPLY_QUEUE) == 1
    [reply] = [e for e in bus.published if e.route is RouteKind.REPLY]
    assert decode_reply(reply).data == {"reservation_id": "r-1"}
    assert participant.handled == 1
    await bus.close()


@pytest.mark.parametrize(
    "envelope",
    [
        command_envelope(reply_to=None),
        command_envelope().model_copy(
            update={
                "headers": {k: v for k, v in command_envelope().headers.items() if k != HEADER_STEP}
            }
        ),
        command_envelope().model_copy(update={"body": b"not json"}),
    ],
    ids=["without-reply-to", "without-step-header", "undecodable-body"],
)
async def test_a_command_that_cannot_be_answered_is_dead_lettered(envelope: Envelope) -> None:
    bus = InMemoryBus()
    participant = inventory()
    ran: list[ReserveInventory] = []

    @participant.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory) -> None:
        ran.append(cmd)

    await participant.attach(bus)
    await bus.publish([envelope])
    await bus.wait_idle(timeout=2)

    [dead] = bus.dead_letters()
    assert dead.message_id == envelope.message_id
    assert dead.body == envelope.body
    assert "cannot be decoded or answered" in dead.headers[HEADER_REASON]
    assert ran == []
    assert [e for e in bus.published if e.route is RouteKind.REPLY] == []
    await bus.close()


async def test_handle_envelope_before_attach_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="attach"):
        await inventory().handle_envelope(command_envelope())


class _BrokerLikeBus(InMemoryBus):
    in_process = False  # stands for a real broker: commands outlive the process


async def test_an_in_memory_outcome_cache_over_a_real_broker_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    participant = Participant("warned")
    bus = _BrokerLikeBus()
    with caplog.at_level("WARNING", logger="sagas.participant"):
        subscription = await participant.attach(bus)
    await subscription.close()
    await bus.close()
    assert "keeps command outcomes in memory" in caplog.text


async def test_no_warning_over_the_in_process_bus(caplog: pytest.LogCaptureFixture) -> None:
    participant = Participant("quiet")
    bus = InMemoryBus()
    with caplog.at_level("WARNING", logger="sagas.participant"):
        subscription = await participant.attach(bus)
    await subscription.close()
    await bus.close()
    assert "outcomes in memory" not in caplog.text


async def test_the_runtimes_own_local_step_participant_is_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def noop(data: Reserved) -> None:
        return None

    saga = SagaBuilder("local-only", data=Reserved).step("note").run(noop).build()
    bus = _BrokerLikeBus()
    with caplog.at_level("WARNING", logger="sagas.participant"):
        async with SagaRuntime(sagas=[saga], bus=bus):
            pass
    await bus.close()
    assert "outcomes in memory" not in caplog.text


async def test_a_delivery_cancelled_while_waiting_for_its_turn_is_just_cancelled() -> None:
    # The holder passes the turn on after the waiter was cancelled but before the waiting task
    # ran again: the waiter is gone from the queue, and the task ends cancelled, nothing else.
    participant = Participant("inventory")
    participant._busy["o-1:reserve"] = None  # a delivery of this step holds it
    waiting = asyncio.create_task(participant._wait_turn("o-1:reserve"))
    await asyncio.sleep(0)
    waiting.cancel()
    participant._pass_turn("o-1:reserve")

    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert participant._busy == {}

"""Models built without validation (``sagas_core._models``) equal the validated ones.

The engine, codec, participant and in-memory store fill the ``__dict__`` of the contract models
they make from values they checked already. Each such model must be what validation would have
made: equal, the fields in declaration order (the order of ``model_dump`` and of the JSON).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Self

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ErrorInfo,
    EventKind,
    ParticipantError,
    ReplyMessage,
    ReplyStatus,
    RetryableError,
    RouteKind,
    SagaEvent,
    SagaStatus,
    StepKind,
)
from sagas_core import SagaBuilder, SagaRuntime
from sagas_core._models import replace, trusted
from sagas_core.codec import (
    decode_command,
    decode_event,
    decode_reply,
    encode_command,
    encode_event,
    encode_reply,
)
from sagas_core.retry import fixed
from sagas_core.testing import InMemoryBus, InMemorySagaStore

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def assert_as_validated(model: BaseModel) -> None:
    cls = type(model)
    assert list(model.__dict__) == list(cls.model_fields), cls.__name__
    validated = cls.model_validate(dict(model.__dict__))
    assert validated == model
    assert validated.model_dump_json() == model.model_dump_json()
    for value in model.__dict__.values():
        if isinstance(value, BaseModel):
            assert_as_validated(value)


class Order(BaseModel):
    order_id: str
    reserved: bool = False


async def reserve(data: Order) -> dict[str, bool]:
    return {"reserved": True}


async def release(data: Order) -> None:
    return None


attempts: list[int] = []


async def charge(data: Order) -> None:
    attempts.append(1)
    if len(attempts) == 1:
        raise RetryableError("card network busy")
    raise ParticipantError("declined", code="card_declined")


async def test_every_model_a_compensated_saga_makes_is_as_validated() -> None:
    attempts.clear()
    saga = (
        SagaBuilder("order", data=Order)
        .step("reserve")
        .run(reserve)
        .compensate_with(release)
        .step("charge")
        .run(charge)
        .retry(2, backoff=fixed(0.01))
        .build()
    )
    store, bus = InMemorySagaStore(), InMemoryBus()
    async with SagaRuntime(sagas=[saga], store=store, bus=bus, timeout_interval=0.01) as runtime:
        started = await runtime.start_saga("order", Order(order_id="o-1"))
        done = await runtime.wait_for(started.saga_id, timeout=5)
    assert done.status is SagaStatus.COMPENSATED
    assert_as_validated(done)
    history = await store.history(done.saga_id)
    assert len(history) >= 5
    for entry in history:
        assert_as_validated(entry)
    kinds = set()
    for record in store.outbox_rows:
        assert_as_validated(record)
        envelope = record.envelope
        if envelope.route is RouteKind.COMMAND:
            assert_as_validated(decode_command(envelope))
        elif envelope.route is RouteKind.EVENT:
            event = decode_event(envelope)
            kinds.add(event.kind)
            assert envelope.body == event.model_dump_json().encode()
    assert {EventKind.STEP_RETRY_SCHEDULED, EventKind.COMPENSATED} <= kinds
    replies = [envelope for envelope in bus.published if envelope.route is RouteKind.REPLY]
    assert {decode_reply(envelope).status for envelope in replies} == set(ReplyStatus)
    for envelope in replies:
        assert_as_validated(envelope)
        assert_as_validated(decode_reply(envelope))


def a_command(destination: str = "inventory") -> CommandMessage:
    return CommandMessage(
        message_id="s:step:execute:1",
        saga_id="s",
        saga_type="order",
        step="step",
        attempt=1,
        kind=StepKind.EXECUTE,
        command_type="Reserve",
        destination=destination,
        payload={"sku": "a"},
        idempotency_key="s:step",
        created_at=T0,
        headers={"traceparent": "00-1-2-01"},
    )


def test_codec_envelopes_are_as_validated() -> None:
    command = a_command()
    envelope = encode_command(command, reply_to="sagas.replies.default")
    assert envelope == encode_command(command.model_copy(update={"reply_to": envelope.reply_to}))
    assert_as_validated(envelope)
    assert decode_command(envelope) == command.model_copy(update={"reply_to": envelope.reply_to})
    reply = ReplyMessage.answering(
        command,
        status=ReplyStatus.FAILED,
        at=T0,
        error=ErrorInfo(code="out_of_stock", message="none left"),
    )
    assert_as_validated(encode_reply(reply, "sagas.replies.default"))
    assert decode_reply(encode_reply(reply, "sagas.replies.default")) == reply
    event = SagaEvent(
        event_id="s:2:0",
        saga_id="s",
        saga_type="order",
        kind=EventKind.STEP_FAILED,
        status=SagaStatus.RUNNING,
        step="step",
        attempt=1,
        version=2,
        at=T0,
        error=reply.error,
    )
    assert_as_validated(encode_event(event))
    assert decode_event(encode_event(event)) == event


def test_an_empty_address_is_still_refused() -> None:
    command = a_command(destination="")
    with pytest.raises(ValidationError, match="key"):
        encode_command(command, reply_to="r")


def test_replace_and_trusted_set_fields_like_pydantic() -> None:
    error = trusted(ErrorInfo, {"code": "x", "message": "", "retryable": False})
    assert error == ErrorInfo(code="x")
    assert error.model_fields_set == {"code", "message", "retryable"}
    changed = replace(error, {"message": "why"})
    assert changed == error.model_copy(update={"message": "why"})
    assert changed.model_fields_set == error.model_copy(update={"message": "why"}).model_fields_set
    assert error.message == ""  # the original is untouched
    envelope = Envelope(
        route=RouteKind.EVENT, key="k", message_id="m", message_type="t", body=b"{}", timestamp=T0
    )
    assert replace(envelope, {"key": "other"}).key == "other"


def test_only_frozen_models_are_made_unvalidated() -> None:
    class Loose(BaseModel):
        name: str

    with pytest.raises(TypeError, match="not frozen"):
        trusted(Loose, {"name": "x"})


def test_a_model_with_a_new_of_its_own_is_not_made_unvalidated() -> None:
    class Special(BaseModel):
        model_config = ConfigDict(frozen=True)
        name: str

        def __new__(cls, *_args: object, **_kwargs: object) -> Self:
            return super().__new__(cls)

    with pytest.raises(TypeError, match="__new__"):
        trusted(Special, {"name": "x"})

"""Size limits (issue 18, defect 9): an oversized body is never parsed, saga data stays bounded.

A forged 10 MiB reply used to be parsed and merged into the saga data (and kept again as the
step's result). Now a reply or event body over ``max_message_bytes`` is dead-lettered unparsed
with the reason, and a reply that would grow the saga data (or whose own data is) over
``max_data_bytes`` fails its step with an error naming the saga, the step and the limit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    Envelope,
    InvalidSagaData,
    MessageTooLarge,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaStatus,
    Start,
    StepStatus,
    StepSucceeded,
)
from sagas_core import Participant, SagaBuilder, SagaRuntime, load_settings
from sagas_core.codec import HEADER_REASON, encode_reply
from sagas_core.definition import SagaDefinition
from sagas_core.engine import DATA_TOO_LARGE_CODE, decide
from sagas_core.testing import FakeClock, InMemoryBus, SagaTestHarness
from tests.waiting import eventually

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LIMIT = 4096


class Order(BaseModel):
    order_id: str
    notes: dict[str, Any] = {}


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


class Annotate(BaseModel):
    order_id: str


def shop() -> SagaDefinition:
    return (
        SagaBuilder("sized", data=Order)
        .step("reserve")
        .send(Reserve, to="inventory")
        .compensate_with(Release)
        .step("annotate")
        .send(Annotate, to="notes")
        .build()
    )


SHOP = shop()


def annotated(notes: dict[str, Any], *, limit: int | None = LIMIT) -> tuple[Any, Any]:
    start = decide(SHOP, None, Start(saga_id="s-1", data={"order_id": "o-1"}, at=T0))
    reserve = start.commands[0]
    moved = decide(
        SHOP,
        start.instance,
        StepSucceeded(step="reserve", attempt=1, kind=reserve.kind, at=T0),
    )
    annotate = moved.commands[0]
    decision = decide(
        SHOP,
        moved.instance,
        StepSucceeded(
            step="annotate",
            attempt=annotate.attempt,
            kind=annotate.kind,
            at=T0 + timedelta(seconds=1),
            data={"notes": notes},
        ),
        max_data_bytes=limit,
    )
    return decision, decision.instance.steps[1]


def test_a_reply_that_grows_the_saga_data_past_the_limit_fails_its_step_by_name() -> None:
    decision, step = annotated({"text": "x" * LIMIT})

    assert decision.instance.status is SagaStatus.COMPENSATING
    assert decision.instance.data["notes"] == {}  # nothing merged
    assert step.status is StepStatus.SKIPPED  # applied, and nothing to undo (no compensation)
    assert step.result is None  # the oversized data is kept nowhere
    error = decision.instance.error
    assert error is not None
    assert error.code == DATA_TOO_LARGE_CODE
    assert "saga s-1" in error.message
    assert "'annotate'" in error.message
    assert f"limit of {LIMIT} bytes" in error.message
    assert [command.step for command in decision.commands] == ["reserve"]  # released


def test_a_reply_within_the_limit_is_merged() -> None:
    decision, step = annotated({"text": "x" * 100})

    assert decision.instance.status is SagaStatus.COMPLETED
    assert decision.instance.data["notes"] == {"text": "x" * 100}
    assert step.result == {"notes": {"text": "x" * 100}}


def test_without_a_limit_the_engine_merges_anything() -> None:
    decision, _ = annotated({"text": "x" * LIMIT}, limit=None)

    assert decision.instance.status is SagaStatus.COMPLETED


def test_a_start_over_the_limit_is_refused() -> None:
    big = {"order_id": "o-1", "notes": {"text": "x" * LIMIT}}

    with pytest.raises(InvalidSagaData, match=f"limit of {LIMIT} bytes"):
        decide(SHOP, None, Start(saga_id="s-1", data=big, at=T0), max_data_bytes=LIMIT)


def oversized_reply(saga_id: str, size: int) -> Envelope:
    reply = ReplyMessage(
        message_id=f"{saga_id}:annotate:execute:1:reply",
        saga_id=saga_id,
        saga_type="sized",
        step="annotate",
        attempt=1,
        kind="execute",
        status=ReplyStatus.SUCCEEDED,
        created_at=T0,
    )
    # Not even JSON: were it parsed, the error would be another one.
    return encode_reply(reply, "sagas.replies.default").model_copy(update={"body": b"[" * size})


async def test_an_oversized_reply_is_refused_before_it_is_parsed() -> None:
    harness = SagaTestHarness(shop())
    harness.orchestrator.max_message_bytes = LIMIT
    harness.stub("inventory").on(Reserve).succeed()
    harness.stub("notes").on(Annotate).never_answer()
    saga = await harness.start(Order(order_id="o-1"), saga_id="s-1")

    with pytest.raises(MessageTooLarge) as raised:
        await harness.orchestrator.handle_envelope(oversized_reply(saga.saga_id, LIMIT + 1))

    assert (raised.value.size, raised.value.limit) == (LIMIT + 1, LIMIT)
    assert "SAGAS_MAX_MESSAGE_BYTES" in str(raised.value)
    assert (await harness.saga(saga.saga_id)).status is SagaStatus.RUNNING


async def test_the_runtime_dead_letters_an_oversized_reply_with_the_reason() -> None:
    bus = InMemoryBus()
    inventory = Participant("inventory", clock=FakeClock(T0))

    @inventory.handles(Reserve)
    async def reserve(command: Reserve) -> None:
        return None

    async with SagaRuntime(
        sagas=[shop()], participants=[inventory], bus=bus, max_message_bytes=LIMIT
    ) as runtime:
        saga = await runtime.start_saga("sized", Order(order_id="o-1"))
        await bus.publish([oversized_reply(saga.saga_id, 2 * LIMIT)])
        dead = await eventually(bus.dead_letters, what="the reply dead-lettered")
        assert len(dead) == 1
        assert dead[0].message_id == f"{saga.saga_id}:annotate:execute:1:reply"
        assert f"over the message limit of {LIMIT} bytes" in dead[0].headers[HEADER_REASON]
        assert (await runtime.orchestrator.get(saga.saga_id)).status is SagaStatus.RUNNING


async def test_an_oversized_event_is_dead_lettered_unparsed() -> None:
    harness = SagaTestHarness(shop())
    harness.orchestrator.max_message_bytes = LIMIT
    envelope = Envelope(
        route=RouteKind.EVENT,
        key="Anything",
        message_id="event-1",
        message_type="Anything",
        body=b"{" * (LIMIT + 1),
        timestamp=T0,
    )

    outcome = await harness.orchestrator.handle_event(envelope)

    assert len(outcome.dead_letter) == 1
    assert "SAGAS_MAX_MESSAGE_BYTES" in outcome.dead_letter[0]


def test_the_limits_come_from_settings_with_sane_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.max_message_bytes, defaults.max_saga_data_bytes) == (1 << 20, 256 << 10)

    monkeypatch.setenv("SAGAS_MAX_MESSAGE_BYTES", "65536")
    monkeypatch.setenv("SAGAS_MAX_SAGA_DATA_BYTES", "8192")
    chosen = load_settings()

    assert (chosen.max_message_bytes, chosen.max_saga_data_bytes) == (65536, 8192)

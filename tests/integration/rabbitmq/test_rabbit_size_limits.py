"""Issue 18, defect 9, over the real RabbitMQ and PostgreSQL: size limits.

A forged oversized reply is dead-lettered unparsed with the reason and changes nothing; a
genuine reply whose data would grow the saga data past its limit fails the step by name and the
saga compensates.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from sagas_abstractions import Envelope, RouteKind, SagaStatus, StepStatus
from sagas_core import Participant, SagaBuilder, SagaRuntime
from sagas_core.codec import HEADER_REASON
from sagas_core.engine import DATA_TOO_LARGE_CODE
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.rabbitmq.conftest import BusFactory
from tests.integration.rabbitmq.hardening import (
    Release,
    Reserve,
    inventory,
    publish_reply,
)
from tests.waiting import eventually, saga_reaches

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.postgres]

MESSAGE_LIMIT = 64 * 1024
DATA_LIMIT = 8 * 1024


class Order(BaseModel):
    order_id: str
    reservation_id: str | None = None
    label: str | None = None


class PrintLabel(BaseModel):
    order_id: str


order_saga = (
    SagaBuilder("sized-replies", data=Order)
    .step("reserve")
    .send(Reserve, to="inventory")
    .compensate_with(Release)
    .step("print-label")
    .send(PrintLabel, to="labels")
    .build()
)


def labels() -> Participant:
    participant = Participant("labels")

    @participant.handles(PrintLabel)
    async def print_label(cmd: PrintLabel) -> dict[str, str]:
        return {"label": "x" * 2 * DATA_LIMIT}  # within the message limit, over the data limit

    return participant


async def runtime_for(
    connect: BusFactory, store: SqlSagaStore, participants: list[Participant]
) -> SagaRuntime:
    runtime = SagaRuntime(
        sagas=[order_saga],
        participants=participants,
        store=store,
        bus=await connect(),
        timeout_interval=0.05,
        relay_poll_interval=0.1,
        max_message_bytes=MESSAGE_LIMIT,
        max_data_bytes=DATA_LIMIT,
    )
    await runtime.start()
    return runtime


async def test_an_oversized_reply_is_dead_lettered_unparsed_with_the_reason(
    connect: BusFactory, store: SqlSagaStore, amqp_url: str, prefix: str
) -> None:
    dead: list[Envelope] = []

    async def collect(envelope: Envelope) -> None:
        dead.append(envelope)

    runtime = await runtime_for(connect, store, [inventory([])])  # nobody prints labels
    watcher = await runtime.bus.subscribe(RouteKind.DEAD_LETTER, "dead-letter", collect)
    try:
        saga = await runtime.start_saga(order_saga, Order(order_id="o-1"))
        await saga_reaches(store, saga.saga_id, SagaStatus.RUNNING, step="print-label")
        await publish_reply(
            amqp_url,
            prefix,
            runtime.orchestrator.reply_to,
            saga_type="sized-replies",
            saga_id=saga.saga_id,
            step="print-label",
            body=b'{"status": "succeeded", "data": {"label": "' + b"x" * MESSAGE_LIMIT + b'"}}',
        )
        await eventually(lambda: dead, what="the oversized reply dead-lettered")
        after = await store.load(saga.saga_id)
    finally:
        await watcher.close()
        await runtime.stop(grace=5)

    (letter,) = dead
    assert letter.message_id == f"{saga.saga_id}:print-label:execute:1:reply"
    reason = letter.headers[HEADER_REASON]
    assert f"over the message limit of {MESSAGE_LIMIT} bytes" in reason
    assert "not parsed" in reason
    assert after is not None
    assert after.status is SagaStatus.RUNNING
    assert after.data["label"] is None


async def test_a_reply_that_would_grow_the_saga_data_past_the_limit_fails_the_step(
    connect: BusFactory, store: SqlSagaStore
) -> None:
    released: list[str] = []
    runtime = await runtime_for(connect, store, [inventory(released), labels()])
    try:
        saga = await runtime.start_saga(order_saga, Order(order_id="o-2"))
        done = await runtime.wait_for(saga.saga_id, timeout=30)
    finally:
        await runtime.stop(grace=5)

    assert done.status is SagaStatus.COMPENSATED
    assert done.data["label"] is None
    assert done.error is not None
    assert done.error.code == DATA_TOO_LARGE_CODE
    assert saga.saga_id in done.error.message
    assert "'print-label'" in done.error.message
    assert f"limit of {DATA_LIMIT} bytes" in done.error.message
    label_step = done.steps[1]
    assert label_step.result is None
    assert label_step.status is StepStatus.SKIPPED  # applied, but nothing to undo
    assert released == ["o-2"]

"""Replies that can never be applied are dead-lettered at once, with the reason, on the real broker.

A reply that does not follow the protocol cannot get better by being delivered again: it goes to
the dead-letter queue after its first delivery, with ``x-dead-letter-reason`` naming what is
wrong, whether it came to the worker's own reply queue (reply affinity) or to the group's, and
nothing of it reaches the database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel

from sagas_abstractions import Envelope, RouteKind, SagaStatus
from sagas_core import SagaBuilder, SagaRuntime
from sagas_core.codec import HEADER_REASON
from sagas_rabbitmq import Topology
from sagas_sqlalchemy import SqlSagaStore
from tests.integration.rabbitmq.conftest import BusFactory
from tests.waiting import eventually, saga_reaches

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.postgres]


class Order(BaseModel):
    order_id: str


class Reserve(BaseModel):
    order_id: str


# Nobody consumes "warehouse": the saga waits for a reply that only the test sends.
waiting_saga = (
    SagaBuilder("poison-replies", data=Order)
    .step("reserve")
    .send(Reserve, to="warehouse")
    .timeout(seconds=120)
    .build()
)


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    store = SqlSagaStore.from_url(
        postgres_url, table_prefix=f"p{uuid.uuid4().hex[:8]}_", create_tables=True
    )
    try:
        yield store
    finally:
        await store.drop_tables()
        await store.close()


def _reply(saga_id: str, key: str, **changes: object) -> Envelope:
    """A well-formed reply to attempt 1 of the saga's step, changed by ``changes``."""
    reply = Envelope(
        route=RouteKind.REPLY,
        key=key,
        message_id=f"{saga_id}:reserve:execute:1:reply:{uuid.uuid4().hex[:6]}",
        message_type="saga.reply",
        correlation_id=saga_id,
        headers={
            "x-saga-type": "poison-replies",
            "x-saga-step": "reserve",
            "x-saga-attempt": "1",
            "x-saga-kind": "execute",
        },
        body=b'{"status": "succeeded", "data": {}}',
        timestamp=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
    )
    return reply.model_copy(update=changes)


def _poison(saga_id: str, key: str) -> dict[str, tuple[Envelope, str]]:
    """Each kind of impossible reply, with words its dead-letter reason must contain."""
    good = _reply(saga_id, key)
    headers = dict(good.headers)
    return {
        "not JSON": (_reply(saga_id, key, body=b"<html>502 Bad Gateway</html>"), "not valid JSON"),
        "missing header": (
            _reply(saga_id, key, headers={k: v for k, v in headers.items() if k != "x-saga-step"}),
            "lacks the x-saga-step header",
        ),
        "attempt 0": (
            _reply(saga_id, key, headers={**headers, "x-saga-attempt": "0"}),
            "x-saga-attempt=0",
        ),
        "attempt beyond 32 bits": (
            _reply(saga_id, key, headers={**headers, "x-saga-attempt": str(2**32)}),
            f"x-saga-attempt={2**32}",
        ),
        "a command": (
            _reply(
                saga_id,
                key,
                message_type="Reserve",
                reply_to="sagas.replies.default",
                headers={**headers, "x-idempotency-key": f"{saga_id}:reserve"},
                body=b'{"order_id": "A-1"}',
            ),
            "status",
        ),
    }


@pytest.mark.parametrize("affinity", [True, False], ids=["reply-affinity", "group-queue"])
async def test_each_impossible_reply_is_dead_lettered_after_one_delivery_with_its_reason(
    connect: BusFactory, store: SqlSagaStore, affinity: bool
) -> None:
    bus = await connect(reply_affinity=affinity)
    outsider = await connect(group="participants")
    dead: list[Envelope] = []

    async def record(envelope: Envelope) -> None:
        dead.append(envelope)

    await outsider.subscribe(RouteKind.DEAD_LETTER, "dead-letter", record)
    async with SagaRuntime(sagas=[waiting_saga], bus=bus, store=store) as runtime:
        deliveries: dict[str, int] = {}
        handle = runtime.orchestrator.handle_envelope

        async def counted(envelope: Envelope) -> None:
            deliveries[envelope.message_id] = deliveries.get(envelope.message_id, 0) + 1
            await handle(envelope)

        runtime.orchestrator.handle_envelope = counted  # type: ignore[method-assign]
        saga = await runtime.start_saga(waiting_saga, Order(order_id="A-1"))
        before = await saga_reaches(store, saga.saga_id, SagaStatus.RUNNING, step="reserve")
        history = await store.history(saga.saga_id)
        group = runtime.orchestrator.reply_to
        key = Topology.affinity_key(group, bus.instance) if affinity else group
        poison = _poison(saga.saga_id, key)

        await outsider.publish([message for message, _ in poison.values()])

        ids = {message.message_id: kind for kind, (message, _) in poison.items()}
        await eventually(
            lambda: ids.keys() <= {d.message_id for d in dead}, what="every dead letter"
        )
        after = await store.load(saga.saga_id)
        assert after is not None
        assert after.version == before.version
        assert await store.history(saga.saga_id) == history

    for letter in (d for d in dead if d.message_id in ids):
        kind = ids[letter.message_id]
        _, words = poison[kind]
        assert words in letter.headers.get(HEADER_REASON, ""), kind
        assert "x-death" not in letter.headers, kind  # not dead-lettered by a queue
        assert deliveries.get(letter.message_id) == 1, kind
    assert sorted(d.message_id for d in dead if d.message_id in ids) == sorted(ids)

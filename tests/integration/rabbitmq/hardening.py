"""What the tests of issue 18 (forged and oversized replies) share: a first step, a store, and
a reply published by hand.

Their saga reserves stock at ``inventory`` first (compensated by a release), so a test sees
whether a forged or oversized reply for the step after it made the saga compensate.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
from pydantic import BaseModel

from sagas_core import Participant
from sagas_core.codec import HEADER_REPLY_TOKEN
from sagas_sqlalchemy import SqlSagaStore


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


def inventory(released: list[str]) -> Participant:
    """The inventory participant: reserves, and records each release in ``released``."""
    participant = Participant("inventory")

    @participant.handles(Reserve)
    async def reserve(cmd: Reserve) -> dict[str, str]:
        return {"reservation_id": f"R-{cmd.order_id}"}

    @participant.handles(Release)
    async def release(cmd: Release) -> None:
        released.append(cmd.order_id)

    return participant


@contextlib.asynccontextmanager
async def store_of_this_test(postgres_url: str) -> AsyncIterator[SqlSagaStore]:
    """A saga store on PostgreSQL with tables of this test only, dropped afterwards."""
    store = SqlSagaStore.from_url(
        postgres_url, table_prefix=f"h{uuid.uuid4().hex[:8]}_", create_tables=True
    )
    try:
        yield store
    finally:
        await store.drop_tables()
        await store.close()


async def publish_reply(
    amqp_url: str,
    prefix: str,
    reply_to: str,
    *,
    saga_type: str,
    saga_id: str,
    step: str,
    body: bytes,
    token: str | None = None,
) -> None:
    """Publish a reply to attempt 1 of ``step`` as any client with write access can.

    Confirmed, mandatory, under the predictable id ``<saga>:<step>:execute:1:reply``.
    """
    command_id = f"{saga_id}:{step}:execute:1"
    headers = {
        "x-saga-type": saga_type,
        "x-saga-step": step,
        "x-saga-attempt": "1",
        "x-saga-kind": "execute",
        "x-in-reply-to": command_id,
    }
    if token is not None:
        headers[HEADER_REPLY_TOKEN] = token
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(f"{prefix}.replies", ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=f"{command_id}:reply",
                correlation_id=saga_id,
                type="saga.reply",
                timestamp=datetime.now(UTC),
                headers=dict(headers),
            ),
            routing_key=reply_to,
            mandatory=True,
        )
    finally:
        await connection.close()

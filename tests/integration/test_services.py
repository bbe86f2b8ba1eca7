"""The real services the integration suites stand on answer, and tests clean up after them."""

from __future__ import annotations

import uuid

import aio_pika
import psycopg
import pytest
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.integration


@pytest.mark.rabbitmq
async def test_rabbitmq_accepts_a_confirmed_persistent_message_and_gives_it_back(
    amqp_url: str,
) -> None:
    queue_name = f"sagas-test-{uuid.uuid4().hex}"
    connection = await aio_pika.connect(amqp_url, timeout=5)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b'{"probe": true}',
                    message_id="probe-1",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue_name,
                timeout=5,
            )
            message = await queue.get(timeout=5, fail=True)
            assert message is not None
            await message.ack()
            assert message.message_id == "probe-1"
            assert message.body == b'{"probe": true}'
        finally:
            await queue.delete(if_unused=False, if_empty=False)


@pytest.mark.postgres
async def test_postgresql_answers_on_the_configured_url(postgres_url: str) -> None:
    url = make_url(postgres_url)
    async with await psycopg.AsyncConnection.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        dbname=url.database or "postgres",
        connect_timeout=5,
    ) as connection:
        cursor = await connection.execute("select 1")
        assert await cursor.fetchone() == (1,)

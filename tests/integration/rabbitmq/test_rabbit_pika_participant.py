"""The protocol is language-neutral: a participant written with the blocking ``pika`` client,
from docs/protocol.md alone (none of our code), serves a saga our orchestrator runs.

The flights participant below is what a service in any language would do: declare its command
queue with the documented arguments, consume with manual acks, dedupe by ``message_id``, key
its effects on ``x-idempotency-key``, refuse an execute after its step's compensation, and
publish a confirmed, mandatory reply to the replies exchange with the command's reply_to,
echoing the command's ``x-saga-*`` headers (its reply token among them).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pika
import pytest

from sagas_abstractions import SagaStatus
from sagas_core import SagaRuntime
from sagas_rabbitmq import RabbitBus
from tests.integration.rabbitmq.rabbit_travel import Ledger, TripData, participants, trip_saga

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

BusFactory = Callable[..., Awaitable[RabbitBus]]
DELIVERY_LIMIT = 2  # as in conftest.py: the queue arguments must match exactly


class PikaFlights(threading.Thread):
    """A flights participant in plain pika, following docs/protocol.md."""

    def __init__(self, amqp_url: str, prefix: str) -> None:
        super().__init__(name="pika-flights", daemon=True)
        self.url = amqp_url
        self.prefix = prefix
        self.ready = threading.Event()
        self.effects: list[tuple[str, str]] = []  # (kind, trip_id), once per idempotency key
        self.error: BaseException | None = None
        self._replies: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # by message_id
        self._outcomes: dict[str, dict[str, Any]] = {}  # by x-idempotency-key
        self._compensated: set[tuple[str, str]] = set()  # (saga id, step)
        self._connection: Any = None
        self._channel: Any = None

    def run(self) -> None:
        try:
            self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = self._channel = self._connection.channel()
            channel.confirm_delivery()
            queue = f"{self.prefix}.commands.flights"
            channel.queue_declare(
                queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": DELIVERY_LIMIT,
                    "x-dead-letter-exchange": f"{self.prefix}.dead-letter",
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
            channel.queue_bind(queue, f"{self.prefix}.commands", routing_key="flights")
            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(queue, self._on_command)
            self.ready.set()
            channel.start_consuming()
            self._connection.close()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            raise

    def stop(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.add_callback_threadsafe(self._channel.stop_consuming)
        self.join(timeout=5)

    def _outcome(self, kind: str, command_type: str, command: dict[str, Any]) -> dict[str, Any]:
        trip_id = command["trip_id"]
        if kind == "execute" and command_type == "BookFlight":
            self.effects.append((kind, trip_id))
            return {"status": "succeeded", "data": {"flight_id": f"PIKA-{trip_id}"}}
        if kind == "compensate" and command_type == "CancelFlight":
            self.effects.append((kind, trip_id))
            return {"status": "succeeded", "data": {}}
        return {
            "status": "failed",
            "data": {},
            "error": {"code": "unknown_command", "message": command_type, "retryable": False},
        }

    def _on_command(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        message_id = properties.message_id
        if message_id not in self._replies:  # a redelivery gets the same reply again
            headers = properties.headers or {}
            kind = headers["x-saga-kind"]
            saga_step = (properties.correlation_id, headers["x-saga-step"])
            key = headers["x-idempotency-key"]
            if kind == "compensate":
                self._compensated.add(saga_step)
            if kind == "execute" and saga_step in self._compensated:
                reply = {
                    "status": "failed",
                    "data": {},
                    "error": {"code": "cancelled", "message": "compensated", "retryable": False},
                }
            elif key in self._outcomes:
                reply = self._outcomes[key]
            else:
                reply = self._outcomes[key] = self._outcome(kind, properties.type, json.loads(body))
            reply_headers = {
                name: headers[name]
                for name in (
                    "x-saga-type",
                    "x-saga-step",
                    "x-saga-attempt",
                    "x-saga-kind",
                    "x-saga-reply-token",  # the proof that this reply answers the command
                )
                if name in headers
            }
            reply_headers["x-in-reply-to"] = message_id
            self._replies[message_id] = (reply, reply_headers)
        reply, reply_headers = self._replies[message_id]
        channel.basic_publish(
            exchange=f"{self.prefix}.replies",
            routing_key=properties.reply_to,
            body=json.dumps(reply).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=f"{message_id}:reply",
                correlation_id=properties.correlation_id,
                type="saga.reply",
                timestamp=int(time.time()),
                headers=reply_headers,
            ),
            mandatory=True,
        )
        channel.basic_ack(method.delivery_tag)  # after the reply is confirmed


async def test_a_participant_written_with_plain_pika_serves_execute_and_compensate(
    connect: BusFactory, amqp_url: str, prefix: str
) -> None:
    orchestrator_bus = await connect(group="orchestrator")  # declares the exchanges
    flights = PikaFlights(amqp_url, prefix)
    flights.start()
    try:
        assert flights.ready.wait(timeout=10)
        assert flights.error is None
        ledger = Ledger()
        participant_bus = await connect(group="participants")
        for participant in participants(ledger, flights=False):
            await participant.attach(participant_bus)

        async with SagaRuntime(sagas=[trip_saga()], bus=orchestrator_bus, group="pika") as runtime:
            ok = await runtime.start_saga("trip-booking", TripData(trip_id="ok"))
            bad = await runtime.start_saga("trip-booking", TripData(trip_id="bad", fail_car=True))
            done_ok = await runtime.wait_for(ok.saga_id, timeout=15)
            done_bad = await runtime.wait_for(bad.saga_id, timeout=15)
    finally:
        flights.stop()

    assert flights.error is None
    assert done_ok.status is SagaStatus.COMPLETED
    assert done_ok.data["flight_id"] == "PIKA-ok"  # merged from the pika participant's reply
    assert done_bad.status is SagaStatus.COMPENSATED
    assert sorted(flights.effects) == [
        ("compensate", "bad"),
        ("execute", "bad"),
        ("execute", "ok"),
    ]
    assert ledger.of("bad") == [("hotels", "execute"), ("hotels", "compensate")]

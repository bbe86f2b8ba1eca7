"""The bench saga (three remote steps) and its participants.

``python -m sagas_rabbitmq.host bench.support.remote:participants`` serves the three
destinations in one process. The handlers do no work: the bench measures the machinery.
A command with ``fail=True`` fails the last step for good, so the saga compensates its two
earlier steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from sagas_abstractions import ParticipantError
from sagas_core import Participant, SagaBuilder

if TYPE_CHECKING:
    from sagas_core.definition import SagaDefinition

SAGA = "bench-order"
WAITING_SAGA = "bench-waiting"
STEP_TIMEOUT = 30.0


class BenchData(BaseModel):
    order_id: str
    amount: int = 1
    fail: bool = False
    reservation_id: str | None = None
    payment_id: str | None = None
    shipment_id: str | None = None


class OrderPlaced(BenchData):
    """Starts a bench saga when published (``--workers 2``: the workers share the starts)."""


class Reserve(BaseModel):
    order_id: str
    amount: int


class Reserved(BaseModel):
    reservation_id: str


class Release(BaseModel):
    order_id: str
    reservation_id: str | None = None


class Pay(BaseModel):
    order_id: str
    amount: int


class Paid(BaseModel):
    payment_id: str


class Refund(BaseModel):
    order_id: str
    payment_id: str | None = None


class Ship(BaseModel):
    order_id: str
    fail: bool = False


class Shipped(BaseModel):
    shipment_id: str


def _saga() -> SagaDefinition:
    return (
        SagaBuilder(SAGA, data=BenchData)
        .starts_on(OrderPlaced, saga_id="order_id")
        .step("reserve")
        .send(Reserve, to="bench-inventory", reply=Reserved)
        .compensate_with(Release)
        .timeout(seconds=STEP_TIMEOUT)
        .step("pay")
        .send(Pay, to="bench-payments", reply=Paid)
        .compensate_with(Refund)
        .timeout(seconds=STEP_TIMEOUT)
        .step("ship")
        .send(Ship, to="bench-shipping", reply=Shipped)
        .timeout(seconds=STEP_TIMEOUT)
        .build()
    )


def _waiting_saga() -> SagaDefinition:
    """One step to a destination nobody serves: the saga waits (for the memory measurement)."""
    return (
        SagaBuilder(WAITING_SAGA, data=BenchData)
        .step("reserve")
        .send(Reserve, to="bench-nobody", reply=Reserved)
        .timeout(minutes=60)
        .build()
    )


bench_saga = _saga()
waiting_saga = _waiting_saga()


def participants() -> list[Participant]:
    """The three participants of the bench saga."""
    inventory = Participant("bench-inventory")
    payments = Participant("bench-payments")
    shipping = Participant("bench-shipping")

    @inventory.handles(Reserve)
    async def reserve(cmd: Reserve) -> Reserved:
        return Reserved(reservation_id=f"r-{cmd.order_id}")

    @inventory.handles(Release)
    async def release(cmd: Release) -> None:
        return None

    @payments.handles(Pay)
    async def pay(cmd: Pay) -> Paid:
        return Paid(payment_id=f"p-{cmd.order_id}")

    @payments.handles(Refund)
    async def refund(cmd: Refund) -> None:
        return None

    @shipping.handles(Ship)
    async def ship(cmd: Ship) -> Shipped:
        if cmd.fail:
            raise ParticipantError("bench: this order fails at shipping", code="bench_failure")
        return Shipped(shipment_id=f"s-{cmd.order_id}")

    return [inventory, payments, shipping]

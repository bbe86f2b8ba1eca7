"""Participants with a SQL idempotency store apply each effect once, even across crashes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ParticipantError,
    ReplyStatus,
    RetryableError,
    StepKind,
)
from sagas_core import Participant
from sagas_core.codec import decode_reply, encode_command
from sagas_sqlalchemy import SqlIdempotencyStore

pytestmark = pytest.mark.integration

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Charge(BaseModel):
    order_id: str
    amount: int


class Refund(BaseModel):
    order_id: str


Setup = tuple[SqlIdempotencyStore, SqlIdempotencyStore, sa.Table]


class Crash(BaseException):
    """Stands for the process dying mid-handler: nothing below the handler catches it."""


def _command(
    saga_id: str, *, kind: StepKind = StepKind.EXECUTE, attempt: int = 1, amount: int = 5
) -> Envelope:
    compensate = kind is StepKind.COMPENSATE
    command = CommandMessage(
        message_id=f"{saga_id}:charge:{kind.value}:{attempt}",
        saga_id=saga_id,
        saga_type="checkout",
        step="charge",
        attempt=attempt,
        kind=kind,
        command_type="Refund" if compensate else "Charge",
        destination="payments",
        payload={"order_id": saga_id} if compensate else {"order_id": saga_id, "amount": amount},
        idempotency_key=f"{saga_id}:charge" + (":compensate" if compensate else ""),
        reply_to="sagas.replies.default",
        created_at=T0,
    )
    return encode_command(command)


class Payments:
    """A payments participant whose charges live in the same database as its outcomes."""

    def __init__(self, store: SqlIdempotencyStore, charges: sa.Table) -> None:
        self.crash_next = False
        self.calls = 0
        self.participant = Participant("payments", idempotency=store)

        @self.participant.handles(Charge)
        async def charge(cmd: Charge, db: AsyncConnection) -> dict[str, str]:
            self.calls += 1
            await db.execute(charges.insert().values(order_id=cmd.order_id, amount=cmd.amount))
            if self.crash_next:
                self.crash_next = False
                raise Crash
            if cmd.amount < 0:
                raise ParticipantError("negative amount", code="invalid_amount")
            if cmd.amount == 0:
                raise RetryableError("bank busy")
            await asyncio.sleep(0.05)  # widen the window a concurrent duplicate could race in
            return {"payment_id": f"P-{cmd.order_id}"}

        @self.participant.handles(Refund)
        async def refund(cmd: Refund, db: AsyncConnection) -> None:
            await db.execute(charges.delete().where(charges.c.order_id == cmd.order_id))


@pytest.fixture
async def setup(
    url: str,
) -> AsyncIterator[tuple[SqlIdempotencyStore, SqlIdempotencyStore, sa.Table]]:
    name = f"pay_{uuid.uuid4().hex[:8]}"
    first = SqlIdempotencyStore.from_url(url, table_name=f"{name}_outcomes")
    second = SqlIdempotencyStore.from_url(url, table_name=f"{name}_outcomes")
    charges = sa.Table(
        f"{name}_charges",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(100), nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
    )
    await first.create_table()
    async with first.engine.begin() as connection:
        await connection.run_sync(charges.metadata.create_all)
    try:
        yield first, second, charges
    finally:
        async with first.engine.begin() as connection:
            await connection.run_sync(charges.metadata.drop_all)
        await first.drop_table()
        await first.close()
        await second.close()


async def _charges(store: SqlIdempotencyStore, charges: sa.Table, order_id: str) -> int:
    async with store.engine.connect() as connection:
        result = await connection.execute(
            sa.select(sa.func.count()).select_from(charges).where(charges.c.order_id == order_id)
        )
        return int(result.scalar_one())


async def _reply_status(payments: Payments, envelope: Envelope) -> tuple[ReplyStatus, str | None]:
    reply = await payments.participant.process(envelope)
    assert reply is not None
    decoded = decode_reply(reply)
    return decoded.status, None if decoded.error is None else decoded.error.code


async def test_a_crash_mid_handler_leaves_no_effect_and_the_redelivery_applies_it_once(
    setup: Setup,
) -> None:
    store, _, charges = setup
    payments = Payments(store, charges)
    payments.crash_next = True
    with pytest.raises(Crash):
        await payments.participant.process(_command("o1"))
    assert await _charges(store, charges, "o1") == 0
    assert await store.get("o1:charge") is None

    assert await _reply_status(payments, _command("o1")) == (ReplyStatus.SUCCEEDED, None)
    assert await _reply_status(payments, _command("o1", attempt=2)) == (ReplyStatus.SUCCEEDED, None)
    assert await _charges(store, charges, "o1") == 1
    assert payments.calls == 2  # the crashed run and the one that committed; the retry was cached


async def test_the_same_command_in_two_processes_at_once_is_applied_once(
    setup: Setup,
) -> None:
    first_store, second_store, charges = setup
    first, second = Payments(first_store, charges), Payments(second_store, charges)
    results = await asyncio.gather(
        _reply_status(first, _command("o2")), _reply_status(second, _command("o2"))
    )
    assert list(results) == [(ReplyStatus.SUCCEEDED, None)] * 2
    assert await _charges(first_store, charges, "o2") == 1
    assert first.calls + second.calls == 1


async def test_a_permanent_failure_rolls_back_the_handlers_writes_and_is_remembered(
    setup: Setup,
) -> None:
    store, _, charges = setup
    payments = Payments(store, charges)
    assert await _reply_status(payments, _command("o3", amount=-1)) == (
        ReplyStatus.FAILED,
        "invalid_amount",
    )
    assert await _charges(store, charges, "o3") == 0
    assert await _reply_status(payments, _command("o3", amount=-1, attempt=2)) == (
        ReplyStatus.FAILED,
        "invalid_amount",
    )
    assert payments.calls == 1


async def test_a_transient_failure_is_not_remembered_so_the_retry_runs_again(
    setup: Setup,
) -> None:
    store, _, charges = setup
    payments = Payments(store, charges)
    assert (await _reply_status(payments, _command("o4", amount=0)))[0] is ReplyStatus.FAILED
    assert await store.get("o4:charge") is None
    await _reply_status(payments, _command("o4", amount=0, attempt=2))
    assert payments.calls == 2
    assert await _charges(store, charges, "o4") == 0


async def test_an_execute_arriving_after_its_compensation_in_another_process_is_cancelled(
    setup: Setup,
) -> None:
    first_store, second_store, charges = setup
    first, second = Payments(first_store, charges), Payments(second_store, charges)
    assert await _reply_status(first, _command("o5", kind=StepKind.COMPENSATE)) == (
        ReplyStatus.SUCCEEDED,
        None,
    )
    assert await _reply_status(second, _command("o5")) == (ReplyStatus.FAILED, "cancelled")
    assert await _charges(first_store, charges, "o5") == 0
    assert second.calls == 0


async def test_prune_removes_old_outcomes(
    setup: Setup,
) -> None:
    store, _, charges = setup
    payments = Payments(store, charges)
    await _reply_status(payments, _command("o6"))
    assert await store.prune(recorded_before=datetime.now(UTC) - timedelta(days=1)) == 0
    assert await store.prune(recorded_before=datetime.now(UTC) + timedelta(seconds=1)) >= 1
    assert await store.get("o6:charge") is None


async def test_handlers_asking_for_the_transaction_pass_the_dependency_check(
    setup: Setup,
) -> None:
    store, _, charges = setup
    Payments(store, charges).participant.check_dependencies()  # AsyncConnection comes from it

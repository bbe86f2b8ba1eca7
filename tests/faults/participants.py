"""The order saga's participants for the fault suite, each run as a process of its own.

``python -m sagas_rabbitmq.host tests.faults.participants:payments --prefix <run> ...``

Every effect goes into the run's ledger table, whose UNIQUE key is (saga_id, step, kind), in the
same transaction as the participant's recorded outcome (:class:`SqlIdempotencyStore`; the
handler gets that transaction as its ``db: AsyncConnection`` parameter). So exactly-once is
structural: a second effect for one step would violate the key, and with the transactional store
it must never even be attempted. If one is, the handler notes it in the append-only ``attempts``
table (written outside the transaction, so it survives the rollback) and fails.

Each handler run also appends an ``attempts`` row before it touches the ledger: more runs than
effects show that commands were redelivered (a participant killed mid-handler, a duplicate).

Compensations undo only what was applied: they look for the forward row inside their own
transaction (execute and compensate of a step are serialized by the store's step lock) and are
no-ops without one.

Seeded failure modes (permanent, so the saga compensates): SKU ``GHOST-0`` is unknown, card
``tok_declined`` is declined, region ``atlantis`` is not served. A charge on card
``tok_norefund`` can never be refunded (the refund keeps failing, retryably): with region
``atlantis`` that saga must end ``failed``, its refund parked in the dead-letter queue.

Environment: ``FAULTS_DATABASE_URL`` and ``FAULTS_TABLE_PREFIX`` (the run's tables, created by
the test before the processes start), ``FAULTS_HANDLER_DELAY`` (max seconds a handler holds its
transaction open after writing its effect, to widen the kill-mid-handler window).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sagas_abstractions import ParticipantError, RetryableError
from sagas_core import CommandContext, Participant
from sagas_sqlalchemy import SqlIdempotencyStore
from samples.order_processing.messages import (
    CancelShipment,
    CreateShipment,
    InventoryReserved,
    PaymentProcessed,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
    ShipmentCreated,
)

DATABASE_URL_ENV = "FAULTS_DATABASE_URL"
TABLE_PREFIX_ENV = "FAULTS_TABLE_PREFIX"
HANDLER_DELAY_ENV = "FAULTS_HANDLER_DELAY"

UNKNOWN_SKU = "GHOST-0"
DECLINED_CARD = "tok_declined"
NO_REFUND_CARD = "tok_norefund"
_NO_REFUND = "PAY-NR-"
UNSERVED_REGION = "atlantis"

_log = logging.getLogger("sagas.faults.participants")


@dataclass(frozen=True)
class FaultTables:
    """The run's participant-side tables."""

    metadata: sa.MetaData
    ledger: sa.Table
    attempts: sa.Table
    outcomes_name: str


def fault_tables(prefix: str) -> FaultTables:
    """The ledger, the attempts log and the outcomes table name of the run ``prefix``."""
    metadata = sa.MetaData()
    ledger = sa.Table(
        f"{prefix}ledger",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("effect", sa.String(20), nullable=False),
        sa.Column("ref", sa.String(200), nullable=False),
        sa.Column("amount", sa.String(40), nullable=True),
        sa.Column("message_id", sa.String(400), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("saga_id", "step", "kind", name=f"uq_{prefix}ledger_effect"),
    )
    attempts = sa.Table(
        f"{prefix}attempts",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("saga_id", sa.String(200), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("message_id", sa.String(400), nullable=False),
        sa.Column("idempotency_key", sa.String(400), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("note", sa.String(40), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    return FaultTables(metadata, ledger, attempts, f"{prefix}outcomes")


class _Effects:
    """Writes one process's effects and attempts."""

    def __init__(self, tables: FaultTables, log_engine: AsyncEngine, delay: float) -> None:
        self.tables = tables
        self.log_engine = log_engine
        self.delay = delay
        self.pid = os.getpid()

    async def note(self, ctx: CommandContext, note: str) -> None:
        """Append to the attempts log, outside the handler's transaction."""
        try:
            async with self.log_engine.begin() as conn:
                await conn.execute(
                    self.tables.attempts.insert().values(
                        saga_id=ctx.saga_id,
                        step=ctx.step,
                        kind=ctx.kind.value,
                        attempt=ctx.attempt,
                        message_id=ctx.message_id,
                        idempotency_key=ctx.idempotency_key,
                        pid=self.pid,
                        note=note,
                    )
                )
        except Exception:  # a log row must never decide a handler's outcome
            _log.exception("could not log attempt %s (%s)", ctx.message_id, note)
            if note == "duplicate":
                raise

    async def apply(
        self, db: AsyncConnection, ctx: CommandContext, effect: str, ref: str, amount: str | None
    ) -> None:
        """Record the forward effect in the handler's transaction (exactly once, by the key)."""
        await self.note(ctx, "run")
        await self._insert(db, ctx, effect, ref, amount)

    async def undo(
        self,
        db: AsyncConnection,
        ctx: CommandContext,
        effect: str,
        refuse: Callable[[str], bool] = lambda _ref: False,
    ) -> bool:
        """Record the undo of the step's forward effect if there is one; else do nothing.

        Raises:
            RetryableError: ``refuse`` says this forward effect cannot be undone (now).
        """
        await self.note(ctx, "run")
        ledger = self.tables.ledger
        forward = (
            await db.execute(
                sa.select(ledger.c.ref, ledger.c.amount).where(
                    ledger.c.saga_id == ctx.saga_id,
                    ledger.c.step == ctx.step,
                    ledger.c.kind == "execute",
                )
            )
        ).first()
        if forward is None:
            await self.note(ctx, "noop")
            return False
        if refuse(forward.ref):
            await self.note(ctx, "refused")
            raise RetryableError(f"{forward.ref} cannot be undone now", code="undo_unavailable")
        await self._insert(db, ctx, effect, forward.ref, forward.amount)
        return True

    async def _insert(
        self, db: AsyncConnection, ctx: CommandContext, effect: str, ref: str, amount: str | None
    ) -> None:
        try:
            async with db.begin_nested():
                await db.execute(
                    self.tables.ledger.insert().values(
                        saga_id=ctx.saga_id,
                        step=ctx.step,
                        kind=ctx.kind.value,
                        effect=effect,
                        ref=ref,
                        amount=amount,
                        message_id=ctx.message_id,
                        attempt=ctx.attempt,
                        pid=self.pid,
                    )
                )
        except IntegrityError:
            # The transactional store must make this impossible: leave the evidence, then fail.
            await self.note(ctx, "duplicate")
            raise
        if self.delay:
            await asyncio.sleep(random.uniform(0, self.delay))


async def _open(destination: str) -> tuple[Participant, _Effects]:
    url = os.environ[DATABASE_URL_ENV]
    tables = fault_tables(os.environ[TABLE_PREFIX_ENV])
    delay = float(os.environ.get(HANDLER_DELAY_ENV, "0.3"))
    store = SqlIdempotencyStore.from_url(
        url, table_name=tables.outcomes_name, pool_size=4, max_overflow=2
    )
    log_engine = create_async_engine(url, pool_size=1, max_overflow=2, pool_pre_ping=True)
    participant = Participant(destination, idempotency=store)
    return participant, _Effects(tables, log_engine, delay)


async def inventory() -> Participant:
    """The inventory participant (reserve / release)."""
    participant, effects = await _open("inventory")

    @participant.handles(ReserveInventory)
    async def reserve(
        cmd: ReserveInventory, db: AsyncConnection, ctx: CommandContext
    ) -> InventoryReserved:
        if any(line.sku == UNKNOWN_SKU for line in cmd.lines):
            raise ParticipantError(f"unknown SKU {UNKNOWN_SKU}", code="unknown_sku")
        reservation_id = f"RSV-{ctx.saga_id}"
        await effects.apply(db, ctx, "reserve", reservation_id, None)
        return InventoryReserved(reservation_id=reservation_id)

    @participant.handles(ReleaseInventory)
    async def release(cmd: ReleaseInventory, db: AsyncConnection, ctx: CommandContext) -> None:
        await effects.undo(db, ctx, "release")

    return participant


async def payments() -> Participant:
    """The payments participant (charge / refund)."""
    participant, effects = await _open("payments")

    @participant.handles(ProcessPayment)
    async def charge(
        cmd: ProcessPayment, db: AsyncConnection, ctx: CommandContext
    ) -> PaymentProcessed:
        if cmd.card_token == DECLINED_CARD:
            raise ParticipantError("card declined by issuer", code="card_declined")
        payment_id = f"{_NO_REFUND if cmd.card_token == NO_REFUND_CARD else 'PAY-'}{ctx.saga_id}"
        await effects.apply(db, ctx, "charge", payment_id, str(cmd.amount))
        return PaymentProcessed(payment_id=payment_id)

    @participant.handles(RefundPayment)
    async def refund(cmd: RefundPayment, db: AsyncConnection, ctx: CommandContext) -> None:
        # The ledger's charge decides, not cmd.payment_id (None when the charge's reply was lost).
        await effects.undo(db, ctx, "refund", refuse=lambda ref: ref.startswith(_NO_REFUND))

    return participant


async def shipping() -> Participant:
    """The shipping participant (ship / cancel)."""
    participant, effects = await _open("shipping")

    @participant.handles(CreateShipment)
    async def ship(
        cmd: CreateShipment, db: AsyncConnection, ctx: CommandContext
    ) -> ShipmentCreated:
        if cmd.region == UNSERVED_REGION:
            raise ParticipantError(
                f"no carrier serves {UNSERVED_REGION}", code="region_unavailable"
            )
        shipment_id = f"SHP-{ctx.saga_id}"
        await effects.apply(db, ctx, "ship", shipment_id, None)
        return ShipmentCreated(shipment_id=shipment_id)

    @participant.handles(CancelShipment)
    async def cancel(cmd: CancelShipment, db: AsyncConnection, ctx: CommandContext) -> None:
        await effects.undo(db, ctx, "cancel")

    return participant

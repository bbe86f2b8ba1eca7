"""The inventory-reservation sample: sagas started, advanced and cancelled by cart events."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from sagas_abstractions import ParticipantError, SagaStatus
from sagas_core import close_store, open_store
from sagas_core.codec import HEADER_REASON
from sagas_core.testing import SagaTestHarness
from samples.inventory_reservation.__main__ import main
from samples.inventory_reservation.demo import run_demo
from samples.inventory_reservation.inventory import Hold, Inventory, inventory_participant
from samples.inventory_reservation.messages import (
    CartCleared,
    CommitStock,
    ItemAdded,
    ItemRemoved,
    OrderCompleted,
    ReleaseStock,
    ReserveStock,
)
from samples.inventory_reservation.saga import RESERVATION_TTL, inventory_reservation_saga

CART = "cart-1"


def _added(line: str = "L1", sku: str = "MUG-1", quantity: int = 2) -> ItemAdded:
    return ItemAdded(cart_id=CART, line_id=line, sku=sku, quantity=quantity)


def _ordered(*lines: str) -> OrderCompleted:
    return OrderCompleted(cart_id=CART, order_id="ORD-1001", line_ids=list(lines or ["L1"]))


def _stubbed(*scripted_by_test: type[BaseModel]) -> SagaTestHarness:
    """A harness whose inventory stub succeeds, except the commands the test scripts itself."""
    harness = SagaTestHarness(inventory_reservation_saga)
    replies: list[tuple[type[BaseModel], dict[str, str]]] = [
        (ReserveStock, {"reservation_id": "RSV-1"}),
        (ReleaseStock, {}),
        (CommitStock, {}),
    ]
    for command, reply in replies:
        if command not in scripted_by_test:
            harness.stub("inventory").on(command).succeed(reply)
    return harness


def _with_inventory() -> tuple[SagaTestHarness, Inventory]:
    """A harness serving the real inventory (confirming every SKU at once: the clock is fake)."""
    inventory = Inventory(slow_skus=frozenset())
    harness = SagaTestHarness(inventory_reservation_saga)
    harness.add_participant(inventory_participant(inventory))
    return harness, inventory


# Starting and committing --------------------------------------------------------------------


async def test_an_added_item_starts_its_line_saga_which_reserves_and_waits_for_the_order() -> None:
    harness = _stubbed()

    outcome = await harness.publish(_added(quantity=2))

    assert outcome.started == ["cart-1:L1"]
    saga = await harness.saga("cart-1:L1")
    assert saga.status is SagaStatus.RUNNING
    assert saga.current_step_name == "await-order"
    assert saga.data["reservation_id"] == "RSV-1"
    assert harness.commands("cart-1:L1") == ["ReserveStock"]
    reserve = harness.stub("inventory").on(ReserveStock).received[0]
    assert reserve.payload == {"cart_id": CART, "line_id": "L1", "sku": "MUG-1", "quantity": 2}


async def test_one_order_for_two_lines_commits_each_line_under_the_order_id() -> None:
    harness = _stubbed()
    await harness.publish(_added("L1"))
    await harness.publish(_added("L2", sku="TEE-2", quantity=1))

    outcome = await harness.publish(_ordered("L1", "L2"))

    assert outcome.applied == ["cart-1:L1", "cart-1:L2"]
    for saga_id in ("cart-1:L1", "cart-1:L2"):
        saga = await harness.saga(saga_id)
        assert saga.status is SagaStatus.COMPLETED
        assert saga.data["order_id"] == "ORD-1001"
        assert harness.commands(saga_id) == ["ReserveStock", "CommitStock"]
    commits = harness.stub("inventory").on(CommitStock).received
    assert [c.payload["order_id"] for c in commits] == ["ORD-1001", "ORD-1001"]


async def test_real_inventory_moves_the_ordered_units_from_reserved_to_committed() -> None:
    harness, inventory = _with_inventory()

    await harness.publish(_added(quantity=2))
    assert (inventory.stock["MUG-1"].available, inventory.stock["MUG-1"].reserved) == (18, 2)
    await harness.publish(_ordered())

    mugs = inventory.stock["MUG-1"]
    assert (mugs.available, mugs.reserved, mugs.committed) == (18, 0, 2)
    assert inventory.effects("cart-1:L1") == ["reserve", "commit"]
    assert inventory.adds_up


# Releasing ----------------------------------------------------------------------------------


async def test_removing_a_line_releases_its_stock() -> None:
    harness, inventory = _with_inventory()
    await harness.publish(_added(quantity=3))

    outcome = await harness.publish(ItemRemoved(cart_id=CART, line_id="L1"))

    assert outcome.applied == ["cart-1:L1"]
    saga = await harness.saga("cart-1:L1")
    assert saga.status is SagaStatus.COMPENSATED
    assert saga.error is not None
    assert saga.error.code == "cancelled_by_event"
    assert harness.compensations("cart-1:L1") == ["ReleaseStock"]
    assert inventory.effects("cart-1:L1") == ["reserve", "release"]
    assert inventory.stock["MUG-1"].available == 20
    assert inventory.adds_up


async def test_clearing_the_cart_releases_every_line_it_names() -> None:
    harness, inventory = _with_inventory()
    for line, sku in (("L1", "MUG-1"), ("L2", "TEE-2"), ("L3", "MUG-1")):
        await harness.publish(_added(line, sku=sku, quantity=2))

    outcome = await harness.publish(CartCleared(cart_id=CART, line_ids=["L1", "L2", "L3"]))

    assert sorted(outcome.applied) == ["cart-1:L1", "cart-1:L2", "cart-1:L3"]
    for line in ("L1", "L2", "L3"):
        assert (await harness.saga(f"cart-1:{line}")).status is SagaStatus.COMPENSATED
        assert inventory.state_of(f"cart-1:{line}") is Hold.RELEASED
    assert all(level.reserved == 0 for level in inventory.stock.values())
    assert (inventory.stock["MUG-1"].available, inventory.stock["TEE-2"].available) == (20, 10)
    assert inventory.adds_up


async def test_an_abandoned_reservation_is_released_when_its_ttl_expires() -> None:
    harness, inventory = _with_inventory()
    await harness.publish(_added(quantity=2))

    await harness.advance(RESERVATION_TTL - timedelta(seconds=1))
    assert (await harness.saga("cart-1:L1")).status is SagaStatus.RUNNING
    assert inventory.stock["MUG-1"].reserved == 2
    await harness.advance(timedelta(seconds=2))

    saga = await harness.saga("cart-1:L1")
    assert saga.status is SagaStatus.COMPENSATED
    assert saga.error is not None
    assert saga.error.code == "timeout"
    assert await harness.compensated_steps("cart-1:L1") == ["reserve"]
    assert inventory.stock["MUG-1"].available == 20
    assert inventory.adds_up


# Failure paths ------------------------------------------------------------------------------


async def test_a_duplicate_item_added_starts_one_saga_and_reserves_once() -> None:
    harness, inventory = _with_inventory()

    first = await harness.publish(_added(quantity=2), message_id="cart-svc-1")
    redelivered = await harness.publish(_added(quantity=2), message_id="cart-svc-1")
    republished = await harness.publish(_added(quantity=2), message_id="cart-svc-2")

    assert first.started == ["cart-1:L1"]
    assert redelivered.started == republished.started == []
    assert redelivered.ignored == republished.ignored == ["cart-1:L1"]
    assert [s.saga_id for s in await harness.store.find(limit=10)] == ["cart-1:L1"]
    assert harness.commands() == ["ReserveStock"]
    assert inventory.effects("cart-1:L1") == ["reserve"]
    assert inventory.stock["MUG-1"].reserved == 2


async def test_out_of_stock_fails_the_reservation_and_there_is_nothing_to_release() -> None:
    harness, inventory = _with_inventory()

    await harness.publish(_added(sku="LAMP-3", quantity=2))  # one lamp left

    saga = await harness.saga("cart-1:L1")
    assert saga.status is SagaStatus.COMPENSATED
    assert saga.error is not None
    assert saga.error.code == "out_of_stock"
    assert harness.commands("cart-1:L1") == ["ReserveStock"]
    assert harness.compensations("cart-1:L1") == []
    assert inventory.effects("cart-1:L1") == []
    assert inventory.stock["LAMP-3"].available == 1
    assert inventory.adds_up


async def test_removing_a_line_after_its_order_was_committed_changes_nothing() -> None:
    harness, inventory = _with_inventory()
    await harness.publish(_added(quantity=2))
    await harness.publish(_ordered())

    outcome = await harness.publish(ItemRemoved(cart_id=CART, line_id="L1"))

    assert outcome.ignored == ["cart-1:L1"]
    assert outcome.dead_letter == []
    assert (await harness.saga("cart-1:L1")).status is SagaStatus.COMPLETED
    assert harness.compensations("cart-1:L1") == []
    assert inventory.stock["MUG-1"].committed == 2


async def test_a_removal_or_a_cleared_cart_naming_lines_without_a_saga_is_ignored() -> None:
    harness = _stubbed()

    removed = await harness.publish(ItemRemoved(cart_id=CART, line_id="L5"))
    cleared = await harness.publish(CartCleared(cart_id=CART, line_ids=["L6", "L7"]))

    assert removed.ignored == ["cart-1:L5"]
    assert cleared.ignored == ["cart-1:L6", "cart-1:L7"]
    assert removed.dead_letter == cleared.dead_letter == []
    assert harness.dead_letters == []
    assert await harness.store.find(limit=10) == []


async def test_an_order_for_a_line_without_a_saga_is_dead_lettered() -> None:
    harness = _stubbed()
    await harness.publish(_added("L1"))

    outcome = await harness.publish(_ordered("L1", "L9"), message_id="order-svc-7")

    assert outcome.applied == ["cart-1:L1"]  # the line that holds stock is still committed
    assert len(outcome.dead_letter) == 1
    assert "cart-1:L9, which does not exist" in outcome.dead_letter[0]
    [letter] = harness.dead_letters
    assert letter.message_id == "order-svc-7"
    assert "cart-1:L9" in letter.headers[HEADER_REASON]
    assert (await harness.saga("cart-1:L1")).status is SagaStatus.COMPLETED


async def test_an_order_that_arrives_before_the_stock_is_held_is_kept_then_commits() -> None:
    harness = _stubbed(ReserveStock)
    harness.stub("inventory").on(ReserveStock).succeed({"reservation_id": "RSV-1"}, after=1)
    await harness.publish(_added())
    assert (await harness.saga("cart-1:L1")).current_step_name == "reserve"

    outcome = await harness.publish(_ordered())

    assert outcome.kept == ["cart-1:L1"]
    waiting = await harness.saga("cart-1:L1")
    assert waiting.current_step_name == "reserve"
    assert waiting.steps[1].early_event is not None
    assert waiting.steps[1].early_event["order_id"] == "ORD-1001"
    assert harness.commands("cart-1:L1") == ["ReserveStock"]
    await harness.advance(1)  # the reservation is confirmed; the kept order completes the wait
    saga = await harness.saga("cart-1:L1")
    assert saga.status is SagaStatus.COMPLETED
    assert saga.data["order_id"] == "ORD-1001"
    assert harness.commands("cart-1:L1") == ["ReserveStock", "CommitStock"]


async def test_an_order_after_the_ttl_released_the_line_is_dead_lettered() -> None:
    # A saga that can no longer use the event is as telling as a missing one: same policy.
    harness = _stubbed()
    await harness.publish(_added())
    await harness.advance(RESERVATION_TTL + timedelta(seconds=1))

    outcome = await harness.publish(_ordered())

    assert outcome.ignored == []
    assert len(outcome.dead_letter) == 1
    assert "saga is compensated" in outcome.dead_letter[0]
    assert len(harness.dead_letters) == 1
    assert (await harness.saga("cart-1:L1")).status is SagaStatus.COMPENSATED


class _LooseItemAdded(BaseModel):
    """What a buggy cart service might publish on the ``ItemAdded`` topic."""

    cart_id: str
    line_id: str
    sku: str
    quantity: int | str


@pytest.mark.parametrize("quantity", ["two", 0])
async def test_an_item_added_whose_body_does_not_fit_is_dead_lettered_naming_the_field(
    quantity: int | str,
) -> None:
    harness = _stubbed()
    bad = _LooseItemAdded(cart_id=CART, line_id="L1", sku="MUG-1", quantity=quantity)

    outcome = await harness.publish(bad, topic="ItemAdded", message_id="cart-svc-9")

    assert outcome.started == []
    [reason] = outcome.dead_letter
    assert "ItemAdded" in reason
    assert "quantity" in reason
    [letter] = harness.dead_letters
    assert letter.message_id == "cart-svc-9"
    assert "quantity" in letter.headers[HEADER_REASON]
    assert await harness.store.find(limit=10) == []
    assert harness.commands() == []


# The inventory on its own -------------------------------------------------------------------


async def test_a_reservation_repeated_with_its_idempotency_key_holds_the_units_once() -> None:
    inventory = Inventory(slow_skus=frozenset())

    first = await inventory.reserve(CART, "L1", "TEE-2", 3, key="k-1")
    again = await inventory.reserve(CART, "L1", "TEE-2", 3, key="k-1")

    assert first == again
    assert inventory.stock["TEE-2"].reserved == 3
    assert inventory.effects("cart-1:L1") == ["reserve"]
    assert inventory.adds_up


async def test_a_release_before_its_reservation_is_a_no_op_and_the_late_one_holds_none() -> None:
    inventory = Inventory(slow_skus=frozenset())

    inventory.release(CART, "L1")  # cancelled while its reservation was still in flight
    assert inventory.effects("cart-1:L1") == []
    assert inventory.stock["MUG-1"].available == 20
    with pytest.raises(ParticipantError) as late:
        await inventory.reserve(CART, "L1", "MUG-1", 2, key="k-1")

    assert late.value.code == "released"
    assert inventory.stock["MUG-1"].available == 20
    assert inventory.state_of("cart-1:L1") is None
    assert inventory.adds_up


async def test_a_commit_is_applied_once_and_a_release_after_it_gives_nothing_back() -> None:
    inventory = Inventory(slow_skus=frozenset())
    await inventory.reserve(CART, "L1", "MUG-1", 2, key="k-1")

    inventory.commit(CART, "L1")
    inventory.commit(CART, "L1")
    inventory.release(CART, "L1")

    mugs = inventory.stock["MUG-1"]
    assert (mugs.available, mugs.reserved, mugs.committed) == (18, 0, 2)
    assert inventory.effects("cart-1:L1") == ["reserve", "commit"]
    with pytest.raises(ParticipantError, match="holds no stock"):
        inventory.commit(CART, "L2")


# The demo -----------------------------------------------------------------------------------


async def test_the_demo_on_a_sqlite_file_ends_every_line_as_expected_and_the_ledger_adds_up(
    tmp_path: Path,
) -> None:
    store = await open_store(sqlite_path=tmp_path / "sagas.sqlite3")
    try:
        run = await run_demo(store=store, settle_within=10)
    finally:
        await close_store(store)

    assert [f"{r.cart}/{r.line}" for r in run.results if not r.as_expected] == []
    assert run.inventory.adds_up
    levels = {
        sku: (level.available, level.reserved, level.committed)
        for sku, level in run.inventory.stock.items()
    }
    # Committed: cart-1 (2 mugs, 1 tee), cart-4 (2 tees), cart-6 (1 sofa); the rest went back.
    assert levels == {
        "MUG-1": (18, 0, 2),
        "TEE-2": (7, 0, 3),
        "LAMP-3": (1, 0, 0),
        "SOFA-7": (2, 0, 1),
    }


def test_the_command_line_runs_twice_on_the_embedded_default_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "sagas.sqlite3"
    monkeypatch.setenv("SAGAS_SQLITE_PATH", str(database))

    assert main([]) == 0
    # The second run's carts (and so saga ids) must not collide with the first run's sagas.
    assert main([]) == 0
    assert database.exists()

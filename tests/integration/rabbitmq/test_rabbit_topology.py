"""Names, arguments and settings of the RabbitMQ transport (pure: no broker traffic)."""

from __future__ import annotations

import pytest

from sagas_abstractions import RouteKind
from sagas_rabbitmq import RabbitSettings, Topology
from sagas_rabbitmq.bus import _safe_url
from sagas_rabbitmq.topology import queue_safe
from sagas_rabbitmq.wire import header_text

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


def test_every_name_carries_the_prefix() -> None:
    topology = Topology(prefix="shop")

    assert [name for name, _ in topology.exchanges()] == [
        "shop.dead-letter",
        "shop.commands",
        "shop.replies",
        "shop.events",
    ]
    assert topology.command_queue("inventory") == "shop.commands.inventory"
    assert topology.reply_queue("shop.replies.default") == "shop.replies.default"
    assert topology.reply_queue("sagas.replies.default") == "shop.replies.sagas.replies.default"
    assert topology.event_queue("order.completed") == "shop.events.default.order.completed"
    assert topology.event_queue("order.completed", 2) == "shop.events.default.order.completed.2"
    assert topology.dead_letter_queue == "shop.dead-letter"


def test_wildcards_become_valid_and_distinct_queue_names() -> None:
    names = {queue_safe(pattern) for pattern in ("order.*", "order.#", "order.any", "order.all")}

    assert len(names) == 4
    assert queue_safe("order.*").startswith("order.any.")
    assert queue_safe("inventory-eu_1:a") == "inventory-eu_1:a"


def test_only_events_are_published_without_mandatory() -> None:
    assert [route for route in RouteKind if not Topology.mandatory(route)] == [RouteKind.EVENT]


def test_classic_queues_have_a_dead_letter_exchange_but_no_delivery_limit() -> None:
    arguments = Topology(prefix="shop", quorum=False).queue_arguments()

    assert arguments == {"x-queue-type": "classic", "x-dead-letter-exchange": "shop.dead-letter"}


@pytest.mark.parametrize(
    "changes",
    [
        {"prefix": ""},
        {"prefix": "a b"},
        {"delivery_limit": -1},
        {"prefetch": 0},
        {"publish_timeout": 0},
        {"instance_id": ""},
        {"instance_id": "pod 1"},
        {"instance_id": "-pod"},
        {"instance_id": "x" * 65},
    ],
)
def test_settings_refuse_values_that_cannot_work(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        RabbitSettings(**changes)  # type: ignore[arg-type]


def test_header_values_become_text() -> None:
    assert header_text("a") == "a"
    assert header_text(b"b") == "b"
    assert header_text(3) == "3"
    assert header_text(True) == "true"
    assert header_text([{"reason": "rejected"}]) == '[{"reason":"rejected"}]'


def test_urls_in_messages_hide_the_password() -> None:
    assert _safe_url("amqp://user:secret@host:5672/vh") == "amqp://user:***@host:5672/vh"
    assert _safe_url("amqp://host/") == "amqp://host/"


def test_the_public_names_are_pinned() -> None:
    import sagas_rabbitmq  # noqa: PLC0415

    assert sagas_rabbitmq.__all__ == [
        "DEAD_LETTER_REASON_HEADER",
        "DELIVERY_COUNT_HEADER",
        "RabbitBus",
        "RabbitSettings",
        "RabbitSubscription",
        "Topology",
    ]
    assert all(getattr(sagas_rabbitmq, name).__doc__ for name in ("RabbitBus", "RabbitSettings"))

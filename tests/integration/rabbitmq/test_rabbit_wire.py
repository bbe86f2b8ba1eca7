"""The content header frame the bus encodes itself is pamqp's, byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp.header import ContentHeader

from sagas_abstractions import Envelope, RouteKind
from sagas_rabbitmq.wire import amqp_properties, content_header_frame
from tests.integration.rabbitmq.test_rabbit_bus import envelope


def _pamqp(message: Envelope, channel: int) -> bytes:
    header = ContentHeader(properties=amqp_properties(message), body_size=len(message.body))
    return pamqp.frame.marshal(header, channel)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"headers": {}},
        {"correlation_id": None, "reply_to": None},
        {"correlation_id": "", "reply_to": "", "message_type": ""},
        {"body": b""},
        {"headers": {"x-saga-step": "réserver ✓", "b": "", "a": "x" * 70_000}},
        {"timestamp": datetime(2031, 5, 6, 7, 8, 9, 999_999, tzinfo=timezone(timedelta(hours=5)))},
        {"message_id": "é" * 127, "reply_to": "r" * 255},
        {"user_id": "shipping-service"},
        {"user_id": "", "message_type": "ShipmentCreated"},
    ],
    ids=[
        "protocol",
        "no-headers",
        "no-correlation-or-reply-to",
        "empty-strings",
        "empty-body",
        "unicode-and-long-headers",
        "other-time-zone",
        "longest-short-strings",
        "user-id",
        "empty-user-id",
    ],
)
def test_the_content_header_frame_is_pamqps(changes: dict[str, object]) -> None:
    message = envelope(RouteKind.COMMAND, "inventory", **changes)

    assert content_header_frame(message, 1) == _pamqp(message, 1)
    assert content_header_frame(message, 65535) == _pamqp(message, 65535)


def test_what_pamqp_refuses_is_refused_the_same_way() -> None:
    message = envelope(RouteKind.COMMAND, "inventory", message_id="m" * 256)

    with pytest.raises(TypeError, match="255"):
        _pamqp(message, 1)
    with pytest.raises(TypeError, match="255"):
        content_header_frame(message, 1)


def test_a_header_key_pamqp_truncates_goes_through_pamqp() -> None:
    message = envelope(RouteKind.COMMAND, "inventory", headers={"k" * 200: "v"})

    assert content_header_frame(message, 3) == _pamqp(message, 3)


_text = st.text(max_size=40)


_envelopes = st.builds(
    Envelope,
    route=st.just(RouteKind.REPLY),
    key=st.just("replies"),
    message_id=st.text(min_size=1, max_size=40),
    message_type=_text,
    correlation_id=st.none() | _text,
    reply_to=st.none() | _text,
    headers=st.dictionaries(st.text(max_size=20), _text, max_size=8),
    body=st.binary(max_size=64),
    timestamp=st.integers(min_value=0, max_value=4_000_000_000).map(
        lambda seconds: datetime.fromtimestamp(seconds, UTC)
    ),
)


@given(message=_envelopes)
def test_any_envelope_encodes_as_pamqp_would(message: Envelope) -> None:
    assert content_header_frame(message, 7) == _pamqp(message, 7)

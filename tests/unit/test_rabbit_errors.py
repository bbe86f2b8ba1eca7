"""Which broker failures hold a delivery (``BusUnavailable``) and which count against it."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

import aiormq.exceptions
import pytest
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from sagas_abstractions import BusUnavailable, Envelope, PublishError, RouteKind, Unavailable
from sagas_rabbitmq.errors import broker_unavailable, publish_error


def _reply() -> Envelope:
    return Envelope(
        route=RouteKind.REPLY,
        key="sagas.replies.orders",
        message_id="saga-1:reserve:execute:1:reply",
        message_type="InventoryReserved",
        correlation_id="saga-1",
        headers={"x-saga-type": "order", "x-saga-step": "reserve"},
        body=b"{}",
        timestamp=datetime(2030, 1, 1, tzinfo=UTC),
    )


def _unroutable() -> BaseException:
    returned = DeliveredMessage(
        delivery=Basic.Return(312, "NO_ROUTE", "sagas.replies", "gone"),
        header=ContentHeader(),
        body=b"",
        channel=None,  # type: ignore[arg-type]  # the error never reads it
    )
    return aiormq.exceptions.PublishError(returned, Basic.Return())


def _tls_refused() -> BaseException:
    error = aiormq.exceptions.AMQPConnectionError("handshake failed")
    refused = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    refused.reason = "WRONG_VERSION_NUMBER"  # what the ssl module sets on the errors it raises
    error.__cause__ = refused
    return error


@pytest.mark.parametrize(
    "failure",
    [
        ChannelInvalidStateError("<RobustChannel> closed"),
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED - broker forced closure"),
        aiormq.exceptions.AMQPConnectionError("connection lost"),
        aiormq.exceptions.ChannelClosed(None, None),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
    ],
    ids=[
        "channel-recovering",
        "connection-forced",
        "connection-lost",
        "channel-closed",
        "reset",
        "confirm-timeout",
    ],
)
def test_a_publish_that_meets_a_connection_down_is_bus_unavailable(
    failure: BaseException,
) -> None:
    error = publish_error(_reply(), failure)

    assert broker_unavailable(failure)
    assert isinstance(error, BusUnavailable)
    assert isinstance(error, Unavailable)  # held by the bus, not counted
    assert isinstance(error, PublishError)  # callers that catch PublishError still do
    assert error.saga_id == "saga-1"
    assert error.step == "reserve"


@pytest.mark.parametrize(
    "failure",
    [
        _unroutable(),
        aiormq.exceptions.DeliveryError(None, Basic.Nack()),
        aiormq.exceptions.ChannelNotFoundEntity(404, "NOT_FOUND - no exchange"),
        aiormq.exceptions.ChannelAccessRefused(403, "ACCESS_REFUSED"),
        _tls_refused(),
        ValueError("not a broker failure"),
    ],
    ids=["unroutable", "nacked", "no-exchange", "access-refused", "tls", "other"],
)
def test_a_publish_refused_for_what_it_is_counts_against_the_message(
    failure: BaseException,
) -> None:
    error = publish_error(_reply(), failure)

    assert not broker_unavailable(failure)
    assert type(error) is PublishError
    assert "saga-1:reserve:execute:1:reply" in str(error)

"""The wire codec: logical messages <-> envelopes, and protocol violations named precisely."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from sagas_abstractions import (
    CommandMessage,
    DeadLetterMessage,
    Envelope,
    ErrorInfo,
    EventKind,
    MessageDecodeError,
    ReplyMessage,
    ReplyStatus,
    RouteKind,
    SagaEvent,
    SagaStatus,
    StepKind,
)
from sagas_core.codec import (
    DEAD_LETTER_KEY,
    EVENT_TYPE,
    HEADER_ATTEMPT,
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_IN_REPLY_TO,
    HEADER_KIND,
    HEADER_REASON,
    HEADER_SAGA_TYPE,
    HEADER_STEP,
    REPLY_TYPE,
    decode_command,
    decode_event,
    decode_reply,
    encode_answer,
    encode_command,
    encode_dead_letter,
    encode_event,
    encode_reply,
)

AT = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def command(**changes: Any) -> CommandMessage:
    fields: dict[str, Any] = {
        "message_id": "saga-1:reserve:execute:1",
        "saga_id": "saga-1",
        "saga_type": "order",
        "step": "reserve",
        "attempt": 1,
        "kind": StepKind.EXECUTE,
        "command_type": "ReserveInventory",
        "destination": "inventory",
        "payload": {"sku": "A-1", "qty": 2, "note": "größe ✓", "lines": [{"n": 1}]},
        "idempotency_key": "saga-1:reserve",
        "reply_to": "sagas.replies.default",
        "created_at": AT,
        "headers": {"traceparent": TRACEPARENT},
    }
    fields.update(changes)
    return CommandMessage(**fields)


def reply(**changes: Any) -> ReplyMessage:
    fields: dict[str, Any] = {
        "message_id": "saga-1:reserve:execute:1:reply",
        "saga_id": "saga-1",
        "saga_type": "order",
        "step": "reserve",
        "attempt": 1,
        "kind": StepKind.EXECUTE,
        "status": ReplyStatus.SUCCEEDED,
        "data": {"reservation_id": "r-1"},
        "in_reply_to": "saga-1:reserve:execute:1",
        "created_at": AT,
    }
    fields.update(changes)
    return ReplyMessage(**fields)


def reply_envelope(body: object, **changes: Any) -> Envelope:
    envelope = encode_reply(reply(), "sagas.replies.default")
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return envelope.model_copy(update={"body": raw, **changes})


def without_header(envelope: Envelope, name: str) -> Envelope:
    headers = {key: value for key, value in envelope.headers.items() if key != name}
    return envelope.model_copy(update={"headers": headers})


def with_header(envelope: Envelope, name: str, value: str) -> Envelope:
    return envelope.model_copy(update={"headers": {**envelope.headers, name: value}})


# ---------------------------------------------------------------------- commands


def test_a_command_round_trips_through_its_envelope() -> None:
    original = command()

    assert decode_command(encode_command(original)) == original


def test_a_command_envelope_carries_the_protocol_properties_and_a_plain_json_payload() -> None:
    envelope = encode_command(command(kind=StepKind.COMPENSATE, attempt=3))

    assert envelope.route is RouteKind.COMMAND
    assert envelope.key == "inventory"
    assert envelope.message_id == "saga-1:reserve:execute:1"
    assert envelope.message_type == "ReserveInventory"
    assert envelope.correlation_id == "saga-1"
    assert envelope.reply_to == "sagas.replies.default"
    assert envelope.timestamp == AT
    assert envelope.headers == {
        "traceparent": TRACEPARENT,
        HEADER_SAGA_TYPE: "order",
        HEADER_STEP: "reserve",
        HEADER_ATTEMPT: "3",
        HEADER_KIND: "compensate",
        HEADER_IDEMPOTENCY_KEY: "saga-1:reserve",
    }
    assert json.loads(envelope.body) == command().payload


def test_a_command_without_idempotency_key_header_uses_its_message_id() -> None:
    envelope = without_header(encode_command(command()), HEADER_IDEMPOTENCY_KEY)

    assert decode_command(envelope).idempotency_key == envelope.message_id


@pytest.mark.parametrize("header", [HEADER_SAGA_TYPE, HEADER_STEP, HEADER_ATTEMPT, HEADER_KIND])
def test_decoding_a_command_without_a_saga_header_names_the_header(header: str) -> None:
    envelope = without_header(encode_command(command()), header)

    with pytest.raises(MessageDecodeError, match=f"lacks the {header} header") as caught:
        decode_command(envelope)

    assert caught.value.saga_id == "saga-1"


@pytest.mark.parametrize("header", [HEADER_SAGA_TYPE, HEADER_STEP, HEADER_ATTEMPT, HEADER_KIND])
def test_an_empty_saga_header_counts_as_missing(header: str) -> None:
    envelope = with_header(encode_command(command()), header, "")

    with pytest.raises(MessageDecodeError, match=header):
        decode_command(envelope)


def test_decoding_a_command_without_correlation_id_names_the_saga_id() -> None:
    envelope = encode_command(command()).model_copy(update={"correlation_id": None})

    with pytest.raises(MessageDecodeError, match="correlation_id"):
        decode_command(envelope)


@pytest.mark.parametrize(
    ("header", "value"),
    [(HEADER_ATTEMPT, "two"), (HEADER_ATTEMPT, "1.5"), (HEADER_KIND, "undo")],
)
def test_a_malformed_attempt_or_kind_names_the_header_and_value(header: str, value: str) -> None:
    envelope = with_header(encode_command(command()), header, value)

    with pytest.raises(MessageDecodeError, match=f"{header}='{value}'") as caught:
        decode_command(envelope)

    assert (caught.value.saga_type, caught.value.step) == ("order", "reserve")


def test_an_attempt_below_one_is_refused() -> None:
    envelope = with_header(encode_command(command()), HEADER_ATTEMPT, "0")

    with pytest.raises(MessageDecodeError, match=rf"{HEADER_ATTEMPT}=0; it must be >= 1"):
        decode_command(envelope)


def test_an_attempt_beyond_32_bits_is_refused_before_it_reaches_a_store() -> None:
    envelope = with_header(
        encode_reply(reply(), "sagas.replies.default"), HEADER_ATTEMPT, "2147483648"
    )

    with pytest.raises(MessageDecodeError, match=rf"{HEADER_ATTEMPT}=2147483648; it must be <="):
        decode_reply(envelope)


def test_a_command_on_the_reply_route_is_named_as_one() -> None:
    sent = command()
    misrouted = encode_command(sent).model_copy(
        update={"route": RouteKind.REPLY, "key": "sagas.replies.x"}
    )

    with pytest.raises(MessageDecodeError, match=rf"{sent.command_type!r} message"):
        decode_reply(misrouted)


def test_a_command_body_that_is_not_json_is_a_decode_error() -> None:
    envelope = encode_command(command()).model_copy(update={"body": b"{not json"})

    with pytest.raises(MessageDecodeError, match="body is not valid JSON"):
        decode_command(envelope)


def test_a_command_body_that_is_not_an_object_is_a_decode_error() -> None:
    envelope = encode_command(command()).model_copy(update={"body": b"[1, 2]"})

    with pytest.raises(MessageDecodeError, match="body must be a JSON object"):
        decode_command(envelope)


# ---------------------------------------------------------------------- replies


def test_a_successful_reply_round_trips() -> None:
    original = reply()
    envelope = encode_reply(original, "sagas.replies.default")

    assert decode_reply(envelope) == original
    assert (envelope.route, envelope.key) == (RouteKind.REPLY, "sagas.replies.default")
    assert envelope.message_type == REPLY_TYPE
    assert envelope.headers[HEADER_IN_REPLY_TO] == "saga-1:reserve:execute:1"
    assert json.loads(envelope.body) == {"status": "succeeded", "data": {"reservation_id": "r-1"}}


def test_a_failed_reply_round_trips_with_its_error() -> None:
    error = ErrorInfo(code="out_of_stock", message="no A-1 left", retryable=True)
    original = reply(status=ReplyStatus.FAILED, data={}, error=error, kind=StepKind.COMPENSATE)

    assert decode_reply(encode_reply(original, "q")) == original


def test_a_failed_reply_without_error_gets_a_generic_failed_code() -> None:
    envelope = reply_envelope({"status": "failed"})

    decoded = decode_reply(envelope)

    assert decoded.error == ErrorInfo(code="failed")


@pytest.mark.parametrize(
    ("status", "data", "error"),
    [
        (ReplyStatus.SUCCEEDED, {"reservation_id": "r-1"}, None),
        (ReplyStatus.FAILED, {}, ErrorInfo(code="out_of_stock", message="none", retryable=True)),
    ],
)
def test_an_answer_is_encoded_exactly_as_the_reply_answering_the_command(
    status: ReplyStatus, data: dict[str, Any], error: ErrorInfo | None
) -> None:
    cmd = command(kind=StepKind.COMPENSATE, attempt=3)
    answered = ReplyMessage.answering(cmd, status=status, at=AT, data=data, error=error)

    envelope = encode_answer(cmd, status=status, data=data, error=error, at=AT)

    assert envelope == encode_reply(answered, "sagas.replies.default")
    assert list(envelope.headers) == list(encode_reply(answered, "q").headers)
    assert decode_reply(envelope) == answered


def test_a_command_without_reply_to_cannot_be_answered() -> None:
    with pytest.raises(ValueError, match="reply_to"):
        encode_answer(
            command(reply_to=None), status=ReplyStatus.SUCCEEDED, data={}, error=None, at=AT
        )


def test_a_reply_without_in_reply_to_header_decodes_with_none() -> None:
    envelope = without_header(encode_reply(reply(), "q"), HEADER_IN_REPLY_TO)

    assert decode_reply(envelope).in_reply_to is None


@pytest.mark.parametrize("header", [HEADER_SAGA_TYPE, HEADER_STEP, HEADER_ATTEMPT, HEADER_KIND])
def test_decoding_a_reply_without_a_saga_header_names_the_header(header: str) -> None:
    envelope = without_header(encode_reply(reply(), "q"), header)

    with pytest.raises(MessageDecodeError, match=header):
        decode_reply(envelope)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"not json", "not valid JSON"),
        (["succeeded"], "body must be a JSON object"),
        ({"data": {}}, "status must be 'succeeded' or 'failed', got None"),
        ({"status": "done"}, "status must be 'succeeded' or 'failed', got 'done'"),
        ({"status": "succeeded", "data": [1]}, "data must be a JSON object"),
        ({"status": "failed", "error": {"message": "no code"}}, "error must be"),
        ({"status": "failed", "error": {"code": ""}}, "error must be"),
    ],
)
def test_a_malformed_reply_body_names_what_is_wrong(body: object, named: str) -> None:
    with pytest.raises(MessageDecodeError, match=named) as caught:
        decode_reply(reply_envelope(body))

    assert caught.value.saga_id == "saga-1"


# ---------------------------------------------------------------------- events


def test_an_event_round_trips_on_its_topic_routing_key() -> None:
    event = SagaEvent(
        event_id="saga-1:3:0",
        saga_id="saga-1",
        saga_type="order",
        kind=EventKind.STEP_FAILED,
        status=SagaStatus.COMPENSATING,
        step="pay",
        attempt=2,
        version=3,
        at=AT,
        error=ErrorInfo(code="declined"),
        detail="card declined",
    )

    envelope = encode_event(event)

    assert (envelope.route, envelope.key) == (RouteKind.EVENT, "order.step_failed")
    assert envelope.message_type == EVENT_TYPE
    assert envelope.message_id == "saga-1:3:0"
    assert decode_event(envelope) == event


@pytest.mark.parametrize("kind", list(EventKind))
def test_every_event_kind_goes_out_on_the_events_routing_key(kind: EventKind) -> None:
    event = SagaEvent(
        event_id="saga-1:1:0",
        saga_id="saga-1",
        saga_type="order",
        kind=kind,
        status=SagaStatus.RUNNING,
        version=1,
        at=AT,
    )

    assert encode_event(event).key == event.routing_key


def test_an_event_body_that_does_not_fit_names_the_model() -> None:
    envelope = Envelope(
        route=RouteKind.EVENT,
        key="order.started",
        message_id="e-1",
        message_type=EVENT_TYPE,
        correlation_id="saga-1",
        body=b'{"saga_id": "saga-1"}',
        timestamp=AT,
    )

    with pytest.raises(MessageDecodeError, match="does not fit SagaEvent") as caught:
        decode_event(envelope)

    assert caught.value.saga_id == "saga-1"


# ---------------------------------------------------------------------- dead letters


def test_a_dead_letter_carries_reason_and_error_headers_and_the_original_command_body() -> None:
    parked = command(kind=StepKind.COMPENSATE, message_id="saga-1:reserve:compensate:5")
    dead = DeadLetterMessage(
        message_id="saga-1:reserve:compensate:5:dead",
        command=parked,
        error=ErrorInfo(code="unreachable", message="warehouse API down"),
        reason="compensation of step 'reserve' failed after 5 attempt(s): unreachable",
        at=AT,
    )

    envelope = encode_dead_letter(dead)

    assert (envelope.route, envelope.key) == (RouteKind.DEAD_LETTER, DEAD_LETTER_KEY)
    assert envelope.message_id == "saga-1:reserve:compensate:5:dead"
    assert envelope.headers[HEADER_REASON] == dead.reason
    assert envelope.headers[HEADER_ERROR_CODE] == "unreachable"
    assert envelope.headers[HEADER_ERROR_MESSAGE] == "warehouse API down"
    assert envelope.body == encode_command(parked).body
    assert envelope.message_type == "ReserveInventory"
    recovered = decode_command(envelope)
    assert recovered.payload == parked.payload
    assert (recovered.step, recovered.kind, recovered.saga_id) == (
        "reserve",
        StepKind.COMPENSATE,
        "saga-1",
    )

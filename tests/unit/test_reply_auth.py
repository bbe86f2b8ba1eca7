"""Reply authentication (issue 18, defect 8): a reply is applied only if it echoes its command's
reply token. A forger who can publish to the replies exchange but cannot read the command
(another destination's participant) can neither complete nor compensate the saga.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from sagas_abstractions import (
    CommandMessage,
    ErrorInfo,
    ReplyMessage,
    ReplyStatus,
    RetryDue,
    SagaInstance,
    SagaStatus,
    Start,
    StepFailed,
    StepKind,
    StepSucceeded,
)
from sagas_core import Orchestrator, Participant, SagaBuilder, load_settings
from sagas_core.codec import (
    HEADER_REASON,
    HEADER_REPLY_TOKEN,
    decode_command,
    decode_reply,
    encode_command,
    encode_reply,
)
from sagas_core.definition import SagaDefinition
from sagas_core.engine import Decision, decide
from sagas_core.retry import fixed
from sagas_core.testing import FakeClock, InMemorySagaStore, SagaTestHarness

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Order(BaseModel):
    order_id: str
    shipment_id: str | None = None


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


class Ship(BaseModel):
    order_id: str


def shop() -> SagaDefinition:
    return (
        SagaBuilder("shop", data=Order)
        .step("reserve")
        .send(Reserve, to="inventory")
        .compensate_with(Release)
        .step("create-shipment")
        .send(Ship, to="shipping")
        .retry(attempts=3, backoff=fixed(1))
        .build()
    )


SHOP = shop()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def succeeded(
    command: CommandMessage, when: datetime, token: str | None, **data: object
) -> StepSucceeded:
    return StepSucceeded(
        step=command.step,
        attempt=command.attempt,
        kind=command.kind,
        at=when,
        message_id=f"{command.message_id}:reply",
        data=data,
        reply_token=token,
    )


def failed(
    command: CommandMessage, when: datetime, token: str | None, *, retryable: bool = False
) -> StepFailed:
    return StepFailed(
        step=command.step,
        attempt=command.attempt,
        kind=command.kind,
        at=when,
        message_id=f"{command.message_id}:reply",
        error=ErrorInfo(code="forged", message="no", retryable=retryable),
        reply_token=token,
    )


def at_shipping() -> tuple[SagaInstance, CommandMessage]:
    """reserve succeeded (with its token): the create-shipment command (token t-2) is out."""
    start = decide(
        SHOP, None, Start(saga_id="s-1", data={"order_id": "o-1"}, at=T0), reply_token="t-1"
    )
    reserve = start.commands[0]
    moved = decide(SHOP, start.instance, succeeded(reserve, at(1), "t-1"), reply_token="t-2")
    assert moved.changed
    return moved.instance, moved.commands[0]


def assert_rejected(decision: Decision, before: SagaInstance, why: str) -> None:
    assert not decision.changed
    assert decision.instance is before
    assert not decision.commands
    assert not decision.events
    assert decision.rejected is not None
    assert why in decision.rejected
    (row,) = decision.history
    assert row.outcome == "rejected"
    assert row.reason == decision.rejected
    assert row.step == "create-shipment"


# ---------------------------------------------------------------------------- the engine


def test_a_command_carries_the_reply_token_the_step_keeps() -> None:
    instance, ship = at_shipping()

    assert ship.reply_token == "t-2"
    assert instance.steps[1].reply_token == "t-2"
    assert "t-2" not in repr(ship)
    assert "t-2" not in repr(instance)


def test_a_forged_success_without_a_token_is_rejected_not_applied() -> None:
    instance, ship = at_shipping()

    decision = decide(SHOP, instance, succeeded(ship, at(2), None, shipment_id="FORGED"))

    assert_rejected(decision, instance, "no reply token")


def test_a_forged_failure_without_a_token_does_not_compensate() -> None:
    instance, ship = at_shipping()

    decision = decide(SHOP, instance, failed(ship, at(2), None))

    assert_rejected(decision, instance, "no reply token")
    assert decision.instance.status is SagaStatus.RUNNING


def test_a_reply_with_a_wrong_token_is_rejected() -> None:
    instance, ship = at_shipping()

    for forged in (
        succeeded(ship, at(2), "t-1"),
        failed(ship, at(2), "guess"),
        failed(ship, at(2), "é"),
    ):
        assert_rejected(decide(SHOP, instance, forged), instance, "not the current attempt's")


def test_the_token_of_a_previous_attempt_does_not_authenticate_the_next() -> None:
    instance, ship = at_shipping()
    retry = decide(SHOP, instance, failed(ship, at(2), "t-2", retryable=True), reply_token="t-3")
    assert retry.changed
    second = decide(SHOP, retry.instance, retry_due(ship, at(3)), reply_token="t-4")
    (ship_2,) = second.commands
    assert (ship_2.attempt, ship_2.reply_token) == (2, "t-4")

    replayed = succeeded(ship_2, at(4), "t-2", shipment_id="OLD")

    assert_rejected(decide(SHOP, second.instance, replayed), second.instance, "not the current")


def test_the_right_token_is_applied() -> None:
    instance, ship = at_shipping()

    decision = decide(SHOP, instance, succeeded(ship, at(2), "t-2", shipment_id="SH-1"))

    assert decision.changed
    assert decision.rejected is None
    assert decision.instance.status is SagaStatus.COMPLETED
    assert decision.instance.data["shipment_id"] == "SH-1"


def test_a_reply_for_another_attempt_stays_stale_whatever_its_token() -> None:
    instance, ship = at_shipping()
    other = succeeded(ship, at(2), None).model_copy(update={"attempt": 7})

    decision = decide(SHOP, instance, other)

    assert decision.rejected is None
    assert decision.history[0].outcome == "stale"


def test_a_step_sent_before_tokens_existed_takes_a_reply_without_one() -> None:
    """The upgrade policy (docs/protocol.md): the command asked for no token."""
    start = decide(SHOP, None, Start(saga_id="s-1", data={"order_id": "o-1"}, at=T0))
    reserve = start.commands[0]
    assert reserve.reply_token is None

    decision = decide(SHOP, start.instance, succeeded(reserve, at(1), None), reply_token="t-2")

    assert decision.changed
    assert decision.commands[0].reply_token == "t-2"  # the next command asks for one


def test_a_compensation_reply_needs_the_compensation_commands_token() -> None:
    instance, ship = at_shipping()
    compensating = decide(SHOP, instance, failed(ship, at(2), "t-2"), reply_token="t-3")
    (release,) = compensating.commands
    assert (release.kind, release.reply_token) == (StepKind.COMPENSATE, "t-3")

    forged = decide(SHOP, compensating.instance, succeeded(release, at(3), "t-1"))
    genuine = decide(SHOP, compensating.instance, succeeded(release, at(3), "t-3"))

    assert forged.rejected is not None
    assert genuine.instance.status is SagaStatus.COMPENSATED


def retry_due(command: CommandMessage, when: datetime) -> RetryDue:
    return RetryDue(step=command.step, attempt=command.attempt, kind=command.kind, at=when)


# ---------------------------------------------------------------------------- the codec


def test_the_codec_carries_the_token_in_a_header_and_keeps_it_out_of_extra_headers() -> None:
    _, ship = at_shipping()
    envelope = encode_command(ship, reply_to="sagas.replies.default")

    assert envelope.headers[HEADER_REPLY_TOKEN] == "t-2"
    decoded = decode_command(envelope)
    assert decoded.reply_token == "t-2"
    assert HEADER_REPLY_TOKEN not in decoded.headers

    reply = ReplyMessage.answering(decoded, status=ReplyStatus.SUCCEEDED, at=at(2))
    assert decode_reply(encode_reply(reply, "sagas.replies.default")).reply_token == "t-2"


# ---------------------------------------------------------------------------- the shell


def forged_reply(command: CommandMessage, status: ReplyStatus, token: str | None) -> ReplyMessage:
    """What the forger of the issue published: the predictable id, its own data, any token."""
    succeeded = status is ReplyStatus.SUCCEEDED
    reply = ReplyMessage.answering(
        command,
        status=status,
        at=T0,
        data={"shipment_id": "FORGED"} if succeeded else {},
        error=None if succeeded else ErrorInfo(code="forged", message="compensate it"),
    )
    return reply.model_copy(update={"reply_token": token})


async def test_a_forged_reply_is_recorded_dead_lettered_and_the_genuine_one_still_applies() -> None:
    harness = SagaTestHarness(shop())
    harness.stub("inventory").on(Reserve).succeed()
    harness.stub("shipping").on(Ship).never_answer()
    saga = await harness.start(Order(order_id="o-1"), saga_id="s-1")
    ship = harness.sent[-1]
    assert ship.step == "create-shipment"
    assert ship.reply_token  # the harness's orchestrator makes real tokens

    for status, token in ((ReplyStatus.SUCCEEDED, None), (ReplyStatus.FAILED, "guess")):
        envelope = encode_reply(forged_reply(ship, status, token), ship.reply_to or "")
        await harness.orchestrator.handle_envelope(envelope)
        await harness.run_until_idle()

    after = await harness.saga(saga.saga_id)
    assert after.status is SagaStatus.RUNNING
    assert after.data.get("shipment_id") is None
    history = await harness.orchestrator.history(saga.saga_id)
    rejected = [row for row in history if row.outcome == "rejected"]
    assert [row.input for row in rejected] == ["StepSucceeded", "StepFailed"]
    assert len(harness.dead_letters) == 2
    for dead in harness.dead_letters:
        assert dead.message_id == f"{ship.message_id}:reply"
        assert "reply token" in dead.headers[HEADER_REASON]
        assert "create-shipment" in dead.headers[HEADER_REASON]
        assert HEADER_REPLY_TOKEN not in dead.headers

    # The forger used the genuine reply's id first: the genuine reply is still applied.
    genuine = ReplyMessage.answering(
        ship, status=ReplyStatus.SUCCEEDED, at=T0, data={"shipment_id": "SH-1"}
    )
    await harness.orchestrator.handle_envelope(encode_reply(genuine, ship.reply_to or ""))
    done = await harness.saga(saga.saga_id)
    assert done.status is SagaStatus.COMPLETED
    assert done.data["shipment_id"] == "SH-1"


async def test_the_participant_echoes_the_token_without_the_handler_seeing_it() -> None:
    shipping = Participant("shipping", clock=FakeClock(T0))
    seen: list[object] = []

    @shipping.handles(Ship)
    async def ship_it(command: Ship) -> dict[str, str]:
        seen.append(command)
        return {"shipment_id": "SH-1"}

    _, ship = at_shipping()
    reply = await shipping.process(encode_command(ship, reply_to="sagas.replies.default"))

    assert reply is not None
    assert reply.headers[HEADER_REPLY_TOKEN] == "t-2"
    assert decode_reply(reply).reply_token == "t-2"
    assert seen == [Ship(order_id="o-1")]


async def test_every_command_gets_a_new_unguessable_token() -> None:
    store = InMemorySagaStore()
    orchestrator = Orchestrator(store=store, definitions=[shop()], clock=FakeClock(T0))
    tokens = set()
    for number in range(20):
        saga = await orchestrator.start("shop", {"order_id": f"o-{number}"})
        token = saga.steps[0].reply_token
        assert token is not None
        assert len(token) >= 22  # 128 bits, URL-safe base64
        tokens.add(token)
    assert len(tokens) == 20


async def test_injected_tokens_make_commands_predictable_for_tests() -> None:
    numbers = itertools.count(1)
    orchestrator = Orchestrator(
        store=InMemorySagaStore(),
        definitions=[shop()],
        clock=FakeClock(T0),
        reply_tokens=lambda: f"token-{next(numbers)}",
    )

    saga = await orchestrator.start("shop", {"order_id": "o-1"})

    assert saga.steps[0].reply_token == "token-1"


# ---------------------------------------------------------------------------- validated user ids


async def test_a_reply_not_published_by_its_destinations_broker_user_is_rejected() -> None:
    harness = SagaTestHarness(shop())
    harness.orchestrator.reply_users = {"shipping": "shipping-svc"}
    harness.stub("inventory").on(Reserve).succeed()
    harness.stub("shipping").on(Ship).never_answer()
    saga = await harness.start(Order(order_id="o-1"), saga_id="s-1")
    ship = harness.sent[-1]
    genuine = encode_reply(
        ReplyMessage.answering(
            ship, status=ReplyStatus.SUCCEEDED, at=T0, data={"shipment_id": "SH-1"}
        ),
        ship.reply_to or "",
    )

    # The right token, read somewhere it leaked, is not enough from another broker user.
    for user in (None, "inventory-svc"):
        await harness.orchestrator.handle_envelope(genuine.model_copy(update={"user_id": user}))
        await harness.run_until_idle()
    assert (await harness.saga(saga.saga_id)).status is SagaStatus.RUNNING
    reasons = [dead.headers[HEADER_REASON] for dead in harness.dead_letters]
    assert "without a user id" in reasons[0]
    assert "'inventory-svc', not by 'shipping-svc'" in reasons[1]

    await harness.orchestrator.handle_envelope(
        genuine.model_copy(update={"user_id": "shipping-svc"})
    )
    assert (await harness.saga(saga.saga_id)).status is SagaStatus.COMPLETED


def test_reply_users_come_from_settings_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAS_REPLY_USERS", '{"shipping": "shipping-svc"}')

    assert load_settings().reply_users == {"shipping": "shipping-svc"}

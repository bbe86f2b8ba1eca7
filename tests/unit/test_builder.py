"""Builder validation: a definition that cannot run never gets past ``build()``.

Every rejected definition raises :class:`InvalidDefinition` naming the saga, the step and the field
concerned, so the message alone tells the author what to fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, cast

import pytest
from pydantic import BaseModel

from sagas_abstractions import InvalidDefinition
from sagas_core.builder import DEFAULT_COMPENSATION_RETRY, SagaBuilder, local_destination
from sagas_core.definition import ActionKind, SagaDefinition, StepDefinition
from sagas_core.retry import RetryPolicy, fixed

# ---------------------------------------------------------------------------- models


class OrderData(BaseModel):
    order_id: str
    amount: int = 0
    reservation_id: str | None = None
    note: str = ""


class ReserveInventory(BaseModel):
    order_id: str


class ReleaseInventory(BaseModel):
    order_id: str
    reservation_id: str | None = None


class ProcessPayment(BaseModel):
    order_id: str
    amount: int


class RefundPayment(BaseModel):
    order_id: str


class ChargeCard(BaseModel):
    reference: str
    total: int


class ShipParcel(BaseModel):
    order_id: str
    carrier: str


class Reserved(BaseModel):
    reservation_id: str


async def notify(data: OrderData) -> None:
    """A local step handler."""


async def unnotify(data: OrderData) -> None:
    """A local compensation handler."""


def sync_handler(data: OrderData) -> None:
    """Not async: rejected as a local handler."""


DATA = OrderData(order_id="o-1", amount=42, reservation_id="r-9", note="fragile")

# ---------------------------------------------------------------------------- helpers


def build_error(build: Callable[[], SagaDefinition]) -> InvalidDefinition:
    with pytest.raises(InvalidDefinition) as caught:
        build()
    return caught.value


def problems_of(error: InvalidDefinition) -> list[InvalidDefinition]:
    problems = vars(error).get("problems")
    assert isinstance(problems, list)
    return cast("list[InvalidDefinition]", problems)


def only_step(definition: SagaDefinition) -> StepDefinition:
    assert len(definition.steps) == 1
    return definition.steps[0]


def reserve_saga(name: str = "order") -> SagaBuilder[OrderData]:
    return SagaBuilder(name, data=OrderData)


def reference_definition(
    *,
    timeout: float = 10,
    reserve_command: type[BaseModel] = ReserveInventory,
    extra_step: bool = False,
    saga_timeout: float | None = 300,
) -> SagaDefinition:
    builder = (
        SagaBuilder("order", data=OrderData)
        .step("reserve")
        .send(reserve_command, to="inventory")
        .compensate_with(ReleaseInventory)
        .timeout(seconds=timeout)
        .retry(3, backoff=fixed(1))
        .step("pay")
        .send(ProcessPayment, to="payments")
        .compensate_with(RefundPayment)
    )
    if extra_step:
        builder = builder.step("ship").send(
            ShipParcel, to="shipping", map=lambda d: {"order_id": d.order_id, "carrier": "post"}
        )
    if saga_timeout is not None:
        return builder.saga_timeout(seconds=saga_timeout).build()
    return builder.build()


# ---------------------------------------------------------------------------- saga-level problems


def test_build_rejects_a_saga_without_steps_and_names_the_saga() -> None:
    error = build_error(SagaBuilder("empty", data=OrderData).build)

    assert error.saga_type == "empty"
    assert error.step is None
    assert "at least one step" in str(error)
    assert "saga='empty'" in str(error)


def test_build_rejects_duplicate_step_names_and_names_the_step() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .step("reserve")
        .send(ReserveInventory, to="inventory")
    )

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert error.step == "reserve"
    assert "duplicate step name 'reserve'" in str(error)


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "dots.not.allowed", "x" * 101])
def test_build_rejects_a_bad_saga_name_and_quotes_it(name: str) -> None:
    builder = SagaBuilder(name, data=OrderData).step("reserve").send(ReserveInventory, to="inv")

    error = build_error(builder.build)

    assert error.saga_type == name
    assert "saga name must be" in str(error)
    assert repr(name) in str(error)


@pytest.mark.parametrize("name", ["", "_leading", "with/slash", "tab\tname", "y" * 101])
def test_build_rejects_a_bad_step_name_and_names_saga_and_step(name: str) -> None:
    builder = reserve_saga().step(name).send(ReserveInventory, to="inventory")

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert error.step == name
    assert "step name must be" in str(error)


@pytest.mark.parametrize("name", ["a", "Order_Processing-2", "9lives", "z" * 100])
def test_build_accepts_names_of_letters_digits_dashes_and_underscores(name: str) -> None:
    definition = SagaBuilder(name, data=OrderData).step(name).send(ReserveInventory, to="i").build()

    assert definition.name == name
    assert definition.steps[0].name == name


def test_build_rejects_data_that_is_not_a_pydantic_model() -> None:
    builder = SagaBuilder("order", data=cast("type[OrderData]", dict))
    builder.step("reserve").send(ReserveInventory, to="inventory")

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert "pydantic BaseModel" in str(error)


@pytest.mark.parametrize("seconds", [0, -1, -0.5])
def test_build_rejects_a_saga_timeout_that_is_not_positive(seconds: float) -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .saga_timeout(seconds=seconds)
    )

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert error.step is None
    assert "saga timeout must be positive" in str(error)


def test_saga_builder_compensate_with_before_any_step_raises_immediately() -> None:
    builder = reserve_saga()

    with pytest.raises(InvalidDefinition, match=r"must follow a step") as caught:
        builder.compensate_with(ReleaseInventory)

    assert caught.value.saga_type == "order"


def test_build_reports_every_problem_and_raises_the_first() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .timeout(seconds=-1)
        .step("pay")
        .send(ProcessPayment, to="payments")
        .retry(0)
    )

    error = build_error(builder.build)
    problems = problems_of(error)

    assert [(p.step, p.reason.split(",")[0]) for p in problems] == [
        ("reserve", "timeout must be positive"),
        ("reserve", "step has no action: call .send(Command"),
        ("pay", "retry attempts must be >= 1"),
    ]
    assert error.step == "reserve"
    assert "and 2 more problem(s)" in str(error)


# ---------------------------------------------------------------------------- step-level problems


def test_build_rejects_a_step_without_an_action_and_names_it() -> None:
    builder = reserve_saga().step("reserve").step("pay").send(ProcessPayment, to="payments")

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert error.step == "reserve"
    assert "step has no action" in str(error)
    assert "step='reserve'" in str(error)


def test_build_rejects_send_then_run_on_one_step() -> None:
    builder = reserve_saga().step("reserve").send(ReserveInventory, to="inventory").run(notify)

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "a step has one action" in str(error)


def test_build_rejects_run_then_send_on_one_step() -> None:
    builder = reserve_saga().step("reserve").run(notify).send(ReserveInventory, to="inventory")

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "a step has one action" in str(error)


@pytest.mark.parametrize("seconds", [0, -5])
def test_build_rejects_a_step_timeout_that_is_not_positive_and_names_the_step(
    seconds: float,
) -> None:
    builder = reserve_saga().step("reserve").send(ReserveInventory, to="inv").timeout(seconds)

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert error.step == "reserve"
    assert "timeout must be positive" in str(error)


def test_build_rejects_an_empty_timeout_call() -> None:
    builder = reserve_saga().step("reserve").send(ReserveInventory, to="inv").timeout()

    assert build_error(builder.build).step == "reserve"


@pytest.mark.parametrize("seconds", [0, -1, timedelta(seconds=-3)])
def test_build_rejects_a_compensation_timeout_that_is_not_positive(
    seconds: float | timedelta,
) -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory, timeout=seconds)
        .timeout(seconds=10)
    )

    error = build_error(builder.build)

    assert (error.saga_type, error.step) == ("order", "reserve")
    assert "compensation timeout must be positive" in str(error)


@pytest.mark.parametrize("attempts", [0, -1])
def test_build_rejects_retry_attempts_below_one_and_names_the_step(attempts: int) -> None:
    builder = reserve_saga().step("reserve").send(ReserveInventory, to="inv").retry(attempts)

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert f"retry attempts must be >= 1, got {attempts}" in str(error)


def test_build_rejects_compensate_with_called_twice_on_one_step() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory)
        .compensate_with(ReleaseInventory)
    )

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "compensate_with() was already called" in str(error)


def test_build_rejects_a_non_async_local_handler_and_names_the_step() -> None:
    handler = cast("Any", sync_handler)
    builder = reserve_saga().step("notify").run(handler)

    error = build_error(builder.build)

    assert error.saga_type == "order"
    assert error.step == "notify"
    assert "must be an async function" in str(error)


def test_build_rejects_a_non_async_local_compensation() -> None:
    handler = cast("Any", sync_handler)
    builder = reserve_saga().step("notify").run(notify).compensate_with(handler)

    error = build_error(builder.build)

    assert error.step == "notify"
    assert "local compensation handler" in str(error)


def test_build_rejects_a_local_compensation_given_a_destination() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(unnotify, to="elsewhere")
    )

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "a local compensation takes no destination or mapper" in str(error)


def test_build_rejects_a_remote_compensation_of_a_local_step_without_destination() -> None:
    builder = reserve_saga().step("notify").run(notify).compensate_with(ReleaseInventory)

    error = build_error(builder.build)

    assert error.step == "notify"
    assert "ReleaseInventory needs a destination" in str(error)


@pytest.mark.parametrize("destination", ["", ".starts-with-dot", "has space", "a/b"])
def test_build_rejects_a_bad_destination(destination: str) -> None:
    builder = reserve_saga().step("reserve").send(ReserveInventory, to=destination)

    error = build_error(builder.build)

    assert error.step == "reserve"


def test_build_rejects_a_command_that_is_not_a_pydantic_model() -> None:
    builder = reserve_saga().step("reserve").send(cast("type[BaseModel]", dict), to="inventory")

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "must be a pydantic BaseModel subclass" in str(error)


def test_build_rejects_a_reply_model_that_is_not_a_pydantic_model() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory", reply=cast("type[BaseModel]", int))
    )

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "reply must be a pydantic BaseModel subclass" in str(error)


# ---------------------------------------------------------------------------- field problems


def test_build_names_the_missing_command_field_and_step() -> None:
    builder = reserve_saga().step("charge").send(ChargeCard, to="payments")

    error = build_error(builder.build)
    problems = problems_of(error)

    assert {(p.step, p.field) for p in problems} == {("charge", "reference"), ("charge", "total")}
    assert error.saga_type == "order"
    assert error.step == "charge"
    assert error.field == "reference"
    assert "ChargeCard.reference is required but OrderData has no field 'reference'" in str(error)
    assert "field='reference'" in str(error)


def test_build_names_the_missing_field_of_a_compensation_command() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ShipParcel)
    )

    error = build_error(builder.build)

    assert (error.step, error.field) == ("reserve", "carrier")


def test_build_accepts_a_command_whose_missing_fields_have_defaults() -> None:
    class WithDefault(BaseModel):
        order_id: str
        priority: int = 3

    definition = reserve_saga().step("reserve").send(WithDefault, to="inventory").build()

    assert only_step(definition).action.build_payload(DATA) == {"order_id": "o-1", "priority": 3}


def test_build_names_an_unknown_command_field_in_the_map() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory", map={"bogus": "order_id"})
    )

    error = build_error(builder.build)

    assert (error.saga_type, error.step, error.field) == ("order", "reserve", "bogus")
    assert "map names 'bogus', which is not a field of ReserveInventory" in str(error)
    assert len(problems_of(error)) == 1


def test_build_names_an_unknown_data_field_in_the_map() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory", map={"order_id": "nope"})
    )

    error = build_error(builder.build)

    assert (error.saga_type, error.step, error.field) == ("order", "reserve", "nope")
    assert "map reads 'nope', which is not a field of OrderData" in str(error)
    # ... and, as a consequence, the command's required field has no source.
    assert [p.field for p in problems_of(error)] == ["nope", "order_id"]


def test_build_names_an_unknown_data_field_written_by_merge() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .merge({"reservation": "reservation_id"})
    )

    error = build_error(builder.build)

    assert (error.saga_type, error.step, error.field) == ("order", "reserve", "reservation")
    assert "merge writes 'reservation', which is not a field of OrderData" in str(error)


def test_build_rejects_a_map_that_is_neither_mapping_nor_callable() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory", map=cast("Mapping[str, str]", 42))
    )

    assert build_error(builder.build).step == "reserve"


def test_build_rejects_a_merge_that_is_neither_mapping_nor_callable() -> None:
    builder = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .merge(cast("Mapping[str, str]", 42))
    )

    error = build_error(builder.build)

    assert error.step == "reserve"
    assert "merge must be a mapping or a callable" in str(error)


def test_invalid_definition_survives_pickling_with_saga_step_and_field() -> None:
    import pickle  # noqa: PLC0415 - only this test needs it

    error = build_error(reserve_saga().step("charge").send(ChargeCard, to="payments").build)

    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object

    assert (copy.saga_type, copy.step, copy.field) == ("order", "charge", error.field)
    assert str(copy).startswith(error.reason)


# ---------------------------------------------------------------------------- payload mapping


def test_payload_is_built_from_data_fields_of_the_same_name() -> None:
    definition = reserve_saga().step("pay").send(ProcessPayment, to="payments").build()

    assert only_step(definition).action.build_payload(DATA) == {"order_id": "o-1", "amount": 42}


def test_payload_map_renames_command_fields_to_data_fields() -> None:
    definition = (
        reserve_saga()
        .step("charge")
        .send(ChargeCard, to="payments", map={"reference": "order_id", "total": "amount"})
        .build()
    )

    assert only_step(definition).action.build_payload(DATA) == {"reference": "o-1", "total": 42}


def test_payload_map_may_rename_some_fields_and_take_the_rest_by_name() -> None:
    class Partial(BaseModel):
        order_id: str
        total: int

    definition = (
        reserve_saga().step("charge").send(Partial, to="payments", map={"total": "amount"}).build()
    )

    assert only_step(definition).action.build_payload(DATA) == {"order_id": "o-1", "total": 42}


def test_payload_callable_map_may_return_the_command_model() -> None:
    definition = (
        reserve_saga()
        .step("ship")
        .send(
            ShipParcel, to="shipping", map=lambda d: ShipParcel(order_id=d.order_id, carrier="dhl")
        )
        .build()
    )

    assert only_step(definition).action.build_payload(DATA) == {
        "order_id": "o-1",
        "carrier": "dhl",
    }


def test_payload_callable_map_may_return_a_mapping_that_is_validated() -> None:
    definition = (
        reserve_saga()
        .step("charge")
        .send(ChargeCard, to="payments", map=lambda d: {"reference": d.order_id, "total": "7"})
        .build()
    )

    assert only_step(definition).action.build_payload(DATA) == {"reference": "o-1", "total": 7}


def test_payload_of_a_compensation_is_built_like_a_command() -> None:
    definition = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ChargeCard, map={"reference": "reservation_id", "total": "amount"})
        .build()
    )
    compensation = only_step(definition).compensation

    assert compensation is not None
    assert compensation.build_payload(DATA) == {"reference": "r-9", "total": 42}


# ---------------------------------------------------------------------------- reply merging


def test_reply_merge_copies_fields_of_the_same_name_and_ignores_the_rest() -> None:
    step = only_step(reserve_saga().step("reserve").send(ReserveInventory, to="inv").build())

    merged = step.merge(DATA, {"reservation_id": "r-new", "unrelated": 1})

    assert merged == {**DATA.model_dump(), "reservation_id": "r-new"}


def test_reply_merge_mapping_copies_reply_fields_into_named_data_fields() -> None:
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inv")
        .merge({"reservation_id": "id", "note": "comment"})
        .build()
    )

    merged = step.merge(DATA, {"id": "r-77", "reservation_id": "ignored"})

    # Only mapped fields are taken; a mapped reply field that is absent leaves the data alone.
    assert merged == {**DATA.model_dump(), "reservation_id": "r-77"}


def test_reply_merge_callable_may_return_the_data_model() -> None:
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inv")
        .merge(lambda d, reply: d.model_copy(update={"amount": d.amount + int(reply["extra"])}))
        .build()
    )

    assert step.merge(DATA, {"extra": 8})["amount"] == 50


def test_reply_merge_callable_may_return_a_mapping() -> None:
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inv")
        .merge(lambda d, reply: {**d.model_dump(), "note": reply["n"]})
        .build()
    )

    assert step.merge(DATA, {"n": "done"})["note"] == "done"


def test_reply_model_is_kept_and_its_fields_merge_by_name() -> None:
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory", reply=Reserved)
        .build()
    )

    assert step.reply_model is Reserved
    assert step.merge(DATA, {"reservation_id": "r-5"})["reservation_id"] == "r-5"


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_across_identical_builds() -> None:
    first = reference_definition()
    second = reference_definition()

    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 16


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(lambda: reference_definition(extra_step=True), id="step added"),
    ],
)
def test_fingerprint_changes_when_the_shape_changes(changed: Callable[[], SagaDefinition]) -> None:
    assert changed().fingerprint != reference_definition().fingerprint


@pytest.mark.parametrize(
    "tuned",
    [
        pytest.param(lambda: reference_definition(timeout=11), id="step timeout"),
        pytest.param(lambda: reference_definition(saga_timeout=301), id="saga timeout"),
        pytest.param(lambda: reference_definition(saga_timeout=None), id="no saga timeout"),
    ],
)
def test_fingerprint_ignores_timeouts_so_tuning_them_does_not_park_sagas_in_flight(
    tuned: Callable[[], SagaDefinition],
) -> None:
    # In-flight sagas store their deadlines; new attempts just use the new values.
    assert tuned().fingerprint == reference_definition().fingerprint


def test_fingerprint_changes_when_a_command_schema_changes() -> None:
    class ReserveInventory(BaseModel):  # same name on the wire, one more field
        order_id: str
        amount: int = 0

    changed = reference_definition(reserve_command=ReserveInventory)

    assert changed.fingerprint != reference_definition().fingerprint


def test_fingerprint_changes_with_the_destination_but_not_the_retry_policy() -> None:
    base = reserve_saga().step("reserve").send(ReserveInventory, to="inventory")
    retried = reserve_saga().step("reserve").send(ReserveInventory, to="inventory").retry(2)
    moved = reserve_saga().step("reserve").send(ReserveInventory, to="stock")

    assert retried.build().fingerprint == base.build().fingerprint
    assert moved.build().fingerprint != base.build().fingerprint


# ---------------------------------------------------------------------------- local steps


def test_local_step_goes_to_the_saga_local_destination_with_a_derived_command_type() -> None:
    definition = (
        reserve_saga("checkout").step("notify").run(notify).compensate_with(unnotify).build()
    )
    step = only_step(definition)
    assert step.compensation is not None

    assert step.action.kind is ActionKind.LOCAL
    assert step.action.destination == local_destination("checkout") == "sagas.local.checkout"
    assert step.action.command_type == "checkout.notify"
    assert step.action.handler is notify
    assert step.compensation.kind is ActionKind.LOCAL
    assert step.compensation.destination == "sagas.local.checkout"
    assert step.compensation.command_type == "checkout.notify.compensate"
    assert step.compensation.handler is unnotify
    assert step.action.build_payload(DATA) == DATA.model_dump(mode="json")
    assert [(s.name, k.value) for s, k, _ in definition.local_steps] == [
        ("notify", "execute"),
        ("notify", "compensate"),
    ]


def test_remote_step_uses_the_command_class_name_as_its_type() -> None:
    step = only_step(reserve_saga().step("reserve").send(ReserveInventory, to="inventory").build())

    assert step.action.kind is ActionKind.REMOTE
    assert step.action.command_type == "ReserveInventory"
    assert step.action.destination == "inventory"
    assert step.action.command_model is ReserveInventory
    assert step.compensation is None


# ---------------------------------------------------------------------------- defaults


def test_step_defaults_to_a_single_attempt_and_no_timeout() -> None:
    step = only_step(reserve_saga().step("reserve").send(ReserveInventory, to="inventory").build())

    assert step.action.retry.attempts == 1
    assert step.action.timeout is None


def test_compensation_defaults_inherit_destination_and_timeout_and_retry_five_times() -> None:
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory)
        .timeout(seconds=10)
        .retry(2)
        .build()
    )
    compensation = step.compensation
    assert compensation is not None

    assert compensation.kind is ActionKind.REMOTE
    assert compensation.command_type == "ReleaseInventory"
    assert compensation.destination == "inventory"
    assert compensation.timeout == timedelta(seconds=10)
    assert compensation.retry is DEFAULT_COMPENSATION_RETRY
    assert compensation.retry.attempts == 5
    assert step.action.retry.attempts == 2


def test_compensation_settings_override_the_defaults() -> None:
    policy = RetryPolicy(attempts=2, backoff=fixed(3))
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .compensate_with(ReleaseInventory, to="returns", timeout=4, retry=policy)
        .timeout(minutes=1)
        .build()
    )
    compensation = step.compensation
    assert compensation is not None

    assert compensation.destination == "returns"
    assert compensation.timeout == timedelta(seconds=4)
    assert compensation.retry is policy
    assert step.action.timeout == timedelta(minutes=1)


def test_timeouts_add_up_their_parts() -> None:
    definition = (
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .timeout(timedelta(seconds=1), seconds=2, minutes=1)
        .saga_timeout(1.5, hours=1)
        .build()
    )

    assert definition.steps[0].action.timeout == timedelta(seconds=63)
    assert definition.saga_timeout == timedelta(hours=1, seconds=1.5)


def test_retry_settings_reach_the_policy() -> None:
    step = only_step(
        reserve_saga()
        .step("reserve")
        .send(ReserveInventory, to="inventory")
        .retry(
            4,
            backoff=fixed(2),
            retry_on_timeout=False,
            retry_codes=("busy",),
            never_retry_codes=("fraud",),
        )
        .build()
    )
    policy = step.action.retry

    assert policy.attempts == 4
    assert policy.backoff == fixed(2)
    assert policy.retry_on_timeout is False
    assert policy.retry_codes == frozenset({"busy"})
    assert policy.never_retry_codes == frozenset({"fraud"})


def test_steps_keep_their_order_and_index() -> None:
    definition = reference_definition(extra_step=True)

    assert [(s.index, s.name) for s in definition.steps] == [
        (0, "reserve"),
        (1, "pay"),
        (2, "ship"),
    ]
    assert definition.step("pay") is definition.steps[1]
    assert definition.step("nope") is None

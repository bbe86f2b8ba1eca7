"""The order API: start order sagas over HTTP and watch them progress.

``POST /orders`` starts the order saga of :mod:`samples.order_processing` and answers
``202 Accepted`` with the saga id and a status URL; ``GET /orders/{saga_id}`` shows the saga's
status, steps and history. The sagas run in this process: ``FastAPI(lifespan=host.lifespan)``
starts the host with the app and stops it, gracefully, with the app.

Example:
    ```python
    app = create_app()  # the order saga, participants in process, state in SAGAS_DATABASE_URL
    ```
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route annotations at runtime.

import uuid
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from sagas_abstractions import (
    ErrorInfo,
    SagaAlreadyExists,
    SagaInstance,
    SagaNotFound,
    SagaStatus,
    StepKind,
    StepStatus,
)
from sagas_core import SagaHost
from sagas_core.settings import SagasSettings, load_settings
from samples.order_processing.messages import OrderData, OrderLine
from samples.order_processing.saga import order_saga
from samples.order_processing.services import Ledger, build_participants

__all__ = [
    "HistoryView",
    "OrderAccepted",
    "OrderRequest",
    "OrderSummary",
    "OrderView",
    "StepView",
    "build_host",
    "create_app",
]

IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9._~:-]+$",
        description=(
            "Makes the POST safe to retry: the key becomes the saga id, so a retried request "
            "returns the saga the first one started instead of starting a second one."
        ),
    ),
]
"""The ``Idempotency-Key`` request header (URL-safe, as it becomes part of the status URL)."""


# ------------------------------------------------------------------------------------ requests


class OrderRequest(BaseModel):
    """The body of ``POST /orders``: the order to place.

    Attributes:
        order_id: The business order id; generated (``ORD-...``) when not given.
        customer_id: Who orders.
        lines: What is ordered, at least one line.
        card_token: The payment card (``tok_declined`` is declined by the sample gateway).
        region: Where to ship (the sample carrier does not serve ``atlantis``).
        address: The shipping address.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "C-42",
                    "lines": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}],
                    "card_token": "tok_visa",
                    "region": "eu",
                    "address": "1 Main Street, Springfield",
                }
            ]
        },
    )

    order_id: str | None = Field(default=None, min_length=1, max_length=100)
    customer_id: str = Field(min_length=1, max_length=100)
    lines: list[OrderLine] = Field(min_length=1, max_length=100)
    card_token: str = Field(min_length=1, max_length=100)
    region: str = Field(min_length=1, max_length=100)
    address: str = Field(min_length=1, max_length=500)

    def to_saga_data(self) -> OrderData:
        """The saga data for this order (with a new order id when none was given)."""
        return OrderData(
            order_id=self.order_id or f"ORD-{uuid.uuid4().hex[:12].upper()}",
            customer_id=self.customer_id,
            lines=self.lines,
            card_token=self.card_token,
            region=self.region,
            address=self.address,
        )

    def same_order_as(self, data: OrderData) -> bool:
        """Whether ``data`` (a saga's data) is this order, as far as this request says."""
        return (
            (self.order_id is None or self.order_id == data.order_id)
            and self.customer_id == data.customer_id
            and self.lines == data.lines
            and self.card_token == data.card_token
            and self.region == data.region
            and self.address == data.address
        )


# ----------------------------------------------------------------------------------- responses


class OrderAccepted(BaseModel):
    """The answer to ``POST /orders``: the saga runs; poll ``status_url`` for its progress.

    Attributes:
        saga_id: The saga's id (the ``Idempotency-Key`` when one was sent).
        status_url: Where to ``GET`` the saga's status, steps and history.
        status: The saga's status when the answer was made.
    """

    saga_id: str
    status_url: str
    status: SagaStatus


class StepView(BaseModel):
    """One step of an order saga.

    Attributes:
        name: The step's name.
        status: Where the step is in its own lifecycle.
        attempts: Execute attempts made.
        compensation_attempts: Compensation attempts made.
        result: The successful reply's data.
        error: The step's last error (execution or compensation).
        started_at: When the first attempt was sent.
        finished_at: When the step reached its last status.
    """

    model_config = ConfigDict(from_attributes=True)

    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    result: dict[str, Any] | None
    error: ErrorInfo | None
    started_at: datetime | None
    finished_at: datetime | None


class HistoryView(BaseModel):
    """One entry of an order saga's audit trail.

    Attributes:
        version: The saga version after this entry.
        at: When the input was applied.
        input: What happened (``Start``, ``StepSucceeded``, ``StepFailed``, ``Timeout`` ...).
        outcome: ``applied``, ``stale`` or ``rejected``.
        from_status: The saga's status before.
        to_status: The saga's status after.
        step: The step concerned, when any.
        attempt: The attempt concerned, when any.
        kind: ``execute`` or ``compensate``, when the input concerned a command.
        reason: Why, in words.
        actor: Who acted, for operator actions.
    """

    model_config = ConfigDict(from_attributes=True)

    version: int
    at: datetime
    input: str
    outcome: str
    from_status: SagaStatus | None
    to_status: SagaStatus
    step: str | None
    attempt: int | None
    kind: StepKind | None
    reason: str | None
    actor: str | None


class OrderView(BaseModel):
    """The answer to ``GET /orders/{saga_id}``: the saga's status, steps and history.

    Attributes:
        saga_id: The saga's id.
        order_id: The business order id.
        status: ``running``, ``compensating``, ``completed``, ``compensated``, ``failed``
            (parked for an operator) or ``resolved``.
        current_step: The step being executed or compensated (``None`` once finished).
        steps: Every step, in order.
        data: The order and what the steps learned (reservation, payment, shipment ids).
        error: Why the saga compensated or was parked.
        version: Transitions so far.
        created_at: When the saga started.
        updated_at: When it last changed.
        history: The audit trail, oldest first.
    """

    saga_id: str
    order_id: str | None
    status: SagaStatus
    current_step: str | None
    steps: list[StepView]
    data: dict[str, Any]
    error: ErrorInfo | None
    version: int
    created_at: datetime
    updated_at: datetime
    history: list[HistoryView]


class OrderSummary(BaseModel):
    """One order saga in ``GET /orders``.

    Attributes:
        saga_id: The saga's id.
        order_id: The business order id.
        status: The saga's status.
        current_step: The step being executed or compensated (``None`` once finished).
        updated_at: When it last changed.
        status_url: Where to ``GET`` its details.
    """

    saga_id: str
    order_id: str | None
    status: SagaStatus
    current_step: str | None
    updated_at: datetime
    status_url: str


# -------------------------------------------------------------------------------------- routes


def _host(request: Request) -> SagaHost:
    return cast("SagaHost", request.app.state.host)


Host = Annotated[SagaHost, Depends(_host)]

router = APIRouter(tags=["orders"])


def _status_url(request: Request, saga_id: str) -> str:
    return str(request.app.url_path_for("get_order", saga_id=saga_id))


def _current_step(saga: SagaInstance) -> str | None:
    return None if saga.status.is_terminal else saga.current_step_name


@router.post(
    "/orders",
    status_code=HTTPStatus.ACCEPTED,
    responses={
        HTTPStatus.CONFLICT: {"description": "The Idempotency-Key names a saga of another kind."},
        HTTPStatus.UNPROCESSABLE_ENTITY: {
            "description": "The order is invalid (the detail names the field), or the "
            "Idempotency-Key was already used for a different order."
        },
    },
)
async def place_order(
    order: OrderRequest,
    host: Host,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> OrderAccepted:
    """Start an order saga; answer at once with where to follow it."""
    data = order.to_saga_data()
    try:
        saga = await host.start_saga(
            order_saga, data, saga_id=idempotency_key, correlation_id=data.order_id
        )
    except SagaAlreadyExists as exc:
        raise HTTPException(
            HTTPStatus.CONFLICT,
            detail=f"Idempotency-Key {idempotency_key!r} is already the id of another saga: "
            "send a new key",
        ) from exc
    if idempotency_key is not None and not order.same_order_as(OrderData.model_validate(saga.data)):
        # A retry must repeat its request; the same key for another order is a client bug.
        raise HTTPException(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            detail=f"Idempotency-Key {idempotency_key!r} was already used for a different "
            "order: send a new key for a new order",
        )
    status_url = _status_url(request, saga.saga_id)
    response.headers["Location"] = status_url
    return OrderAccepted(saga_id=saga.saga_id, status_url=status_url, status=saga.status)


@router.get(
    "/orders/{saga_id}",
    name="get_order",
    responses={HTTPStatus.NOT_FOUND: {"description": "No order saga has this id."}},
)
async def get_order(saga_id: str, host: Host) -> OrderView:
    """The order saga's status, current step, per-step progress, data, error and history."""
    try:
        saga = await host.get(saga_id)
    except SagaNotFound:
        saga = None
    if saga is None or saga.saga_type != order_saga.name:
        raise HTTPException(HTTPStatus.NOT_FOUND, detail=f"no order saga has id {saga_id!r}")
    history = await host.history(saga_id)
    return OrderView(
        saga_id=saga.saga_id,
        order_id=saga.correlation_id,
        status=saga.status,
        current_step=_current_step(saga),
        steps=[StepView.model_validate(step) for step in saga.steps],
        data=saga.data,
        error=saga.error,
        version=saga.version,
        created_at=saga.created_at,
        updated_at=saga.updated_at,
        history=[HistoryView.model_validate(entry) for entry in history],
    )


@router.get("/orders")
async def list_orders(
    host: Host,
    request: Request,
    status: SagaStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[OrderSummary]:
    """Order sagas, optionally only those in one status, least recently updated first."""
    sagas = await host.list(status=status, saga_type=order_saga.name, limit=limit)
    return [
        OrderSummary(
            saga_id=saga.saga_id,
            order_id=saga.correlation_id,
            status=saga.status,
            current_step=_current_step(saga),
            updated_at=saga.updated_at,
            status_url=_status_url(request, saga.saga_id),
        )
        for saga in sagas
    ]


@router.get("/ready", tags=["health"])
async def ready(host: Host, response: Response) -> dict[str, bool]:
    """200 when the host runs and its store answers, else 503."""
    is_ready = await host.ready()
    if not is_ready:
        response.status_code = HTTPStatus.SERVICE_UNAVAILABLE
    return {"ready": is_ready}


# ---------------------------------------------------------------------------------------- app


def build_host(settings: SagasSettings | None = None, *, ledger: Ledger | None = None) -> SagaHost:
    """The order saga's host.

    State lives in the settings' store: ``SAGAS_DATABASE_URL``, else the embedded SQLite file.
    Without ``SAGAS_AMQP_URL`` the bus is in-process and the inventory, payments and shipping
    participants run in this process too (their effects go to ``ledger``).

    Raises:
        SettingsError: a ``SAGAS_*`` variable is wrong (the message names it).
    """
    settings = settings if settings is not None else load_settings()
    builder = SagaHost.builder().use_settings(settings).add_saga(order_saga)
    if settings.amqp_url is None:
        participants, *_ = build_participants(ledger if ledger is not None else Ledger())
        for participant in participants:
            builder.add_participant(participant)
    return builder.build()


def create_app(host: SagaHost | None = None) -> FastAPI:
    """The order API, running ``host`` (default: :func:`build_host`) for as long as it runs.

    Raises:
        ValueError: ``host`` does not run the order saga.
        SettingsError: no host was given and a ``SAGAS_*`` variable is wrong.
    """
    host = host if host is not None else build_host()
    if order_saga.name not in {saga.name for saga in host.sagas}:
        raise ValueError(f"the host does not run the {order_saga.name!r} saga: add_saga() it")
    app = FastAPI(
        title="Order API (sagas sample)",
        summary="Place orders as sagas and follow them: reserve stock, charge, ship.",
        lifespan=host.lifespan,
    )
    app.state.host = host
    app.include_router(router)
    return app

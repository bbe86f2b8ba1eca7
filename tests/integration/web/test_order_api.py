"""The order API sample over real HTTP: a uvicorn server, the order saga, state in PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from sagas_core.settings import SagasSettings
from sagas_sqlalchemy import SqlSagaStore
from samples.order_api import build_host, create_app
from samples.order_processing.services import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SETTLE_SECONDS = 20.0


@dataclass
class Api:
    client: httpx.Client
    ledger: Ledger


@pytest.fixture(scope="module")
def api(postgres_url: str) -> Iterator[Api]:
    prefix = f"web{uuid.uuid4().hex[:8]}_"
    settings = SagasSettings(
        database_url=postgres_url,
        table_prefix=prefix,
        auto_migrate=True,
        amqp_url=None,
        graceful_timeout=10,
    )
    ledger = Ledger()
    app = create_app(build_host(settings, ledger=ledger))
    # Bind the port here and hand the socket over: no race for a "free" port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="order-api", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive():
                pytest.fail("the order API did not start (see the log above)")
            if time.monotonic() > deadline:
                pytest.fail("the order API did not start within 30 s")
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield Api(client, ledger)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        asyncio.run(_drop_tables(postgres_url, prefix))
    assert not thread.is_alive(), "the order API did not shut down within 30 s"


async def _drop_tables(url: str, prefix: str) -> None:
    store = SqlSagaStore.from_url(url, table_prefix=prefix)
    try:
        await store.drop_tables()
    finally:
        await store.close()


def _order(**changes: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "order_id": f"WEB-{uuid.uuid4().hex[:8]}",
        "customer_id": "C-42",
        "lines": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}],
        "card_token": "tok_visa",
        "region": "eu",
        "address": "1 Main Street, Springfield",
    }
    order.update(changes)
    return order


def _settled(client: httpx.Client, status_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        response = client.get(status_url)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] not in ("running", "compensating"):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"saga still {body['status']} after {SETTLE_SECONDS} s: {body}")
        time.sleep(0.05)


def _error_locations(response: httpx.Response) -> list[list[str | int]]:
    return [error["loc"] for error in response.json()["detail"]]


def test_a_placed_order_is_accepted_at_once_and_completes_with_every_step_done(api: Api) -> None:
    order = _order()

    response = api.client.post("/orders", json=order)

    assert response.status_code == 202, response.text
    accepted = response.json()
    assert set(accepted) == {"saga_id", "status_url", "status"}
    assert accepted["status_url"] == f"/orders/{accepted['saga_id']}"
    assert response.headers["Location"] == accepted["status_url"]
    assert accepted["status"] in ("running", "completed")

    saga = _settled(api.client, accepted["status_url"])
    assert saga["status"] == "completed"
    assert saga["saga_id"] == accepted["saga_id"]
    assert saga["order_id"] == order["order_id"]
    assert saga["current_step"] is None
    assert saga["error"] is None
    assert saga["data"]["amount"] == "25.00"
    assert saga["data"]["reservation_id"].startswith("RSV-")
    assert saga["data"]["payment_id"].startswith("PAY-")
    assert saga["data"]["shipment_id"].startswith("SHP-")
    assert [(s["name"], s["status"], s["attempts"]) for s in saga["steps"]] == [
        ("price-order", "succeeded", 1),
        ("reserve-inventory", "succeeded", 1),
        ("process-payment", "succeeded", 1),
        ("create-shipment", "succeeded", 1),
    ]
    history = saga["history"]
    assert history, "a finished saga has a history"
    assert history[0]["input"] == "Start"
    assert history[-1]["to_status"] == "completed"
    assert [entry["version"] for entry in history] == sorted(e["version"] for e in history)
    assert set(history[0]) >= {"version", "at", "input", "outcome", "from_status", "to_status"}
    assert set(history[0]) >= {"step", "reason", "actor"}
    assert api.ledger.for_order(order["order_id"]) == [
        "inventory.reserve",
        "payments.charge",
        "shipping.ship",
    ]


def test_a_declined_card_compensates_the_reserved_inventory_and_shows_why(api: Api) -> None:
    order = _order(card_token="tok_declined")

    response = api.client.post("/orders", json=order)

    assert response.status_code == 202, response.text
    saga = _settled(api.client, response.json()["status_url"])
    assert saga["status"] == "compensated"
    assert saga["error"]["code"] == "card_declined"
    steps = {step["name"]: step for step in saga["steps"]}
    assert steps["reserve-inventory"]["status"] == "compensated"
    assert steps["reserve-inventory"]["compensation_attempts"] == 1
    assert steps["process-payment"]["status"] == "failed"
    assert steps["process-payment"]["error"]["code"] == "card_declined"
    assert steps["create-shipment"]["status"] == "pending"
    statuses = [entry["to_status"] for entry in saga["history"]]
    assert "compensating" in statuses
    assert statuses[-1] == "compensated"
    assert any(
        entry["kind"] == "compensate" and entry["step"] == "reserve-inventory"
        for entry in saga["history"]
    )
    assert api.ledger.for_order(order["order_id"]) == ["inventory.reserve", "inventory.release"]


def test_retrying_a_post_with_the_same_idempotency_key_starts_one_saga(api: Api) -> None:
    order = _order()
    key = f"retry-{uuid.uuid4().hex}"
    headers = {"Idempotency-Key": key}

    first = api.client.post("/orders", json=order, headers=headers)
    second = api.client.post("/orders", json=order, headers=headers)

    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["saga_id"] == second.json()["saga_id"] == key
    assert _settled(api.client, f"/orders/{key}")["status"] == "completed"
    third = api.client.post("/orders", json=order, headers=headers)
    assert third.status_code == 202
    assert third.json() == {"saga_id": key, "status_url": f"/orders/{key}", "status": "completed"}
    assert api.ledger.for_order(order["order_id"]) == [
        "inventory.reserve",
        "payments.charge",
        "shipping.ship",
    ]
    listed = api.client.get("/orders", params={"limit": 1000}).json()
    assert [o["saga_id"] for o in listed if o["order_id"] == order["order_id"]] == [key]


def test_concurrent_retries_with_the_same_idempotency_key_start_one_saga(api: Api) -> None:
    order = _order(order_id=None)  # generated per request: the key alone identifies the order
    key = f"race-{uuid.uuid4().hex}"

    def post() -> httpx.Response:
        return api.client.post("/orders", json=order, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda _: post(), range(6)))

    assert [r.status_code for r in responses] == [202] * 6, [r.text for r in responses]
    assert {r.json()["saga_id"] for r in responses} == {key}
    saga = _settled(api.client, f"/orders/{key}")
    assert saga["status"] == "completed"
    assert api.ledger.for_order(saga["order_id"]) == [
        "inventory.reserve",
        "payments.charge",
        "shipping.ship",
    ]
    assert [e for e in saga["history"] if e["input"] == "Start"] == [saga["history"][0]]


def test_an_idempotency_key_reused_for_a_different_order_is_rejected(api: Api) -> None:
    key = f"reuse-{uuid.uuid4().hex}"
    first = api.client.post("/orders", json=_order(), headers={"Idempotency-Key": key})
    assert first.status_code == 202

    other = api.client.post(
        "/orders", json=_order(card_token="tok_other"), headers={"Idempotency-Key": key}
    )

    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]
    assert "different order" in other.json()["detail"]


@pytest.mark.parametrize(
    ("change", "location"),
    [
        (
            {"lines": [{"sku": "BOOK-1", "quantity": 0, "unit_price": "12.50"}]},
            ["body", "lines", 0, "quantity"],
        ),
        (
            {"lines": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "-1.00"}]},
            ["body", "lines", 0, "unit_price"],
        ),
        ({"lines": []}, ["body", "lines"]),
        ({"customer_id": ""}, ["body", "customer_id"]),
        ({"amount": "0.01"}, ["body", "amount"]),  # the saga prices the order, not the client
    ],
    ids=["zero quantity", "negative price", "no lines", "empty customer", "client-set amount"],
)
def test_an_invalid_order_is_rejected_with_422_naming_the_field(
    api: Api, change: dict[str, Any], location: list[str | int]
) -> None:
    response = api.client.post("/orders", json=_order(**change))

    assert response.status_code == 422, response.text
    assert _error_locations(response) == [location]


def test_a_missing_field_is_named_and_starts_no_saga(api: Api) -> None:
    order = _order()
    del order["address"]

    response = api.client.post("/orders", json=order, headers={"Idempotency-Key": "no-address"})

    assert response.status_code == 422
    assert _error_locations(response) == [["body", "address"]]
    assert api.client.get("/orders/no-address").status_code == 404


def test_a_malformed_idempotency_key_is_rejected_naming_the_header(api: Api) -> None:
    response = api.client.post("/orders", json=_order(), headers={"Idempotency-Key": "a b/c"})

    assert response.status_code == 422
    assert _error_locations(response) == [["header", "idempotency-key"]]


def test_an_unknown_saga_id_is_404_with_a_clear_message(api: Api) -> None:
    response = api.client.get("/orders/no-such-saga")

    assert response.status_code == 404
    assert response.json() == {"detail": "no order saga has id 'no-such-saga'"}


def test_orders_can_be_listed_by_status(api: Api) -> None:
    declined = api.client.post("/orders", json=_order(card_token="tok_declined")).json()
    _settled(api.client, declined["status_url"])

    compensated = api.client.get("/orders", params={"status": "compensated", "limit": 1000})
    completed = api.client.get("/orders", params={"status": "completed", "limit": 1000})

    assert compensated.status_code == completed.status_code == 200
    assert declined["saga_id"] in {o["saga_id"] for o in compensated.json()}
    assert declined["saga_id"] not in {o["saga_id"] for o in completed.json()}
    assert {o["status"] for o in compensated.json()} == {"compensated"}
    assert api.client.get("/orders", params={"status": "lost"}).status_code == 422


def test_the_api_is_ready_while_the_host_runs(api: Api) -> None:
    response = api.client.get("/ready")

    assert response.status_code == 200
    assert response.json() == {"ready": True}

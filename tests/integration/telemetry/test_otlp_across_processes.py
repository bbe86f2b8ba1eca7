"""The order sample with each participant in its own process, all exporting over OTLP/HTTP to
one receiver: one trace per saga across the worker and the participants, compensation visible,
metrics present (the check of issue 7)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sagas_rabbitmq.testing import sweep, unique_prefix
from tests.integration.telemetry.test_otlp_export import ROOT, _Receiver

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

SERVICES = ("inventory", "payments", "shipping")


def _otel_env(receiver: _Receiver, service: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SAGAS_"))}
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
            "OTEL_SERVICE_NAME": service,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


@pytest.fixture
def prefix(amqp_url: str) -> Iterator[str]:
    name = unique_prefix("sagas-otlp")
    yield name
    # The processes declared the queues, so only the broker knows them all: sweep by prefix.
    asyncio.run(sweep(amqp_url, f"{name}."))


def _spans(receiver: _Receiver) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(service, span name, trace id, string attributes) of every span received."""
    found = []
    for path, body in receiver.received:
        if path != "/v1/traces":
            continue
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: a.value.string_value for a in span.attributes}
                    found.append((service, span.name, span.trace_id, attributes))
    return found


def test_one_trace_per_saga_across_the_worker_and_participant_processes(
    amqp_url: str, prefix: str
) -> None:
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hosts: list[subprocess.Popen[str]] = []
    try:
        for service in SERVICES:
            host = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sagas_rabbitmq.host",
                    f"samples.order_processing.services:{service}",
                    "--url",
                    amqp_url,
                    "--prefix",
                    prefix,
                    "--group",
                    "participants",
                ],
                cwd=ROOT,
                env=_otel_env(receiver, service),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            hosts.append(host)
            assert host.stdout is not None
            assert host.stdout.readline() == "ready\n", service
        worker_env = _otel_env(receiver, "orders-worker")
        worker_env.update({"SAGAS_AMQP_URL": amqp_url, "SAGAS_RABBITMQ_PREFIX": prefix})
        worker = subprocess.run(
            [sys.executable, "-m", "tests.integration.telemetry.otlp_worker", "order"],
            cwd=ROOT,
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert worker.returncode == 0, worker.stderr[-3000:]
        assert worker.stdout.strip() == "compensated"
    finally:
        for host in hosts:
            host.send_signal(signal.SIGTERM)  # a clean exit flushes the spans
        for host in hosts:
            try:
                host.wait(timeout=20)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait()
            if host.stdout is not None:
                host.stdout.close()
        receiver.shutdown()
        receiver.server_close()

    spans = _spans(receiver)
    saga_spans = [span for span in spans if span[3].get("saga.type") == "order-processing"]
    assert {trace_id for _, _, trace_id, _ in saga_spans} == {saga_spans[0][2]}  # one trace
    services = {service for service, _, _, _ in saga_spans}
    assert services == {"orders-worker", "inventory", "payments"}  # no shipment: declined
    consumers = [(service, name, attrs) for service, name, _, attrs in saga_spans]
    assert ("payments", "process payments") in [(s, n) for s, n, _ in consumers]
    compensations = [
        (service, name)
        for service, name, attrs in consumers
        if attrs.get("saga.kind") == "compensate" and name.startswith("process ")
    ]
    assert ("inventory", "process inventory") in compensations

    metric_names: set[str] = set()
    for path, body in receiver.received:
        if path == "/v1/metrics":
            for resource_metrics in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    metric_names |= {metric.name for metric in scope_metrics.metrics}
    assert {"saga.started", "saga.compensated", "saga.duration", "saga.step.duration"} <= (
        metric_names
    )

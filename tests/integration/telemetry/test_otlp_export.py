"""Spans and metrics reach an OTLP/HTTP receiver from a process set up by ``configure_from_env``.

The receiver is a tiny ``http.server`` on 127.0.0.1 started by the test; the worker runs in a
subprocess so that its global providers are its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ROOT = Path(__file__).resolve().parents[3]


class _Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[str, bytes]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the API's name
        return


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_worker_configured_from_otel_variables_exports_spans_and_metrics_over_otlp_http(
    receiver: _Receiver,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SAGAS_"))}
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
            "OTEL_SERVICE_NAME": "otlp-test-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.telemetry.otlp_worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "compensated"

    traces = [body for path, body in receiver.received if path == "/v1/traces"]
    metrics = [body for path, body in receiver.received if path == "/v1/metrics"]
    assert traces, receiver.received
    names: list[str] = []
    services: set[str] = set()
    trace_ids: set[bytes] = set()
    for body in traces:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "sagas"
                for span in scope_spans.spans:
                    names.append(span.name)
                    trace_ids.add(span.trace_id)
    assert services == {"otlp-test-worker"}
    assert names.count("saga start trip-booking") == 1
    assert names.count("process cars") == 1
    assert names.count("process hotels") == 2  # the booking and its compensation
    assert len(trace_ids) == 1  # one saga, one trace

    metric_names: set[str] = set()
    for body in metrics:
        request = ExportMetricsServiceRequest.FromString(body)
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                metric_names |= {metric.name for metric in scope_metrics.metrics}
    assert {"saga.started", "saga.compensated", "saga.duration"} <= metric_names


def _run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_configure_from_env_does_nothing_without_an_exporter_variable() -> None:
    script = (
        "from opentelemetry import trace\n"
        "from sagas_core.telemetry import configure_from_env\n"
        "assert configure_from_env() is False\n"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
    )
    result = _run_script(script, {})
    assert result.returncode == 0, result.stderr


def test_configure_from_env_honours_the_sampler_and_never_overrides_a_provider() -> None:
    script = (
        "from opentelemetry import metrics, trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from sagas_core.telemetry import configure_from_env\n"
        "assert configure_from_env() is True\n"
        "provider = trace.get_tracer_provider()\n"
        "assert isinstance(provider, TracerProvider)\n"
        "assert type(provider.sampler).__name__ == 'StaticSampler', provider.sampler\n"
        "assert provider.resource.attributes['service.name'] == 'sagas-worker'\n"
        "assert configure_from_env() is False  # set already: left alone\n"
        "assert trace.get_tracer_provider() is provider\n"
        "assert type(metrics.get_meter_provider()).__module__.startswith('opentelemetry.sdk')\n"
    )
    result = _run_script(
        script,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_TRACES_SAMPLER": "always_off",
            "OTEL_METRICS_EXPORTER": "console",
            "OTEL_METRIC_EXPORT_INTERVAL": "600000",
        },
    )
    assert result.returncode == 0, result.stderr

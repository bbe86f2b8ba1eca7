"""In-memory OpenTelemetry providers for the telemetry tests, and helpers to read what they got.

Providers are injected into :class:`~sagas_core.telemetry.Telemetry`; the global providers are
never set in the test process (a global provider can be set once per process).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, format_span_id, format_trace_id

from sagas_core.telemetry import Telemetry


@dataclass
class Otel:
    """A telemetry object wired to in-memory exporters."""

    telemetry: Telemetry
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return sorted(self.spans.get_finished_spans(), key=lambda span: span.start_time or 0)

    def named(self, name: str, **attributes: Any) -> list[ReadableSpan]:
        return [
            span
            for span in self.finished()
            if span.name == name
            and all((span.attributes or {}).get(key) == value for key, value in attributes.items())
        ]

    def one(self, name: str, **attributes: Any) -> ReadableSpan:
        found = self.named(name, **attributes)
        assert len(found) == 1, (name, attributes, [s.name for s in self.finished()])
        return found[0]

    def points(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Metric name -> [(attributes, value or (count, sum))]."""
        result: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.metrics.get_metrics_data()
        if data is None:
            return result
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = (point.count, point.sum)  # type: ignore[union-attr]
                        result.setdefault(metric.name, []).append(
                            (dict(point.attributes or {}), value)
                        )
        return result

    def value(self, name: str, **attributes: Any) -> Any:
        """The value of ``name`` summed over the points matching ``attributes`` (None if none)."""
        matching = [
            value
            for point_attributes, value in self.points().get(name, [])
            if all(point_attributes.get(key) == wanted for key, wanted in attributes.items())
        ]
        if not matching:
            return None
        if isinstance(matching[0], tuple):
            return (sum(m[0] for m in matching), sum(m[1] for m in matching))
        return sum(matching)


def make_otel(**options: Any) -> Otel:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[metrics])
    telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider, **options)
    return Otel(telemetry, spans, metrics)


def traceparent(context: SpanContext) -> str:
    """The version, trace id and span id of the W3C ``traceparent`` of a span context."""
    return f"00-{format_trace_id(context.trace_id)}-{format_span_id(context.span_id)}"


def parent_of(header: str | None) -> str:
    """A ``traceparent`` header without its flags, to compare with :func:`traceparent`."""
    return (header or "").rsplit("-", 1)[0]


def ids(context: SpanContext | None) -> tuple[int, int]:
    """A span context's trace and span ids (remote or local copies compare equal)."""
    assert context is not None
    return context.trace_id, context.span_id


def linked(span: ReadableSpan) -> list[tuple[int, int]]:
    """The ids of the span contexts ``span`` links to."""
    return [ids(link.context) for link in span.links]


def span_ids(spans: Iterable[ReadableSpan]) -> set[int]:
    return {span.context.span_id for span in spans if span.context is not None}

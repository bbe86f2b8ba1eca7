"""OpenTelemetry tracing and metrics: one trace per saga across processes, and saga metrics.

Optional and free when unused: this module needs ``opentelemetry-api`` only
(``pip install 'sagas-orchestrator[otel]'``), imports it lazily, and while no SDK provider is
configured (or the API is not installed) every hook returns at once without creating a span or
recording a value.

The orchestrator, the outbox relay and participants call a :class:`Telemetry` through small
hooks; by default they share :meth:`Telemetry.default`, which follows the global tracer and
meter providers. Inject providers instead (tests, or an application that keeps its own):

```python
telemetry = Telemetry(tracer_provider=my_tracer_provider, meter_provider=my_meter_provider)
runtime = SagaRuntime(sagas=[order_saga], telemetry=telemetry)
```

How a saga becomes one trace (``docs/observability.md`` shows one):

* ``saga start <type>`` (internal) wraps the start; its context is stored on the saga row
  (:attr:`SagaInstance.trace_context <sagas_abstractions.SagaInstance.trace_context>`), and
  every command written to the outbox carries the W3C ``traceparent`` of the span that decided
  it, so a command published after a restart still joins its trace.
* ``publish <destination>`` (producer) when the relay (or a participant, for a reply)
  publishes; the message then carries the producer span's context.
* ``process <destination>`` (consumer) in the participant and, for the reply, in the
  orchestrator: a child of the producer context read from the message headers, and linked to
  it. Failed replies and handler errors set the span status to ERROR.
* ``saga timeout|retry|saga-timeout <type>`` for fired deadlines and ``saga compensate|
  retry-compensation|resolve <type>`` for operator actions: children of the stored start
  context (so they stay in the saga's trace) and linked to it. No span is ever held open
  while a saga waits.

Set ``messaging_spans=False`` (or ``SAGAS_OTEL_MESSAGING_SPANS=0``) when another
instrumentation already makes producer/consumer spans for the broker client: the publish spans
are then left out and the process spans become internal spans.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagas_abstractions import SagaStatus, StepKind

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import ModuleType

    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
        UpDownCounter,
    )
    from opentelemetry.trace import Link, Span, Tracer, TracerProvider

    from sagas_abstractions import Envelope, ErrorInfo, HistoryEntry, SagaInput, SagaInstance
    from sagas_core.circuit import CircuitBreaker
    from sagas_core.engine import Decision

__all__ = ["Telemetry", "configure_from_env"]

_log = logging.getLogger("sagas.telemetry")

INSTRUMENTATION_NAME = "sagas"
MESSAGING_SPANS_ENV = "SAGAS_OTEL_MESSAGING_SPANS"
_INSTALL_HINT = "pip install 'sagas-orchestrator[otel]'"
_RECHECK_SECONDS = 1.0

_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()
_monotonic = time.monotonic

_DEADLINE_VERBS = {"Timeout": "timeout", "RetryDue": "retry", "SagaTimeout": "saga-timeout"}
_OPERATOR_VERBS = {
    "Compensate": "compensate",
    "RetryCompensation": "retry-compensation",
    "Resolve": "resolve",
}
_REPLY_INPUTS = frozenset({"StepSucceeded", "StepFailed"})
_FINISHED = {
    SagaStatus.COMPLETED: "completed",
    SagaStatus.COMPENSATED: "compensated",
    SagaStatus.FAILED: "failed",
}
_STEP_OUTCOMES = {"StepSucceeded": "succeeded", "StepFailed": "failed", "Timeout": "timed_out"}
_CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True, slots=True)
class _Api:
    trace: ModuleType
    metrics: ModuleType
    propagate: ModuleType


_api_cache: list[_Api | None] = []


def _api() -> _Api | None:
    """The OpenTelemetry API modules, imported on first use; ``None`` when not installed."""
    if not _api_cache:
        try:
            _api_cache.append(
                _Api(
                    trace=importlib.import_module("opentelemetry.trace"),
                    metrics=importlib.import_module("opentelemetry.metrics"),
                    propagate=importlib.import_module("opentelemetry.propagate"),
                )
            )
        except ImportError:
            _api_cache.append(None)
    return _api_cache[0]


def _is_api_default(provider: object) -> bool:
    """Whether ``provider`` is the API's own proxy or no-op one: no SDK is configured."""
    return type(provider).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics"))


class _Instruments:
    """The saga metrics, created once per meter."""

    def __init__(self, meter: Meter, telemetry: Telemetry) -> None:
        self.started: Counter = meter.create_counter(
            "saga.started", unit="{saga}", description="Sagas started."
        )
        self.completed: Counter = meter.create_counter(
            "saga.completed", unit="{saga}", description="Sagas that completed every step."
        )
        self.compensated: Counter = meter.create_counter(
            "saga.compensated", unit="{saga}", description="Sagas rolled back by compensation."
        )
        self.failed: Counter = meter.create_counter(
            "saga.failed",
            unit="{saga}",
            description="Sagas parked as failed: compensation could not finish.",
        )
        self.active: UpDownCounter = meter.create_up_down_counter(
            "saga.active",
            unit="{saga}",
            description="Sagas running or compensating (sum over workers).",
        )
        self.duration: Histogram = meter.create_histogram(
            "saga.duration", unit="s", description="From start to completed/compensated/failed."
        )
        self.step_duration: Histogram = meter.create_histogram(
            "saga.step.duration",
            unit="s",
            description="From a step's first command to its final outcome (retries included).",
        )
        self.retries: Counter = meter.create_counter(
            "saga.step.retries", unit="{command}", description="Commands sent again."
        )
        self.timeouts: Counter = meter.create_counter(
            "saga.timeouts", unit="{timeout}", description="Step and saga timeouts that fired."
        )
        self.dead_lettered: Counter = meter.create_counter(
            "saga.dead_lettered", unit="{message}", description="Messages sent to the DLQ."
        )
        self.slow_statements: Histogram = meter.create_histogram(
            "saga.store.slow_statement.duration",
            unit="s",
            description="Store claims and saves slower than the store's threshold.",
        )
        meter.create_observable_gauge(
            "saga.outbox.lag",
            callbacks=[telemetry.observe_outbox_lag],
            unit="s",
            description="Age of the oldest outbox record the relay claimed in its last round.",
        )
        meter.create_observable_gauge(
            "saga.outbox.size",
            callbacks=[telemetry.observe_outbox_size],
            unit="{message}",
            description="Outbox records not yet published.",
        )
        meter.create_observable_gauge(
            "saga.circuit.state",
            callbacks=[telemetry.observe_circuits],
            description="Circuit per destination: 0 closed, 1 half-open, 2 open.",
        )
        meter.create_observable_gauge(
            "saga.oldest_active.age",
            callbacks=[telemetry.observe_oldest],
            unit="s",
            description="How long the least recently updated active saga has been in its state.",
        )


class Telemetry:
    """The tracer, the meter, and the hooks the saga components call.

    Args:
        tracer_provider: Where spans go; the global provider when ``None``.
        meter_provider: Where metrics go; the global provider when ``None``.
        messaging_spans: Make producer/consumer spans; turn off when another broker
            instrumentation makes them (default: ``SAGAS_OTEL_MESSAGING_SPANS``, else on).

    With neither provider given and no SDK configured globally, every hook is a no-op.
    """

    _default: Telemetry | None = None

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        messaging_spans: bool | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        if messaging_spans is None:
            messaging_spans = os.environ.get(MESSAGING_SPANS_ENV, "1").lower() not in {
                "0",
                "false",
                "no",
                "off",
            }
        self.messaging_spans = messaging_spans
        self._tracer: Tracer | None = None
        self._instruments: _Instruments | None = None
        # Without an SDK, the global providers are looked at again at most once a second, so
        # the no-op path costs a clock read (a provider set later is picked up within 1 s).
        # Plain attributes, read by tracer/instruments before anything else: -inf (look now)
        # until a lookup found no SDK; a provider given is never looked up (it stays -inf).
        self._trace_off_until = float("-inf")
        self._metrics_off_until = float("-inf")
        self._breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self._outbox_lag: dict[str, float] = {}
        self._outbox_size: dict[str, int] = {}
        self._oldest: dict[str, float] = {}

    @classmethod
    def default(cls) -> Telemetry:
        """The process-wide instance that follows the global providers."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    # ------------------------------------------------------------------ providers

    def _provider(self, signal: str, given: Any, lookup: Callable[[Any], Any]) -> Any:
        """The provider given, else the global SDK one (``None`` while there is none).

        The global provider is looked up at most every few seconds: an SDK configured after
        start-up is picked up, and a process without one pays almost nothing per hook.
        """
        if given is not None:
            return given
        now = _monotonic()
        attribute = f"_{signal}_off_until"
        if now < getattr(self, attribute):
            return None  # looked a moment ago: no SDK yet
        api = _api()
        if api is None:
            setattr(self, attribute, float("inf"))
            return None
        provider = lookup(api)
        if _is_api_default(provider):
            setattr(self, attribute, now + _RECHECK_SECONDS)
            return None
        return provider

    @property
    def tracer(self) -> Tracer | None:
        """The tracer, or ``None`` while tracing is off (no API, or no SDK configured)."""
        if self._tracer is not None:
            return self._tracer
        if _monotonic() < self._trace_off_until:
            return None  # the common no-SDK case, without the call below (hooks ask often)
        provider = self._provider(
            "trace", self._tracer_provider, lambda api: api.trace.get_tracer_provider()
        )
        if provider is None:
            return None
        from sagas_core import __version__  # noqa: PLC0415 - avoids an import cycle

        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        return self._tracer

    @property
    def instruments(self) -> _Instruments | None:
        """The metric instruments, or ``None`` while metrics are off."""
        if self._instruments is not None:
            return self._instruments
        if _monotonic() < self._metrics_off_until:
            return None  # as in tracer
        provider = self._provider(
            "metrics", self._meter_provider, lambda api: api.metrics.get_meter_provider()
        )
        if provider is None:
            return None
        from sagas_core import __version__  # noqa: PLC0415 - avoids an import cycle

        self._instruments = _Instruments(
            provider.get_meter(INSTRUMENTATION_NAME, __version__), self
        )
        return self._instruments

    def tracing_off(self) -> bool:
        """Whether no span can be made now (no SDK, or none yet): span hooks may be skipped.

        The hooks' own test, and cheaper than a hook that returns a no-op context manager to
        enter and leave.
        """
        return self.tracer is None

    @property
    def metrics_enabled(self) -> bool:
        """Whether metrics are recorded (so samples that cost a query are worth taking)."""
        return self.instruments is not None

    # ------------------------------------------------------------------ context

    def _extract(self, carrier: Mapping[str, str] | None) -> Any:
        api = _api()
        assert api is not None  # noqa: S101 - only called with a tracer
        return api.propagate.extract(dict(carrier or {}))

    def _span_link(self, carrier: Mapping[str, str] | None) -> Link | None:
        if not carrier or "traceparent" not in carrier:
            return None
        api = _api()
        assert api is not None  # noqa: S101 - only called with a tracer
        context = api.trace.get_current_span(self._extract(carrier)).get_span_context()
        return api.trace.Link(context) if context.is_valid else None

    def _current_span(self) -> Span | None:
        api = _api()
        if api is None:
            return None
        span: Span = api.trace.get_current_span()
        return span if span.get_span_context().is_valid else None

    def trace_context(self, fallback: Mapping[str, str] | None = None) -> dict[str, str]:
        """The current span's W3C context as headers, else ``fallback`` (copied)."""
        if self.tracing_off() or self._current_span() is None:
            return dict(fallback or {})
        api = _api()
        assert api is not None  # noqa: S101 - a tracer implies the API
        carrier: dict[str, str] = {}
        api.propagate.inject(carrier)
        return carrier

    def stamp(self, envelopes: list[Envelope]) -> list[Envelope]:
        """The envelopes with the current span's context in their headers (for the outbox)."""
        if not envelopes or self.tracing_off() or self._current_span() is None:
            return envelopes
        carrier = self.trace_context()
        return [
            envelope.model_copy(update={"headers": {**envelope.headers, **carrier}})
            for envelope in envelopes
        ]

    # ------------------------------------------------------------------ spans

    def saga_start(
        self, saga_type: str, saga_id: str, parent: Mapping[str, str] | None
    ) -> contextlib.AbstractContextManager[Span | None]:
        """The ``saga start`` span (a child of ``parent`` headers, else of the current span)."""
        tracer = self.tracer
        if tracer is None:
            return _NOOP
        api = _api()
        assert api is not None  # noqa: S101 - a tracer implies the API
        context = self._extract(parent) if parent and "traceparent" in parent else None
        return tracer.start_as_current_span(
            f"saga start {saga_type}",
            context=context,
            kind=api.trace.SpanKind.INTERNAL,
            attributes={"saga.id": saga_id, "saga.type": saga_type},
        )

    @contextlib.contextmanager
    def _input_span(
        self, tracer: Tracer, instance: SagaInstance, event: SagaInput
    ) -> Iterator[Span]:
        api = _api()
        assert api is not None  # noqa: S101 - a tracer implies the API
        name = type(event).__name__
        verb = _DEADLINE_VERBS.get(name)
        attributes: dict[str, str | int] = {
            "saga.id": instance.saga_id,
            "saga.type": instance.saga_type,
            "saga.status": instance.status.value,
            "saga.attempt": instance.attempt,
        }
        if instance.current_step_name is not None:
            attributes["saga.step"] = instance.current_step_name
        current = self._current_span()
        if verb is None:
            verb = _OPERATOR_VERBS.get(name, name)
            actor = getattr(event, "actor", None)
            if actor:
                attributes["saga.actor"] = str(actor)
        link = self._span_link(instance.trace_context)
        # Deadlines have no caller: they join the saga's trace through the stored start context.
        context = None if current is not None else self._extract(instance.trace_context)
        with tracer.start_as_current_span(
            f"saga {verb} {instance.saga_type}",
            context=context,
            kind=api.trace.SpanKind.INTERNAL,
            attributes=attributes,
            links=[link] if link is not None else None,
        ) as span:
            yield span

    def saga_input(
        self, instance: SagaInstance, event: SagaInput
    ) -> contextlib.AbstractContextManager[Span | None]:
        """Span a saga input: a new span for deadlines and operator actions.

        A reply is already inside its consumer span: that span gets the saga attributes and a
        link to the saga's start instead.
        """
        tracer = self.tracer
        if tracer is None:
            return _NOOP
        if type(event).__name__ in _REPLY_INPUTS:
            span = self._current_span()
            if span is not None:
                span.set_attribute("saga.id", instance.saga_id)
                link = self._span_link(instance.trace_context)
                if link is not None:
                    span.add_link(link.context, {"saga.link": "start"})
            return contextlib.nullcontext(span)
        return self._input_span(tracer, instance, event)

    def decided(self, span: Span | None, decision: Decision) -> None:
        """Record the saga's status after a decision on ``span``."""
        if span is not None:
            span.set_attribute("saga.status", decision.instance.status.value)

    def consume(
        self, envelope: Envelope, *, system: str
    ) -> contextlib.AbstractContextManager[Span | None]:
        """The ``process <destination>`` span of a delivered command or reply.

        A child of the producer context in the headers, and linked to it (the headers are the
        only way the context crosses the broker). With ``messaging_spans`` off it is an
        internal span under whatever span the broker instrumentation made.
        """
        tracer = self.tracer
        if tracer is None:
            return _NOOP
        api = _api()
        assert api is not None  # noqa: S101 - a tracer implies the API
        link = self._span_link(envelope.headers)
        if self.messaging_spans:
            kind = api.trace.SpanKind.CONSUMER
            context = self._extract(envelope.headers) if link is not None else None
        else:
            kind = api.trace.SpanKind.INTERNAL
            context = None if self._current_span() is not None else self._extract(envelope.headers)
        return tracer.start_as_current_span(
            f"process {envelope.key}",
            context=context,
            kind=kind,
            attributes=_messaging_attributes(envelope, system, "process"),
            links=[link] if link is not None else None,
        )

    @contextlib.contextmanager
    def _publish_spans(
        self, tracer: Tracer, envelopes: Sequence[Envelope], system: str
    ) -> Iterator[list[Envelope]]:
        api = _api()
        assert api is not None  # noqa: S101 - a tracer implies the API
        spans: list[Span] = []
        stamped: list[Envelope] = []
        for envelope in envelopes:
            span = tracer.start_span(
                f"publish {envelope.key}",
                context=self._extract(envelope.headers),
                kind=api.trace.SpanKind.PRODUCER,
                attributes=_messaging_attributes(envelope, system, "publish"),
            )
            carrier = dict(envelope.headers)
            api.propagate.inject(carrier, context=api.trace.set_span_in_context(span))
            spans.append(span)
            stamped.append(envelope.model_copy(update={"headers": carrier}))
        try:
            yield stamped
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(api.trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for span in spans:
                span.end()

    def publishing(
        self, envelopes: Sequence[Envelope], *, system: str
    ) -> contextlib.AbstractContextManager[Sequence[Envelope]]:
        """One ``publish <destination>`` span per envelope, around publishing them.

        Yields the envelopes to publish: with the producer span's context in their headers,
        each a child of the context the envelope carried (the span that decided it).
        """
        if not self.messaging_spans:
            return contextlib.nullcontext(envelopes)
        tracer = self.tracer
        if tracer is None:
            return contextlib.nullcontext(envelopes)
        return self._publish_spans(tracer, envelopes, system)

    def failed(self, span: Span | None, error: ErrorInfo | None) -> None:
        """Mark ``span`` as failed with a reply's error (no-op for ``None``)."""
        if span is None or error is None:
            return
        api = _api()
        assert api is not None  # noqa: S101 - a span implies the API
        span.set_attribute("error.type", error.code)
        span.add_event(
            "exception",
            {
                "exception.type": error.code,
                "exception.message": error.message,
                "saga.error.retryable": error.retryable,
            },
        )
        span.set_status(api.trace.StatusCode.ERROR, f"{error.code}: {error.message}")

    # ------------------------------------------------------------------ metrics

    def record_decision(self, decision: Decision) -> None:
        """Count what a committed decision did (low-cardinality attributes only)."""
        instruments = self.instruments
        if instruments is None:
            return
        instance = decision.instance
        saga_type = {"saga.type": instance.saga_type}
        for entry in decision.history:
            if entry.outcome != "applied":
                continue
            if entry.input == "Start":
                instruments.started.add(1, saga_type)
            was_active = entry.from_status is not None and entry.from_status.is_active
            if entry.to_status.is_active and not was_active:
                instruments.active.add(1, saga_type)
            elif was_active and not entry.to_status.is_active:
                instruments.active.add(-1, saga_type)
            finished = _FINISHED.get(entry.to_status)
            if finished is not None and entry.from_status != entry.to_status:
                getattr(instruments, finished).add(1, saga_type)
                seconds = (instance.updated_at - instance.created_at).total_seconds()
                instruments.duration.record(seconds, {**saga_type, "saga.outcome": finished})
            if entry.input in {"Timeout", "SagaTimeout"}:
                scope = "saga" if entry.input == "SagaTimeout" else "step"
                attributes = {**saga_type, "saga.timeout.scope": scope}
                if entry.step:
                    attributes["saga.step"] = entry.step
                instruments.timeouts.add(1, attributes)
            if entry.step and entry.kind is StepKind.EXECUTE:
                self._step_finished(instruments, instance, entry)
        for command in decision.commands:
            state = next((s for s in instance.steps if s.name == command.step), None)
            if state is None:
                continue
            made = (
                state.attempts if command.kind is StepKind.EXECUTE else state.compensation_attempts
            )
            if made > 1:
                instruments.retries.add(
                    1, {**saga_type, "saga.step": command.step, "saga.kind": command.kind.value}
                )
        for dead in decision.dead_letters:
            instruments.dead_lettered.add(1, {**saga_type, "saga.step": dead.command.step})

    @staticmethod
    def _step_finished(
        instruments: _Instruments, instance: SagaInstance, entry: HistoryEntry
    ) -> None:
        """Record the step's duration if this input finished it (a retry does not)."""
        outcome = _STEP_OUTCOMES.get(entry.input)
        state = next((s for s in instance.steps if s.name == entry.step), None)
        if (
            outcome is None
            or state is None
            or state.started_at is None
            or state.finished_at is None
            or state.finished_at != entry.at
        ):
            return
        instruments.step_duration.record(
            (state.finished_at - state.started_at).total_seconds(),
            {"saga.type": instance.saga_type, "saga.step": state.name, "saga.outcome": outcome},
        )

    def record_dead_letter(self, destination: str) -> None:
        """Count a message a participant dead-lettered (it could not be decoded or answered)."""
        instruments = self.instruments
        if instruments is not None:
            instruments.dead_lettered.add(1, {"messaging.destination.name": destination})

    def record_slow_statement(self, statement: str, seconds: float, batch_size: int) -> None:
        """Record a store claim or save that took longer than the store's threshold."""
        instruments = self.instruments
        if instruments is not None:
            instruments.slow_statements.record(
                seconds, {"db.operation.name": statement, "db.operation.batch.size": batch_size}
            )

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Report ``breaker``'s circuits as the ``saga.circuit.state`` gauge."""
        self._breakers.add(breaker)
        _ = self.instruments  # registers the gauges now, if metrics are on

    def record_outbox(
        self, owner: str, *, lag: float | None = None, size: int | None = None
    ) -> None:
        """Remember a relay's last outbox sample (reported by the outbox gauges)."""
        if lag is not None:
            self._outbox_lag[owner] = lag
        if size is not None:
            self._outbox_size[owner] = size

    def record_oldest(self, status: SagaStatus, age: float) -> None:
        """Remember the age in its state of the least recently updated saga in ``status``."""
        self._oldest[status.value] = age

    def observe_outbox_lag(self, _options: CallbackOptions) -> Iterator[Observation]:
        """Gauge callback: the outbox lag (the largest any relay of this process saw)."""
        return self._observe_max(self._outbox_lag)

    def observe_outbox_size(self, _options: CallbackOptions) -> Iterator[Observation]:
        """Gauge callback: the outbox size (the largest any relay saw; they share one outbox)."""
        return self._observe_max(self._outbox_size)

    def observe_oldest(self, _options: CallbackOptions) -> Iterator[Observation]:
        """Gauge callback: the oldest active saga's age per status."""
        return self._observe(self._oldest, "saga.status")

    def observe_circuits(self, _options: CallbackOptions) -> Iterator[Observation]:
        """Gauge callback: each destination's circuit state."""
        values = {
            destination: _CIRCUIT_VALUES.get(status.state.value, 0)
            for breaker in list(self._breakers)
            for destination, status in breaker.statuses().items()
        }
        return self._observe(values, "messaging.destination.name")

    def _observe_max(self, values: Mapping[str, float]) -> Iterator[Observation]:
        # One value per process, whatever the relays' (random) owner names: low cardinality.
        return self._observe({"": max(values.values())}, None) if values else iter(())

    @staticmethod
    def _observe(values: Mapping[str, float], key: str | None) -> Iterator[Observation]:
        api = _api()
        assert api is not None  # noqa: S101 - callbacks run under a meter
        for name, value in list(values.items()):
            yield api.metrics.Observation(value, {key: name} if key else None)


def _messaging_attributes(envelope: Envelope, system: str, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": envelope.key,
        "messaging.message.id": envelope.message_id,
    }
    headers = envelope.headers
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
        attributes["saga.id"] = envelope.correlation_id
    for header, attribute in (
        ("x-saga-type", "saga.type"),
        ("x-saga-step", "saga.step"),
        ("x-saga-kind", "saga.kind"),
    ):
        value = headers.get(header)
        if value:
            attributes[attribute] = value
    attempt = headers.get("x-saga-attempt")
    if attempt and attempt.isdigit():
        attributes["saga.attempt"] = int(attempt)
    return attributes


def messaging_system(bus: object) -> str:
    """The ``messaging.system`` of a bus (its ``messaging_system`` attribute, if it has one)."""
    return str(getattr(bus, "messaging_system", "sagas"))


# ---------------------------------------------------------------------- configuration

_EXPORTER_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
)


def configure_from_env(default_service_name: str = "sagas-worker") -> bool:
    """Set up the OpenTelemetry SDK from the standard ``OTEL_*`` variables, if they ask for it.

    Does something only when an exporter is named (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``/``..._METRICS_ENDPOINT``, ``OTEL_TRACES_EXPORTER``
    or ``OTEL_METRICS_EXPORTER``), ``OTEL_SDK_DISABLED`` is not ``true``, and no provider was
    set already (an application that configures its own providers is never overridden).
    Exporters: ``otlp`` (OTLP over HTTP/protobuf, the default), ``console`` or ``none``. The
    SDK itself reads ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_HEADERS``,
    ``OTEL_BSP_*`` and ``OTEL_METRIC_EXPORT_INTERVAL``.

    Returns:
        Whether the SDK was configured here.
    """
    environ = os.environ
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if not any(environ.get(name) for name in _EXPORTER_VARIABLES):
        return False
    api = _api()
    if api is None:
        _log.warning("OTEL_* is set but OpenTelemetry is missing: %s", _INSTALL_HINT)
        return False
    try:
        sdk_resources = importlib.import_module("opentelemetry.sdk.resources")
        sdk_trace = importlib.import_module("opentelemetry.sdk.trace")
        sdk_export = importlib.import_module("opentelemetry.sdk.trace.export")
        sdk_metrics = importlib.import_module("opentelemetry.sdk.metrics")
        sdk_metrics_export = importlib.import_module("opentelemetry.sdk.metrics.export")
    except ImportError:
        _log.warning("OTEL_* is set but the OpenTelemetry SDK is missing: %s", _INSTALL_HINT)
        return False
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": default_service_name}
    resource = sdk_resources.Resource.create(attributes)
    configured = False
    if _is_api_default(api.trace.get_tracer_provider()):
        span_exporter = _exporter("traces", environ.get("OTEL_TRACES_EXPORTER", "otlp"))
        if span_exporter is not None:
            tracer_provider = sdk_trace.TracerProvider(resource=resource)  # sampler from env
            tracer_provider.add_span_processor(sdk_export.BatchSpanProcessor(span_exporter))
            api.trace.set_tracer_provider(tracer_provider)
            configured = True
    if _is_api_default(api.metrics.get_meter_provider()):
        metric_exporter = _exporter("metrics", environ.get("OTEL_METRICS_EXPORTER", "otlp"))
        if metric_exporter is not None:
            reader = sdk_metrics_export.PeriodicExportingMetricReader(metric_exporter)
            api.metrics.set_meter_provider(
                sdk_metrics.MeterProvider(resource=resource, metric_readers=[reader])
            )
            configured = True
    if configured:
        _log.info("OpenTelemetry configured from OTEL_* variables")
    return configured


def _exporter(signal: str, name: str) -> Any:
    name = name.strip().lower()
    if name in {"", "none"}:
        return None
    if name == "console":
        if signal == "traces":
            return importlib.import_module("opentelemetry.sdk.trace.export").ConsoleSpanExporter()
        return importlib.import_module("opentelemetry.sdk.metrics.export").ConsoleMetricExporter()
    if name != "otlp":
        _log.warning(
            "OTEL_%s_EXPORTER=%s is not supported here (otlp, console, none)", signal, name
        )
        return None
    protocol = os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL",
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    )
    if protocol != "http/protobuf":
        _log.warning("OTLP protocol %s is not supported here; using http/protobuf", protocol)
    cls = "OTLPSpanExporter" if signal == "traces" else "OTLPMetricExporter"
    try:
        exporter_module = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.http.{signal[:-1]}_exporter"
        )
    except ImportError:
        _log.warning(
            "OTLP export asked for but opentelemetry-exporter-otlp-proto-http is missing: "
            "pip install 'sagas-orchestrator[otel]'"
        )
        return None
    return getattr(exporter_module, cls)()

"""The fluent builder that turns a few lines into a validated ``SagaDefinition``.

Example:
    ```python
    order_saga = (
        SagaBuilder("order-processing", data=OrderData)
        .step("reserve-inventory")
            .send(ReserveInventory, to="inventory")
            .compensate_with(ReleaseInventory)
            .timeout(seconds=10).retry(attempts=3, backoff=exponential(0.2, max=5))
        .step("process-payment")
            .send(ProcessPayment, to="payments")
            .compensate_with(RefundPayment)
        .step("create-shipment")
            .send(CreateShipment, to="shipping")
        .saga_timeout(minutes=5)
        .build()
    )
    ```

Problems are collected while the chain runs and raised together by ``build()`` as one
:class:`~sagas_abstractions.InvalidDefinition` that names the saga, the step and the field.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, NoReturn, TypeVar

from pydantic import BaseModel

from sagas_abstractions import InvalidDefinition, StepKind
from sagas_core.definition import (
    ActionKind,
    ActionSpec,
    EventDataBuilder,
    EventRole,
    EventTrigger,
    MissingSagaPolicy,
    PayloadBuilder,
    ReplyMerger,
    SagaDefinition,
    StepDefinition,
    TimeoutOf,
    event_name,
    fingerprint_of,
)
from sagas_core.retry import Backoff, ExponentialBackoff, RetryPolicy

__all__ = ["SagaBuilder", "StepBuilder", "local_destination"]

D = TypeVar("D", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$")
_DESTINATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_MAX_TOPIC = 200
_TOPIC = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")

SagaIds = str | Callable[[Any], str | Iterable[str]]
"""How an event names its saga(s): a field of the event, or a callable ``event -> id(s)``."""

EventData = Callable[[Any], BaseModel | Mapping[str, Any]] | Mapping[str, str] | None
"""How an event becomes saga data: ``None`` takes fields of the same name, a mapping
``{data_field: event_field}`` renames some, a callable ``event -> data`` builds it."""

DEFAULT_COMPENSATION_RETRY = RetryPolicy(
    attempts=5, backoff=ExponentialBackoff(initial=0.5, maximum=30.0)
)
"""Compensations must finish, so by default they are tried harder than forward steps."""


def local_destination(saga_type: str) -> str:
    """The destination that carries a saga's local steps (hosted by the worker itself)."""
    return f"sagas.local.{saga_type}"


def _duration(
    value: timedelta | float | None, seconds: float, minutes: float, hours: float
) -> timedelta:
    if isinstance(value, timedelta):
        base = value
    elif value is not None:
        base = timedelta(seconds=value)
    else:
        base = timedelta()
    return base + timedelta(seconds=seconds, minutes=minutes, hours=hours)


@dataclass(frozen=True, slots=True)
class _TimeoutFromData:
    """A user's ``data -> span | seconds | None``, checked each time it is called."""

    compute: Callable[[Any], timedelta | float | None]

    def __call__(self, data: BaseModel) -> timedelta | None:
        value = self.compute(data)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
            raise TypeError(f"a timeout must be a timedelta, seconds or None, got {value!r}")
        span = value if isinstance(value, timedelta) else timedelta(seconds=value)
        if span <= timedelta():
            raise ValueError(f"a timeout must be positive, got {span.total_seconds():g}s")
        return span


@dataclass
class _ActionDraft:
    target: type[BaseModel] | Callable[..., Awaitable[Any]]
    destination: str | None
    mapper: Any
    timeout: timedelta | None = None
    retry: RetryPolicy | None = None


@dataclass
class _TriggerDraft:
    role: EventRole
    event: type[BaseModel]
    saga_id: SagaIds
    name: str | None
    topic: str | None
    missing: MissingSagaPolicy | str | None
    data: EventData
    step: str | None = None


@dataclass
class _StepDraft:
    name: str
    action: _ActionDraft | None = None
    compensation: _ActionDraft | None = None
    timeout: timedelta | None = None
    timeout_of: TimeoutOf | None = None
    retry: RetryPolicy | None = None
    merge: Any = None
    reply_model: type[BaseModel] | None = None
    wait: _TriggerDraft | None = None
    problems: list[InvalidDefinition] = field(default_factory=list)


class SagaBuilder(Generic[D]):
    """Builds a :class:`~sagas_core.definition.SagaDefinition` step by step.

    Args:
        name: The saga type: letters, digits, ``-`` and ``_``; it appears in routing keys.
        data: The pydantic model of the saga data.
    """

    def __init__(self, name: str, *, data: type[D]) -> None:
        self._name = name
        self._data = data
        self._steps: list[_StepDraft] = []
        self._saga_timeout: timedelta | None = None
        self._problems: list[InvalidDefinition] = []
        self._triggers: list[_TriggerDraft] = []
        self._missing: MissingSagaPolicy | str = MissingSagaPolicy.IGNORE

    @property
    def name(self) -> str:
        """The saga type being built."""
        return self._name

    def _problem(self, message: str, *, step: str | None = None, field: str | None = None) -> None:
        self._problems.append(
            InvalidDefinition(message, saga_type=self._name, step=step, field=field)
        )

    def step(self, name: str) -> StepBuilder[D]:
        """Add a step; configure it on the returned builder."""
        draft = _StepDraft(name=name)
        self._steps.append(draft)
        return StepBuilder(self, draft)

    def saga_timeout(
        self,
        value: timedelta | float | None = None,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
    ) -> SagaBuilder[D]:
        """Compensate the saga if its forward steps have not all finished within this time."""
        duration = _duration(value, seconds, minutes, hours)
        if duration <= timedelta():
            self._problem(f"saga timeout must be positive, got {duration.total_seconds()}s")
        self._saga_timeout = duration
        return self

    def starts_on(
        self,
        event: type[BaseModel],
        *,
        saga_id: SagaIds,
        data: EventData = None,
        name: str | None = None,
        topic: str | None = None,
    ) -> SagaBuilder[D]:
        """Start a saga when ``event`` arrives on the bus.

        The saga's id comes from the event, so a duplicate (or a second event with the same
        id) finds the saga already there and starts nothing.

        Args:
            event: The event's pydantic model; the message body must fit it.
            saga_id: The field of the event that holds the saga id, or a callable
                ``event -> id`` (or several ids: one saga each).
            data: How to build the saga data from the event (see :data:`EventData`).
            name: The event's name (its class name by default).
            topic: The routing key it is published with (the name by default).
        """
        self._triggers.append(
            _TriggerDraft(EventRole.START, event, saga_id, name, topic, None, data)
        )
        return self

    def cancel_on(
        self,
        event: type[BaseModel],
        *,
        saga_id: SagaIds,
        name: str | None = None,
        topic: str | None = None,
        missing: MissingSagaPolicy | str | None = None,
    ) -> SagaBuilder[D]:
        """Compensate a running saga when ``event`` arrives (ignored once it has finished).

        Args:
            event: The event's pydantic model.
            saga_id: The event field holding the saga id, or a callable ``event -> id(s)``.
            name: The event's name (its class name by default).
            topic: The routing key it is published with (the name by default).
            missing: When no such saga exists: ``"ignore"`` or ``"dead-letter"`` (the saga's
                :meth:`when_missing` policy by default).
        """
        self._triggers.append(
            _TriggerDraft(EventRole.CANCEL, event, saga_id, name, topic, missing, None)
        )
        return self

    def when_missing(self, policy: MissingSagaPolicy | str) -> SagaBuilder[D]:
        """Choose what an event does when the saga it correlates to does not exist.

        ``"ignore"`` (the default: a log line), ``"dead-letter"`` or ``"start"``. Applies to
        ``wait_for`` and ``cancel_on`` events that do not set ``missing=``.
        """
        self._missing = policy
        return self

    def _add_wait(self, draft: _TriggerDraft) -> None:
        self._triggers.append(draft)

    def compensate_with(self, *_args: object, **_kwargs: object) -> NoReturn:
        """Always raises: a compensation belongs to a step, so call it after ``.step(...)``."""
        raise InvalidDefinition(
            "compensate_with() must follow a step: call .step(name) first", saga_type=self._name
        )

    def build(self) -> SagaDefinition:
        """Validate everything and return the immutable definition.

        Raises:
            InvalidDefinition: naming the saga, the step and the field of the first problem;
                ``problems`` lists every one found.
        """
        problems = list(self._problems)
        if not _NAME.match(self._name):
            problems.append(
                InvalidDefinition(
                    "saga name must be 1-100 letters, digits, '-' or '_', starting with a letter "
                    f"or digit; got {self._name!r}",
                    saga_type=self._name,
                )
            )
        if not _is_model(self._data):
            problems.append(
                InvalidDefinition(
                    f"data must be a pydantic BaseModel subclass, got {self._data!r}",
                    saga_type=self._name,
                )
            )
        if not self._steps:
            problems.append(
                InvalidDefinition("a saga needs at least one step", saga_type=self._name)
            )
        seen: set[str] = set()
        steps: list[StepDefinition] = []
        for index, draft in enumerate(self._steps):
            if draft.name in seen:
                problems.append(
                    InvalidDefinition(
                        f"duplicate step name {draft.name!r}", saga_type=self._name, step=draft.name
                    )
                )
            seen.add(draft.name)
            step = _StepCompiler(self._name, self._data, draft, index, problems).compile()
            if step is not None:
                steps.append(step)
        triggers = _TriggerCompiler(self._name, self._data, self._missing, problems).compile(
            self._triggers
        )
        if problems:
            first = problems[0]
            if len(problems) > 1:
                listed = "\n".join(f"  - {p}" for p in problems)
                error = InvalidDefinition(
                    f"{first.reason} (and {len(problems) - 1} more problem(s):\n{listed}\n)",
                    saga_type=first.saga_type,
                    step=first.step,
                    field=first.field,
                )
            else:
                error = first
            error.problems = problems
            raise error
        # The fingerprint covers what stored state means (steps, their commands and data), not
        # timeouts and retry policies: in-flight sagas keep their deadlines and simply use the
        # new values for their next attempts, so tuning those must not park them.
        description = {
            "name": self._name,
            "data": self._data.model_json_schema(),
            "steps": [
                {
                    "name": s.name,
                    "action": s.action.shape(),
                    "compensation": None if s.compensation is None else s.compensation.shape(),
                    "reply": None if s.reply_model is None else s.reply_model.model_json_schema(),
                    "merge": _describe_merge(s.merge),
                }
                for s in steps
            ],
        }
        return SagaDefinition(
            name=self._name,
            data_model=self._data,
            steps=tuple(steps),
            saga_timeout=self._saga_timeout,
            fingerprint=fingerprint_of(description),
            triggers=triggers,
        )


class StepBuilder(Generic[D]):
    """Configures one step; also continues the chain (``.step()``, ``.build()``...)."""

    def __init__(self, saga: SagaBuilder[D], draft: _StepDraft) -> None:
        self._saga = saga
        self._draft = draft

    def _problem(self, message: str, *, field: str | None = None) -> None:
        self._draft.problems.append(
            InvalidDefinition(
                message, saga_type=self._saga.name, step=self._draft.name, field=field
            )
        )

    def send(
        self,
        command: type[C],
        *,
        to: str,
        map: Callable[[D], C | Mapping[str, Any]] | Mapping[str, str] | None = None,  # noqa: A002
        reply: type[BaseModel] | None = None,
    ) -> StepBuilder[D]:
        """Make this a remote step: send ``command`` to the participant destination ``to``.

        Args:
            command: The command's pydantic model; its class name is the type on the wire.
            to: The participant destination (a queue per destination on RabbitMQ).
            map: How to build the command from the saga data: ``None`` takes fields of the same
                name; a mapping ``{command_field: data_field}`` renames some; a callable
                ``data -> command`` builds it by hand.
            reply: Model a successful reply's data must fit; its fields are merged by name.
        """
        if self._draft.action is not None:
            self._problem("a step has one action: .send() or .run() was already called")
        self._draft.action = _ActionDraft(target=command, destination=to, mapper=map)
        self._draft.reply_model = reply
        return self

    def run(self, handler: Callable[..., Awaitable[Any]]) -> StepBuilder[D]:
        """Make this a local step: run ``handler(data, *dependencies)`` inside the worker.

        The handler receives the saga data model as its first argument and further arguments
        injected by type annotation; what it returns (a model, a mapping or ``None``) is merged
        into the saga data like a reply.
        """
        if self._draft.action is not None:
            self._problem("a step has one action: .send() or .run() was already called")
        self._draft.action = _ActionDraft(target=handler, destination=None, mapper=None)
        return self

    def wait_for(
        self,
        event: type[BaseModel],
        *,
        saga_id: SagaIds,
        name: str | None = None,
        topic: str | None = None,
        missing: MissingSagaPolicy | str | None = None,
        data: EventData = None,
    ) -> StepBuilder[D]:
        """Make this a step that sends nothing and waits for ``event`` on the bus.

        The event's fields are merged into the saga data like a reply's (see :meth:`merge`).
        An event that arrives before the saga reaches this step is kept and completes the step
        as soon as it begins. With :meth:`timeout`, a step still waiting compensates the saga.

        Args:
            event: The event's pydantic model.
            saga_id: The event field holding the saga id, or a callable ``event -> id(s)``.
            name: The event's name (its class name by default).
            topic: The routing key it is published with (the name by default).
            missing: When no such saga exists: ``"ignore"``, ``"dead-letter"`` or ``"start"``
                (start the saga from the event's data, then apply the event); the saga's
                :meth:`SagaBuilder.when_missing` policy by default.
            data: For ``missing="start"``: how to build the saga data from the event.
        """
        if self._draft.action is not None:
            self._problem("a step has one action: .send(), .run() or .wait_for() was already set")
        trigger = _TriggerDraft(
            EventRole.ADVANCE, event, saga_id, name, topic, missing, data, step=self._draft.name
        )
        self._draft.action = _ActionDraft(target=event, destination=None, mapper=None)
        self._draft.wait = trigger
        self._saga._add_wait(trigger)  # noqa: SLF001 - the builders are one unit
        return self

    def compensate_with(
        self,
        action: type[BaseModel] | Callable[..., Awaitable[Any]],
        *,
        to: str | None = None,
        map: Callable[[D], BaseModel | Mapping[str, Any]] | Mapping[str, str] | None = None,  # noqa: A002
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
    ) -> StepBuilder[D]:
        """Undo this step with a command (a model class) or a local async callable.

        Args:
            action: A command model to send, or an async callable to run locally.
            to: Destination of a compensation command; defaults to the step's destination.
            map: As for :meth:`send`.
            timeout: Per-attempt timeout of the compensation; defaults to the step's.
            retry: Retry policy of the compensation; defaults to 5 attempts with exponential
                backoff (compensations must finish).
        """
        if self._draft.compensation is not None:
            self._problem("compensate_with() was already called for this step")
        span = None
        if timeout is not None:
            span = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
            # Validated like .timeout(): a negative span would time every compensation attempt
            # out at once, and zero would silently fall back to the step's timeout.
            if span <= timedelta():
                self._problem(f"compensation timeout must be positive, got {span.total_seconds()}s")
        self._draft.compensation = _ActionDraft(
            target=action, destination=to, mapper=map, timeout=span, retry=retry
        )
        return self

    def timeout(
        self,
        value: timedelta | float | Callable[[D], timedelta | float | None] | None = None,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
    ) -> StepBuilder[D]:
        """Time out each attempt that gets no reply within this time.

        ``value`` may be a function of the saga data (``lambda data: data.hold_for``), called
        each time an attempt begins: a span, seconds, or ``None`` for no timeout. When it raises
        or returns something else, the attempt is not sent and the step fails, naming why.
        """
        if callable(value) and not isinstance(value, timedelta):
            if seconds or minutes or hours:
                self._problem("a timeout function takes no seconds=, minutes= or hours=")
            self._draft.timeout = None
            self._draft.timeout_of = _TimeoutFromData(value)
            return self
        duration = _duration(value, seconds, minutes, hours)
        if duration <= timedelta():
            self._problem(f"timeout must be positive, got {duration.total_seconds()}s")
        self._draft.timeout = duration
        self._draft.timeout_of = None
        return self

    def retry(
        self,
        attempts: int,
        *,
        backoff: Backoff | None = None,
        retry_on_timeout: bool = True,
        retry_codes: tuple[str, ...] = (),
        never_retry_codes: tuple[str, ...] = (),
    ) -> StepBuilder[D]:
        """Try the step up to ``attempts`` times in all on retryable failures and timeouts."""
        if attempts < 1:
            self._problem(f"retry attempts must be >= 1, got {attempts}")
            return self
        self._draft.retry = RetryPolicy(
            attempts=attempts,
            backoff=backoff or ExponentialBackoff(initial=0.2, maximum=5.0),
            retry_on_timeout=retry_on_timeout,
            retry_codes=frozenset(retry_codes),
            never_retry_codes=frozenset(never_retry_codes),
        )
        return self

    def merge(
        self,
        merge: Callable[[D, Mapping[str, Any]], BaseModel | Mapping[str, Any]] | Mapping[str, str],
    ) -> StepBuilder[D]:
        """Control how a successful reply's data enters the saga data.

        Args:
            merge: A mapping ``{data_field: reply_field}``, or a callable
                ``(data, reply_data) -> new data``. By default, reply fields that have the name of
                a data field are copied.
        """
        self._draft.merge = merge
        return self

    # Chain continuation -------------------------------------------------------------------

    def step(self, name: str) -> StepBuilder[D]:
        """Finish this step and add the next one."""
        return self._saga.step(name)

    def saga_timeout(
        self,
        value: timedelta | float | None = None,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
    ) -> SagaBuilder[D]:
        """See :meth:`SagaBuilder.saga_timeout`."""
        return self._saga.saga_timeout(value, seconds=seconds, minutes=minutes, hours=hours)

    def cancel_on(
        self,
        event: type[BaseModel],
        *,
        saga_id: SagaIds,
        name: str | None = None,
        topic: str | None = None,
        missing: MissingSagaPolicy | str | None = None,
    ) -> SagaBuilder[D]:
        """See :meth:`SagaBuilder.cancel_on`."""
        return self._saga.cancel_on(event, saga_id=saga_id, name=name, topic=topic, missing=missing)

    def when_missing(self, policy: MissingSagaPolicy | str) -> SagaBuilder[D]:
        """See :meth:`SagaBuilder.when_missing`."""
        return self._saga.when_missing(policy)

    def build(self) -> SagaDefinition:
        """See :meth:`SagaBuilder.build`."""
        return self._saga.build()


class _StepCompiler:
    """Turns one step draft into a StepDefinition, reporting problems instead of raising."""

    def __init__(
        self,
        saga: str,
        data: type[BaseModel],
        draft: _StepDraft,
        index: int,
        problems: list[InvalidDefinition],
    ) -> None:
        self.saga = saga
        self.data = data
        self.draft = draft
        self.index = index
        self.problems = problems

    def problem(self, message: str, *, field: str | None = None) -> None:
        self.problems.append(
            InvalidDefinition(message, saga_type=self.saga, step=self.draft.name, field=field)
        )

    def compile(self) -> StepDefinition | None:
        draft = self.draft
        self.problems.extend(draft.problems)
        if not _NAME.match(draft.name):
            self.problem(
                "step name must be 1-100 letters, digits, '-' or '_', starting with a letter or "
                f"digit; got {draft.name!r}"
            )
        if draft.action is None:
            self.problem("step has no action: call .send(Command, to=...) or .run(handler)")
            return None
        if not _is_model(self.data):
            return None
        retry = draft.retry or RetryPolicy(attempts=1)
        if draft.wait is not None:
            action = self.wait_action(draft.wait, draft.timeout, draft.timeout_of)
        else:
            action = self.action(
                draft.action,
                StepKind.EXECUTE,
                None,
                draft.timeout,
                retry,
                timeout_of=draft.timeout_of,
            )
        compensation = None
        if draft.compensation is not None:
            own = draft.compensation.timeout
            compensation = self.action(
                draft.compensation,
                StepKind.COMPENSATE,
                action.destination if action and action.kind is ActionKind.REMOTE else None,
                own or draft.timeout,
                draft.compensation.retry or DEFAULT_COMPENSATION_RETRY,
                timeout_of=None if own else draft.timeout_of,
            )
        merge = self.merger(draft.merge, draft.reply_model)
        if action is None or merge is None:
            return None
        return StepDefinition(
            name=draft.name,
            index=self.index,
            action=action,
            compensation=compensation,
            merge=merge,
            reply_model=draft.reply_model,
        )

    def wait_action(
        self, trigger: _TriggerDraft, timeout: timedelta | None, timeout_of: TimeoutOf | None
    ) -> ActionSpec | None:
        if self.draft.retry is not None:
            self.problem("a step that waits for an event cannot be retried: there is no command")
        if self.draft.compensation is not None:
            self.problem("a step that waits for an event has nothing to compensate")
        if not _is_model(trigger.event):
            return None  # reported by the trigger compiler
        name = trigger.name or event_name(trigger.event)
        return ActionSpec(
            kind=ActionKind.WAIT,
            command_type=name,
            destination=trigger.topic or name,
            build_payload=_no_payload,
            timeout=timeout,
            retry=RetryPolicy(attempts=1),
            command_model=trigger.event,
            timeout_of=timeout_of,
        )

    def action(
        self,
        draft: _ActionDraft,
        kind: StepKind,
        default_destination: str | None,
        timeout: timedelta | None,
        retry: RetryPolicy,
        *,
        timeout_of: TimeoutOf | None = None,
    ) -> ActionSpec | None:
        target = draft.target
        what = "compensation" if kind is StepKind.COMPENSATE else "step"
        if isinstance(target, type):
            if not issubclass(target, BaseModel):
                self.problem(
                    f"{what} command must be a pydantic BaseModel subclass, got {target!r}"
                )
                return None
            destination = draft.destination or default_destination
            if destination is None:
                self.problem(f"{what} command {target.__name__} needs a destination: pass to=...")
                return None
            if not _DESTINATION.match(destination):
                self.problem(
                    "destination must be 1-200 letters, digits, '.', '-' or '_'; "
                    f"got {destination!r}"
                )
                return None
            builder = self.payload_builder(target, draft.mapper, what)
            if builder is None:
                return None
            return ActionSpec(
                kind=ActionKind.REMOTE,
                command_type=target.__name__,
                destination=destination,
                build_payload=builder,
                timeout=timeout,
                retry=retry,
                command_model=target,
                timeout_of=timeout_of,
            )
        if callable(target):
            if not inspect.iscoroutinefunction(target):
                self.problem(f"local {what} handler {target!r} must be an async function")
                return None
            if draft.destination is not None or draft.mapper is not None:
                self.problem(f"a local {what} takes no destination or mapper")
            suffix = ".compensate" if kind is StepKind.COMPENSATE else ""
            return ActionSpec(
                kind=ActionKind.LOCAL,
                command_type=f"{self.saga}.{self.draft.name}{suffix}",
                destination=local_destination(self.saga),
                build_payload=_dump_data,
                timeout=timeout,
                retry=retry,
                handler=target,
                timeout_of=timeout_of,
            )
        self.problem(  # type: ignore[unreachable] # guards callers without a type checker
            f"{what} must be a command model or an async function, got {target!r}"
        )
        return None

    def payload_builder(
        self, command: type[BaseModel], mapper: Any, what: str
    ) -> PayloadBuilder | None:
        if callable(mapper) and not isinstance(mapper, Mapping):
            return _CallableMapper(command, mapper)
        if mapper is not None and not isinstance(mapper, Mapping):
            self.problem(f"{what} map must be a mapping or a callable, got {mapper!r}")
            return None
        sources = _field_sources(
            command,
            self.data,
            mapper or {},
            option="map names",
            fix=lambda name: (
                f"add it to the data model, or pass map={{'{name}': '<data field>'}} or a callable"
            ),
            report=lambda message, field: self.problem(message, field=field),
        )
        return _FieldMapper(command, sources)

    def merger(self, merge: Any, reply_model: type[BaseModel] | None) -> ReplyMerger | None:
        data_fields = self.data.model_fields
        if reply_model is not None and not _is_model(reply_model):
            self.problem(f"reply must be a pydantic BaseModel subclass, got {reply_model!r}")
            return None
        if merge is None:
            return _NameMerger(frozenset(data_fields))
        if isinstance(merge, Mapping):
            for data_field in merge:
                if data_field not in data_fields:
                    self.problem(
                        f"merge writes {data_field!r}, which is not a field of "
                        f"{self.data.__name__}",
                        field=str(data_field),
                    )
            return _RenameMerger(dict(merge))
        if callable(merge):
            return _CallableMerger(merge)
        self.problem(f"merge must be a mapping or a callable, got {merge!r}")
        return None


class _TriggerCompiler:
    """Turns trigger drafts into EventTriggers, reporting problems instead of raising."""

    def __init__(
        self,
        saga: str,
        data: type[BaseModel],
        default_missing: MissingSagaPolicy | str,
        problems: list[InvalidDefinition],
    ) -> None:
        self.saga = saga
        self.data = data
        self.problems = problems
        self.default_missing = self.policy(default_missing, None, None)

    def problem(self, message: str, *, step: str | None = None, field: str | None = None) -> None:
        self.problems.append(
            InvalidDefinition(message, saga_type=self.saga, step=step, field=field)
        )

    def policy(
        self, value: MissingSagaPolicy | str | None, step: str | None, event: str | None
    ) -> MissingSagaPolicy | None:
        if value is None:
            return None
        try:
            return MissingSagaPolicy(value)
        except ValueError:
            allowed = ", ".join(repr(p.value) for p in MissingSagaPolicy)
            where = f" for event {event}" if event else ""
            self.problem(
                f"missing-saga policy{where} must be one of {allowed}, got {value!r}", step=step
            )
            return None

    def compile(self, drafts: list[_TriggerDraft]) -> tuple[EventTrigger, ...]:
        triggers: list[EventTrigger] = []
        seen: dict[str, EventRole] = {}
        for draft in drafts:
            trigger = self.trigger(draft)
            if trigger is None:
                continue
            if trigger.topic in seen:
                self.problem(
                    f"event topic {trigger.topic!r} is already used by this saga "
                    f"({seen[trigger.topic].value}): one role per event",
                    step=draft.step,
                )
                continue
            seen[trigger.topic] = trigger.role
            triggers.append(trigger)
        return tuple(triggers)

    def trigger(self, draft: _TriggerDraft) -> EventTrigger | None:
        event = draft.event
        if not _is_model(event):
            self.problem(
                f"event must be a pydantic BaseModel subclass, got {event!r}", step=draft.step
            )
            return None
        name = draft.name or event_name(event)
        topic = draft.topic or name
        if not _TOPIC.match(topic) or len(topic) > _MAX_TOPIC:
            self.problem(
                "event topic must be words of letters, digits, '-' or '_' separated by '.' "
                f"(no wildcards); got {topic!r}",
                step=draft.step,
            )
            return None
        saga_ids = self.saga_ids(event, draft)
        if draft.role is EventRole.START:
            missing: MissingSagaPolicy | None = MissingSagaPolicy.START
        else:
            missing = self.policy(draft.missing, draft.step, name) or self.default_missing
        if missing is None:
            return None
        if missing is MissingSagaPolicy.START and draft.role is EventRole.CANCEL:
            self.problem(
                f"cancel_on({name}) cannot start a saga: use missing='ignore' or 'dead-letter'",
                step=draft.step,
            )
            return None
        build_data = None
        if missing is MissingSagaPolicy.START:
            build_data = self.data_builder(event, draft)
            if build_data is None:
                return None
        elif draft.data is not None:
            self.problem(
                f"data= for event {name} is only used to start a saga (missing='start')",
                step=draft.step,
            )
        if saga_ids is None:
            return None
        return EventTrigger(
            role=draft.role,
            name=name,
            topic=topic,
            model=event,
            saga_ids=saga_ids,
            missing=missing,
            build_data=build_data,
            step=draft.step,
        )

    def saga_ids(self, event: type[BaseModel], draft: _TriggerDraft) -> Any:
        saga_id = draft.saga_id
        if isinstance(saga_id, str):
            if saga_id not in event.model_fields:
                self.problem(
                    f"saga_id names {saga_id!r}, which is not a field of {event.__name__}",
                    step=draft.step,
                    field=saga_id,
                )
                return None
            return _FieldIds(saga_id)
        if callable(saga_id):
            return saga_id
        self.problem(  # type: ignore[unreachable] # guards callers without a type checker
            f"saga_id must be an event field name or a callable, got {saga_id!r}",
            step=draft.step,
        )
        return None

    def data_builder(self, event: type[BaseModel], draft: _TriggerDraft) -> EventDataBuilder | None:
        mapper = draft.data
        if callable(mapper) and not isinstance(mapper, Mapping):
            return _CallableEventData(mapper)
        if mapper is not None and not isinstance(mapper, Mapping):
            self.problem(  # type: ignore[unreachable] # guards callers without a type checker
                f"data must be a mapping or a callable, got {mapper!r}", step=draft.step
            )
            return None
        sources = _field_sources(
            self.data,
            event,
            mapper or {},
            option="data writes",
            fix=lambda name: f"pass data={{'{name}': '<event field>'}} or a callable",
            report=lambda message, field: self.problem(message, step=draft.step, field=field),
        )
        return _FieldEventData(sources)


def _field_sources(
    target: type[BaseModel],
    source: type[BaseModel],
    renames: Mapping[str, str],
    *,
    option: str,
    fix: Callable[[str], str],
    report: Callable[[str, str], None],
) -> dict[str, str]:
    """Which ``source`` field fills each ``target`` field: same name, or renamed.

    Reports (``report(message, field)``) renames that name unknown fields and required target
    fields that nothing fills; ``option`` words the rename (``"map names"``), ``fix`` the hint.
    """
    verb = option.split(maxsplit=1)[0]
    for target_field, source_field in renames.items():
        if target_field not in target.model_fields:
            report(
                f"{option} {target_field!r}, which is not a field of {target.__name__}",
                target_field,
            )
        if source_field not in source.model_fields:
            report(
                f"{verb} reads {source_field!r}, which is not a field of {source.__name__}",
                source_field,
            )
    sources: dict[str, str] = {}
    for name, info in target.model_fields.items():
        origin = renames.get(name, name)
        if origin in source.model_fields:
            sources[name] = origin
        elif info.is_required():
            report(
                f"{target.__name__}.{name} is required but {source.__name__} has no field "
                f"{origin!r}: {fix(name)}",
                name,
            )
    return sources


def _no_payload(_: BaseModel) -> dict[str, Any]:
    return {}


@dataclass(frozen=True, slots=True)
class _FieldIds:
    field: str

    def __call__(self, event: BaseModel) -> str:
        return str(getattr(event, self.field))


@dataclass(frozen=True, slots=True)
class _FieldEventData:
    sources: dict[str, str]

    def __call__(self, event: BaseModel) -> dict[str, Any]:
        dumped = event.model_dump(mode="json")
        return {name: dumped[source] for name, source in self.sources.items()}


@dataclass(frozen=True, slots=True)
class _CallableEventData:
    build: Callable[[Any], BaseModel | Mapping[str, Any]]

    def __call__(self, event: BaseModel) -> dict[str, Any]:
        result = self.build(event)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return dict(result)


def _describe_merge(merge: object) -> object:
    if isinstance(merge, _RenameMerger):
        return {"renames": sorted(merge.renames.items())}
    if isinstance(merge, _CallableMerger):
        return {"callable": getattr(merge.merge, "__qualname__", repr(merge.merge))}
    return "by-name"


def _is_model(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _dump_data(data: BaseModel) -> dict[str, Any]:
    return data.model_dump(mode="json")


def _as_payload(command: type[BaseModel], value: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, command):
        return value.model_dump(mode="json")
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return command.model_validate(value).model_dump(mode="json")


@dataclass(frozen=True, slots=True)
class _FieldMapper:
    command: type[BaseModel]
    sources: dict[str, str]

    def __call__(self, data: BaseModel) -> dict[str, Any]:
        values = {name: getattr(data, source) for name, source in self.sources.items()}
        return self.command.model_validate(values).model_dump(mode="json")


@dataclass(frozen=True, slots=True)
class _CallableMapper:
    command: type[BaseModel]
    mapper: Callable[[Any], BaseModel | Mapping[str, Any]]

    def __call__(self, data: BaseModel) -> dict[str, Any]:
        return _as_payload(self.command, self.mapper(data))


@dataclass(frozen=True, slots=True)
class _NameMerger:
    fields: frozenset[str]

    def __call__(self, data: BaseModel, reply: Mapping[str, Any]) -> dict[str, Any]:
        merged = data.model_dump(mode="json")
        merged.update({key: value for key, value in reply.items() if key in self.fields})
        return merged


@dataclass(frozen=True, slots=True)
class _RenameMerger:
    renames: dict[str, str]

    def __call__(self, data: BaseModel, reply: Mapping[str, Any]) -> dict[str, Any]:
        merged = data.model_dump(mode="json")
        merged.update(
            {target: reply[source] for target, source in self.renames.items() if source in reply}
        )
        return merged


@dataclass(frozen=True, slots=True)
class _CallableMerger:
    merge: Callable[[Any, Mapping[str, Any]], BaseModel | Mapping[str, Any]]

    def __call__(self, data: BaseModel, reply: Mapping[str, Any]) -> dict[str, Any]:
        result = self.merge(data, reply)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return dict(result)

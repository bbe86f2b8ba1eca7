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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, NoReturn, TypeVar

from pydantic import BaseModel

from sagas_abstractions import InvalidDefinition, StepKind
from sagas_core.definition import (
    ActionKind,
    ActionSpec,
    PayloadBuilder,
    ReplyMerger,
    SagaDefinition,
    StepDefinition,
    fingerprint_of,
)
from sagas_core.retry import Backoff, ExponentialBackoff, RetryPolicy

__all__ = ["SagaBuilder", "StepBuilder", "local_destination"]

D = TypeVar("D", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$")
_DESTINATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")

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


@dataclass
class _ActionDraft:
    target: type[BaseModel] | Callable[..., Awaitable[Any]]
    destination: str | None
    mapper: Any
    timeout: timedelta | None = None
    retry: RetryPolicy | None = None


@dataclass
class _StepDraft:
    name: str
    action: _ActionDraft | None = None
    compensation: _ActionDraft | None = None
    timeout: timedelta | None = None
    retry: RetryPolicy | None = None
    merge: Any = None
    reply_model: type[BaseModel] | None = None
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
            error.problems = problems  # type: ignore[attr-defined]
            raise error
        description = {
            "name": self._name,
            "data": self._data.model_json_schema(),
            "saga_timeout": None
            if self._saga_timeout is None
            else self._saga_timeout.total_seconds(),
            "steps": [
                {
                    "name": s.name,
                    "action": s.action.describe(),
                    "compensation": None if s.compensation is None else s.compensation.describe(),
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
        value: timedelta | float | None = None,
        *,
        seconds: float = 0,
        minutes: float = 0,
        hours: float = 0,
    ) -> StepBuilder[D]:
        """Time out each attempt that gets no reply within this time."""
        duration = _duration(value, seconds, minutes, hours)
        if duration <= timedelta():
            self._problem(f"timeout must be positive, got {duration.total_seconds()}s")
        self._draft.timeout = duration
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
        action = self.action(draft.action, StepKind.EXECUTE, None, draft.timeout, retry)
        compensation = None
        if draft.compensation is not None:
            compensation = self.action(
                draft.compensation,
                StepKind.COMPENSATE,
                action.destination if action and action.kind is ActionKind.REMOTE else None,
                draft.compensation.timeout or draft.timeout,
                draft.compensation.retry or DEFAULT_COMPENSATION_RETRY,
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

    def action(
        self,
        draft: _ActionDraft,
        kind: StepKind,
        default_destination: str | None,
        timeout: timedelta | None,
        retry: RetryPolicy,
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
            )
        self.problem(  # type: ignore[unreachable] # guards callers without a type checker
            f"{what} must be a command model or an async function, got {target!r}"
        )
        return None

    def payload_builder(
        self, command: type[BaseModel], mapper: Any, what: str
    ) -> PayloadBuilder | None:
        data_fields = self.data.model_fields
        command_fields = command.model_fields
        if callable(mapper) and not isinstance(mapper, Mapping):
            return _CallableMapper(command, mapper)
        renames: dict[str, str] = {}
        if mapper is not None:
            if not isinstance(mapper, Mapping):
                self.problem(f"{what} map must be a mapping or a callable, got {mapper!r}")
                return None
            for command_field, data_field in mapper.items():
                if command_field not in command_fields:
                    self.problem(
                        f"map names {command_field!r}, which is not a field of {command.__name__}",
                        field=command_field,
                    )
                if data_field not in data_fields:
                    self.problem(
                        f"map reads {data_field!r}, which is not a field of {self.data.__name__}",
                        field=data_field,
                    )
                renames[command_field] = data_field
        sources: dict[str, str] = {}
        for name, info in command_fields.items():
            source = renames.get(name, name)
            if source in data_fields:
                sources[name] = source
            elif info.is_required():
                self.problem(
                    f"{command.__name__}.{name} is required but {self.data.__name__} has no field "
                    f"{source!r}: add it to the data model, or pass map={{'{name}': "
                    "'<data field>'}} or a callable",
                    field=name,
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

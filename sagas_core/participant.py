"""The participant side: a few lines turn an async function into a step handler.

Example:
    ```python
    inventory = Participant("inventory")

    @inventory.handles(ReserveInventory)
    async def reserve(cmd: ReserveInventory, stock: StockService) -> Reserved:
        return Reserved(reservation_id=await stock.reserve(cmd.sku, cmd.quantity))
    ```

What the participant does for every command (docs/protocol.md, "participant rules"):

* parses the payload into the command model; a bad payload is a non-retryable failed reply
  that names the field, never a crash;
* answers a redelivered or retried command (same idempotency key) with the outcome it already
  computed, without running the handler again;
* refuses an execute command that arrives after the same step's compensation (a reordered or
  late delivery), so an effect is never applied after it was undone;
* maps exceptions to failed replies: :class:`~sagas_abstractions.RetryableError` (and
  ``TimeoutError``/``ConnectionError`` by default) are retryable, anything else is permanent;
* replies with the handler's return value (a model, a mapping, or ``None``);
* opens one dependency scope per command (when the resolver is a
  :class:`~sagas_core.di.ScopedResolver`): every handler parameter is resolved in it, and what it
  created is finalized when the handler is done, even if it raised. A finalizer that fails after
  the handler succeeded fails the command (logged, and classified like a handler error, so a
  ``ConnectionError`` is retried): a finalizer may be where the work is committed, and a success
  reply for uncommitted work would be a lie. After a handler error, the handler's error is the
  outcome and a failing finalizer is only logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pydantic_core
from pydantic import BaseModel, ValidationError

from sagas_abstractions import (
    CommandMessage,
    Envelope,
    ErrorInfo,
    MessageDecodeError,
    ParticipantError,
    ReplyStatus,
    RouteKind,
    StepKind,
)
from sagas_abstractions.ports import (
    CachedOutcome,
    IdempotencyStore,
    TransactionalIdempotencyStore,
    UnitOfWork,
)
from sagas_core.clock import SystemClock
from sagas_core.codec import (
    dead_lettered,
    decode_command,
    decode_reply,
    encode_answer,
)
from sagas_core.definition import describe_validation
from sagas_core.di import (
    Dependencies,
    InjectPlan,
    MessageScope,
    MissingDependency,
    Resolver,
    ScopedResolver,
    dependency_name,
    inject_plan,
)
from sagas_core.telemetry import Telemetry, messaging_system

if TYPE_CHECKING:
    from sagas_abstractions import Clock, MessageBus, Subscription

__all__ = [
    "ALREADY_COMPENSATED_CODE",
    "INVALID_COMMAND_CODE",
    "UNKNOWN_COMMAND_CODE",
    "CachedOutcome",
    "CommandContext",
    "IdempotencyStore",
    "InMemoryIdempotencyStore",
    "Participant",
    "TransactionalIdempotencyStore",
    "UnitOfWork",
]

_log = logging.getLogger("sagas.participant")
# Enum members asked for on every command, as module constants (a class lookup is ~70 ns).
_EXECUTE = StepKind.EXECUTE
_SUCCEEDED = ReplyStatus.SUCCEEDED

C = TypeVar("C", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

INVALID_COMMAND_CODE = "invalid_command"
UNKNOWN_COMMAND_CODE = "unknown_command"
ALREADY_COMPENSATED_CODE = "cancelled"
"""Error code of a late execute command whose step was compensated already (it does not run)."""
HANDLER_ERROR_CODE = "handler_error"


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a handler may ask for (by annotating a parameter with this type).

    Attributes:
        saga_id: The saga.
        saga_type: The saga type.
        step: The step.
        attempt: The attempt number.
        kind: Execute or compensate.
        idempotency_key: Stable across retries of this step (and kind): key your effects on it.
        message_id: This delivery's message id.
        headers: Extra headers (trace context).
    """

    saga_id: str
    saga_type: str
    step: str
    attempt: int
    kind: StepKind
    idempotency_key: str
    message_id: str
    headers: Mapping[str, str]


class InMemoryIdempotencyStore:
    """A bounded, least-recently-used :class:`IdempotencyStore` in process memory.

    Args:
        capacity: Keys kept; the oldest are forgotten first.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._outcomes: OrderedDict[str, CachedOutcome] = OrderedDict()

    def __len__(self) -> int:
        """Outcomes kept now (at most ``capacity``)."""
        return len(self._outcomes)

    async def get(self, key: str) -> CachedOutcome | None:
        """The outcome recorded for ``key``, if any."""
        outcome = self._outcomes.get(key)
        if outcome is not None:
            self._outcomes.move_to_end(key)
        return outcome

    async def put(self, key: str, outcome: CachedOutcome) -> None:
        """Record the outcome for ``key``, forgetting the oldest beyond capacity."""
        self._outcomes[key] = outcome
        self._outcomes.move_to_end(key)
        while len(self._outcomes) > self.capacity:
            self._outcomes.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Handler:
    model: type[BaseModel]
    function: Callable[..., Awaitable[Any]]
    plan: InjectPlan


class _RollBack(Exception):  # noqa: N818 - control flow, never escapes the participant
    """Carries a failed outcome out of a unit of work so its transaction rolls back."""

    def __init__(self, outcome: CachedOutcome) -> None:
        super().__init__(outcome.error.code if outcome.error else "failed")
        self.outcome = outcome


def _tombstone_key(saga_id: str, step: str) -> str:
    return f"{saga_id}:{step}:compensation-started"


class Participant:
    """Hosts step handlers for one destination over any :class:`~sagas_abstractions.MessageBus`.

    Args:
        destination: The destination commands are sent to (``to=`` in the saga builder).
        dependencies: Supplies handler parameters by type: a :class:`~sagas_core.di.Resolver`,
            or a :class:`~sagas_core.di.ScopedResolver` for per-message dependencies.
        idempotency: Remembers outcomes; in memory by default (use a durable store when the
            participant must survive restarts without re-running effects).
        clock: The source of time.
        retryable_exceptions: Exceptions that mean "try again later".
        telemetry: Consumer and reply spans (the global providers when ``None``).
        warn_in_memory: Warn, when attached to a real broker, that outcomes kept in memory
            do not survive a crash. The runtime turns it off for the participant it hosts for
            local steps (the user never made that one; docs/concepts/steps.md covers them).
    """

    def __init__(
        self,
        destination: str,
        *,
        dependencies: Resolver | ScopedResolver | None = None,
        idempotency: IdempotencyStore | None = None,
        clock: Clock | None = None,
        retryable_exceptions: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError),
        telemetry: Telemetry | None = None,
        warn_in_memory: bool = True,
    ) -> None:
        self.destination = destination
        self.warn_in_memory = warn_in_memory
        self.telemetry = telemetry or Telemetry.default()
        self.dependencies = dependencies if dependencies is not None else Dependencies()
        self.idempotency = idempotency if idempotency is not None else InMemoryIdempotencyStore()
        self.clock = clock or SystemClock()
        self.retryable_exceptions = retryable_exceptions
        self.handled = 0
        self._handlers: dict[str, _Handler] = {}
        # Saga steps a delivery is handled for: their key maps to the deliveries waiting for
        # their turn, in order (``None`` while none waits: no allocation without contention).
        self._busy: dict[str, list[asyncio.Future[None]] | None] = {}
        self._bus: MessageBus | None = None
        self._system = "sagas"  # the bus's messaging.system, for spans

    # Protocol isinstance checks cost microseconds each: they are made once, when the
    # dependencies or the idempotency store are set, not for every command.

    @property
    def dependencies(self) -> Resolver | ScopedResolver:
        """Supplies handler parameters by type."""
        return self._dependencies

    @dependencies.setter
    def dependencies(self, resolver: Resolver | ScopedResolver) -> None:
        self._dependencies = resolver
        self._scoped = resolver if isinstance(resolver, ScopedResolver) else None
        # The built-in resolver's scope makes nothing unless a handler parameter asks for it.
        self._scope_optional = type(resolver) is Dependencies

    @property
    def idempotency(self) -> IdempotencyStore:
        """Remembers outcomes (transactionally, when the store supports it)."""
        return self._idempotency

    @idempotency.setter
    def idempotency(self, store: IdempotencyStore) -> None:
        self._idempotency = store
        self._transactional = store if isinstance(store, TransactionalIdempotencyStore) else None

    # ------------------------------------------------------------------ registration

    def handles(self, command: type[C], *, name: str | None = None) -> Callable[[F], F]:
        """Register the decorated async function as the handler of ``command``.

        Args:
            command: The command model; its class name is the type on the wire.
            name: The type on the wire, when it differs from the class name.
        """

        def register(function: F) -> F:
            self.register(name or command.__name__, command, function)
            return function

        return register

    def register(
        self, command_type: str, model: type[BaseModel], function: Callable[..., Awaitable[Any]]
    ) -> None:
        """Register ``function`` for commands of ``command_type`` parsed into ``model``."""
        if not asyncio.iscoroutinefunction(function):
            raise TypeError(f"handler {function.__qualname__} must be an async function")
        if command_type in self._handlers:
            raise ValueError(f"{self.destination}: {command_type} already has a handler")
        plan = inject_plan(function, what="handler")
        self._handlers[command_type] = _Handler(model, function, plan)

    def provide(self, dependency: type[Any], instance: Any) -> Participant:
        """Register a dependency instance (when using the built-in :class:`Dependencies`)."""
        if not isinstance(self.dependencies, Dependencies):
            raise TypeError("provide() needs the built-in Dependencies resolver")
        self.dependencies.provide(dependency, instance)
        return self

    @property
    def command_types(self) -> tuple[str, ...]:
        """The command types this participant handles."""
        return tuple(self._handlers)

    def check_dependencies(self) -> None:
        """Check every handler parameter can be supplied, so a missing one fails at start.

        A :class:`~sagas_core.di.ScopedResolver` is asked whether it provides each type, so
        nothing is created; a plain :class:`~sagas_core.di.Resolver` resolves each type once.

        Raises:
            MissingDependency: a handler needs a type nobody provides (the message names both).
        """
        resolver = self.dependencies
        store = self.idempotency
        supplied: frozenset[Any] = (
            store.resource_types
            if isinstance(store, TransactionalIdempotencyStore)
            else frozenset()
        )
        for handler in self._handlers.values():
            for _, annotation in handler.plan.others:
                if annotation is CommandContext or annotation in supplied:
                    continue
                if isinstance(resolver, ScopedResolver):
                    if not resolver.provides(annotation):
                        raise MissingDependency(self._missing(handler, annotation))
                    continue
                try:
                    resolved = resolver.resolve(annotation)
                except MissingDependency as exc:
                    raise MissingDependency(self._missing(handler, annotation)) from exc
                if inspect.iscoroutine(resolved):
                    resolved.close()  # an async container: resolvable is all we wanted to know

    def _missing(self, handler: _Handler, annotation: Any) -> str:
        name = dependency_name(annotation)
        return (
            f"{self.destination}: handler {handler.function.__qualname__} needs {name}, but "
            f"nothing provides {name}: register it with .provide({name}, ...)"
        )

    # ------------------------------------------------------------------ running

    async def attach(self, bus: MessageBus, *, concurrency: int = 8) -> Subscription:
        """Consume this destination's commands from ``bus`` and reply on it."""
        self.check_dependencies()
        self._bus = bus
        self._system = messaging_system(bus)
        if (
            self.warn_in_memory
            and isinstance(self.idempotency, InMemoryIdempotencyStore)
            and not getattr(bus, "in_process", False)
        ):
            # Over a real broker, commands outlive this process: a crash after an effect and
            # before the reply makes the redelivered command run again.
            _log.warning(
                "%s keeps command outcomes in memory: after a crash, redelivered commands run "
                "their handlers again; make effects idempotent on CommandContext.idempotency_key "
                "or use a durable store (sagas_sqlalchemy.SqlIdempotencyStore)",
                self.destination,
            )
        return await bus.subscribe(
            RouteKind.COMMAND, self.destination, self.handle_envelope, concurrency=concurrency
        )

    async def handle_envelope(self, envelope: Envelope) -> None:
        """Handle one delivered command and publish the reply (the bus consumer callback)."""
        bus = self._bus
        if bus is None:
            raise RuntimeError("attach() the participant to a bus first")
        reply = await self.process(envelope)
        if reply is None:
            self.telemetry.record_dead_letter(self.destination)
            await bus.publish([self._dead_letter(envelope)])
            return
        if self.telemetry.tracing_off():
            await bus.publish([reply])  # what publishing() would yield, without its spans
            return
        with self.telemetry.publishing([reply], system=self._system) as replies:
            await bus.publish(replies)

    async def process(self, envelope: Envelope) -> Envelope | None:
        """Handle one command; returns the reply envelope, or ``None`` when it can't be answered.

        Commands that cannot be answered (no reply address, or not decodable) are logged; the
        caller dead-letters them. Runs in a ``process <destination>`` consumer span (when
        tracing is on) whose context the reply carries.
        """
        if self.telemetry.tracing_off():
            return await self._process(envelope)  # consume() would make no span
        with self.telemetry.consume(envelope, system=self._system) as span:
            reply = await self._process(envelope)
            if span is not None:
                if reply is None:
                    self.telemetry.failed(span, _UNANSWERABLE)
                    return None
                self.telemetry.failed(span, _reply_error(reply))
                return reply.model_copy(
                    update={"headers": {**reply.headers, **self.telemetry.trace_context()}}
                )
            return reply

    async def _process(self, envelope: Envelope) -> Envelope | None:
        try:
            command = decode_command(envelope)
        except MessageDecodeError:
            _log.exception("%s: undecodable command %s", self.destination, envelope.message_id)
            return None
        if not command.reply_to:
            _log.error(
                "%s: command %s has no reply_to; cannot answer it",
                self.destination,
                command.message_id,
            )
            return None
        outcome = await self._outcome(command)
        self.handled += 1
        return encode_answer(
            command,
            status=outcome.status,
            data=outcome.data,
            error=outcome.error,
            at=self.clock.now(),
        )

    async def _outcome(self, command: CommandMessage) -> CachedOutcome:
        # One handler run per saga step at a time, execute and compensate alike: a duplicate
        # waits for the first delivery and gets its outcome, and a compensation waits for an
        # execution still in flight (say, one that timed out at the orchestrator), so it undoes
        # what that execution did instead of racing it.
        step_key = f"{command.saga_id}:{command.step}"
        if step_key in self._busy:
            await self._wait_turn(step_key)
        else:
            self._busy[step_key] = None
        try:
            if self._transactional is not None:
                return await self._transactional_outcome(self._transactional, command, step_key)
            return await self._decide_outcome(command, self._idempotency, self._run)
        finally:
            self._pass_turn(step_key)

    async def _wait_turn(self, step_key: str) -> None:
        """Wait until the deliveries of this step ahead of this one are done (first come first)."""
        waiters = self._busy[step_key]
        if waiters is None:
            waiters = self._busy[step_key] = []
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._pass_turn(step_key)  # cancelled just as its turn came: hand it on
            else:
                # Gone already when the holder passed the turn on after the cancellation.
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
            raise

    def _pass_turn(self, step_key: str) -> None:
        """The delivery holding the step is done: the next waiting one goes, if any."""
        waiters = self._busy[step_key]
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        del self._busy[step_key]

    async def _decide_outcome(
        self,
        command: CommandMessage,
        store: IdempotencyStore | UnitOfWork,
        run: Callable[[CommandMessage], Awaitable[CachedOutcome]],
    ) -> CachedOutcome:
        key = command.idempotency_key
        cached = await store.get(key)
        if cached is not None:
            return cached  # the truth, even if the step was compensated since
        tombstone = _tombstone_key(command.saga_id, command.step)
        if command.kind is _EXECUTE:
            if await store.get(tombstone):
                return CachedOutcome(
                    ReplyStatus.FAILED,
                    {},
                    ErrorInfo(
                        code=ALREADY_COMPENSATED_CODE,
                        message="the step was compensated before this command arrived",
                    ),
                )
        else:
            await store.put(tombstone, CachedOutcome(ReplyStatus.SUCCEEDED, {}))
        outcome = await run(command)
        if outcome.error is None or not outcome.error.retryable:
            await store.put(key, outcome)
        return outcome

    async def _transactional_outcome(
        self, store: TransactionalIdempotencyStore, command: CommandMessage, step_key: str
    ) -> CachedOutcome:
        """Handler effects, tombstone and outcome commit in one transaction, or none of them.

        A failed handler rolls its transaction back (its partial effects with it); a permanent
        failure is then recorded on its own, so a redelivery gets the same answer.
        """
        failure: CachedOutcome | None = None
        try:
            async with store.unit_of_work() as unit:
                await unit.lock(step_key)  # serializes execute/compensate across processes

                async def run(cmd: CommandMessage) -> CachedOutcome:
                    outcome = await self._run(cmd, resources=unit.resources)
                    if outcome.error is not None:
                        raise _RollBack(outcome)  # noqa: TRY301 - leaves the transaction
                    return outcome

                return await self._decide_outcome(command, unit, run)
        except _RollBack as rolled_back:
            failure = rolled_back.outcome
        if failure.error is not None and not failure.error.retryable:
            await store.put(command.idempotency_key, failure)
        return failure

    async def _run(
        self, command: CommandMessage, *, resources: Mapping[type, object] | None = None
    ) -> CachedOutcome:
        handler = self._handlers.get(command.command_type)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return _failed(
                UNKNOWN_COMMAND_CODE,
                f"{self.destination} has no handler for {command.command_type} (handles: {known})",
            )
        try:
            parsed = handler.model.model_validate(command.payload)
        except ValidationError as exc:
            return _failed(
                INVALID_COMMAND_CODE,
                f"{command.command_type} payload is invalid: {describe_validation(exc)}",
            )
        try:
            if handler.plan.others or not self._scope_optional:
                result = await self._call(handler, parsed, command, resources or {})
            else:
                # Nothing to inject, and the built-in resolver's scope would hold nothing: the
                # scope (a context manager and an exit stack a command) is skipped.
                result = await handler.function(parsed)
            return CachedOutcome(_SUCCEEDED, _result_data(result))
        except _FinalizerFailed as failed:
            return self._failure(failed.error, command, finalizing=True)
        except ParticipantError as exc:
            return _failed(exc.code, exc.reason, retryable=exc.retryable)
        except self.retryable_exceptions as exc:
            return _failed("transient", f"{type(exc).__name__}: {exc}", retryable=True)
        except Exception as exc:  # noqa: BLE001 - any handler bug becomes a failed reply
            return self._failure(exc, command)

    async def _call(
        self,
        handler: _Handler,
        parsed: BaseModel,
        command: CommandMessage,
        resources: Mapping[type, object],
    ) -> Any:
        """Run the handler inside one message scope; see the module docstring for errors."""
        manager = self._message_scope()
        scope = await manager.__aenter__()
        try:
            kwargs: dict[str, object] = {}
            for name, annotation in handler.plan.others:
                if annotation is CommandContext:
                    kwargs[name] = _context(command)
                elif annotation in resources:
                    kwargs[name] = resources[annotation]
                else:
                    kwargs[name] = await _resolved(scope, annotation)
            result = await handler.function(parsed, **kwargs)
        except BaseException as exc:
            try:
                await manager.__aexit__(type(exc), exc, exc.__traceback__)
            except Exception as close_error:  # noqa: BLE001 - logged; the handler's error wins
                if close_error is not exc:
                    _log.exception(
                        "%s: finalizing the dependencies of %s failed after the handler failed "
                        "(saga %s, step %s); the handler's error is the outcome",
                        self.destination,
                        command.command_type,
                        command.saga_id,
                        command.step,
                    )
            raise
        try:
            await manager.__aexit__(None, None, None)
        except Exception as exc:
            raise _FinalizerFailed(exc) from exc
        return result

    def _message_scope(self) -> contextlib.AbstractAsyncContextManager[MessageScope]:
        if self._scoped is not None:
            return self._scoped.message_scope()
        # Not scoped, so a plain Resolver (the setter sorted it): it serves every message.
        return contextlib.nullcontext(cast("Resolver", self._dependencies))

    def _failure(
        self, exc: Exception, command: CommandMessage, *, finalizing: bool = False
    ) -> CachedOutcome:
        if finalizing:
            _log.error(
                "%s: the handler for %s succeeded but finalizing its dependencies failed; "
                "the command fails (saga %s, step %s)",
                self.destination,
                command.command_type,
                command.saga_id,
                command.step,
                exc_info=exc,
            )
            prefix = "finalizing dependencies failed: "
            if isinstance(exc, ParticipantError):
                return _failed(exc.code, prefix + exc.reason, retryable=exc.retryable)
            if isinstance(exc, self.retryable_exceptions):
                return _failed("transient", f"{prefix}{type(exc).__name__}: {exc}", retryable=True)
            return _failed(HANDLER_ERROR_CODE, f"{prefix}{type(exc).__name__}: {exc}")
        _log.error(
            "%s: handler for %s failed (saga %s, step %s)",
            self.destination,
            command.command_type,
            command.saga_id,
            command.step,
            exc_info=exc,
        )
        return _failed(HANDLER_ERROR_CODE, f"{type(exc).__name__}: {exc}")

    def _dead_letter(self, envelope: Envelope) -> Envelope:
        return dead_lettered(envelope, f"{self.destination}: command cannot be decoded or answered")


class _FinalizerFailed(Exception):  # noqa: N818 - private marker, never escapes _run
    """A message scope's finalizer failed after the handler succeeded."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _context(command: CommandMessage) -> CommandContext:
    return CommandContext(
        saga_id=command.saga_id,
        saga_type=command.saga_type,
        step=command.step,
        attempt=command.attempt,
        kind=command.kind,
        idempotency_key=command.idempotency_key,
        message_id=command.message_id,
        headers=command.headers,
    )


async def _resolved(scope: MessageScope, annotation: Any) -> Any:
    value = scope.resolve(annotation)
    # An async container hands back an awaitable; a dependency that *is* awaitable (its type
    # says so) is injected as it is.
    if inspect.isawaitable(value) and not (
        isinstance(annotation, type) and isinstance(value, annotation)
    ):
        return await value
    return value


_UNANSWERABLE = ErrorInfo(code="unanswerable", message="not decodable, or no reply address")


def _reply_error(reply: Envelope) -> ErrorInfo | None:
    """The error a reply envelope reports (for the span), if it failed."""
    if b'"failed"' not in reply.body:
        return None
    try:
        return decode_reply(reply).error
    except MessageDecodeError:  # pragma: no cover - we encoded it ourselves
        return None


def _failed(code: str, message: str, *, retryable: bool = False) -> CachedOutcome:
    return CachedOutcome(
        ReplyStatus.FAILED, {}, ErrorInfo(code=code, message=message, retryable=retryable)
    )


def _result_data(result: object) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, Mapping):
        return dict(pydantic_core.to_jsonable_python(dict(result)))
    raise TypeError(
        f"a handler must return a pydantic model, a mapping or None, not {type(result).__name__}"
    )

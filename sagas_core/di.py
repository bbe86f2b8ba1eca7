"""Container-agnostic dependency injection for local steps and step handlers.

Handlers declare what they need by type annotation; a resolver supplies it. The core ships
:class:`Dependencies`, a small registry of singletons and per-message factories; adapters for
full DI containers (``sagas_core.integrations.dishka``) implement the same small protocols:

* :class:`Resolver`: one method, ``resolve(T)``; everything it returns lives as long as it does.
* :class:`ScopedResolver`: opens a :class:`MessageScope` per handled command, so a dependency
  can be created for one message and finalized when the message is done, and says whether it
  :meth:`~ScopedResolver.provides` a type without creating anything (checked at attach time).

A :class:`MessageScope` (and, for async containers, a plain :class:`Resolver`) may return an
awaitable from ``resolve``: the participant awaits it.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

from sagas_abstractions import SagaError

if typing.TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

__all__ = [
    "Dependencies",
    "DependencyScope",
    "Factory",
    "MessageScope",
    "MissingDependency",
    "Resolver",
    "ScopedResolver",
    "dependency_name",
    "inject_plan",
]

T = TypeVar("T")

DependencyScope = Literal["singleton", "message"]
"""How long a provided dependency lives: the whole process, or one handled command."""

Factory: TypeAlias = (
    "Callable[[], T] | Callable[[], Awaitable[T]] | Callable[[], Iterator[T]]"
    " | Callable[[], AsyncIterator[T]]"
)
"""What makes a dependency: a function, an async function, or an (async) generator function."""


class MissingDependency(SagaError):  # noqa: N818 - reads as a sentence
    """A handler asks for a type nobody provided."""


def dependency_name(dependency: object) -> str:
    """A readable name for a requested type (``StockService``, ``list[int]``)."""
    if isinstance(dependency, type):
        return dependency.__qualname__
    return repr(dependency)


@runtime_checkable
class Resolver(Protocol):
    """Supplies an instance of a requested type."""

    def resolve(self, dependency: type[T]) -> T:
        """Return an instance of ``dependency``.

        Raises:
            MissingDependency: nothing provides that type.
        """
        ...


@runtime_checkable
class MessageScope(Protocol):
    """Resolves dependencies while one command is handled (see :class:`ScopedResolver`)."""

    def resolve(self, dependency: type[T]) -> T | Awaitable[T]:
        """Return an instance of ``dependency``, or an awaitable of it.

        Raises:
            MissingDependency: nothing provides that type (the awaitable may raise it instead).
        """
        ...


@runtime_checkable
class ScopedResolver(Protocol):
    """A resolver with a scope per handled command.

    The participant opens one :meth:`message_scope` per command, resolves every handler
    parameter within it, runs the handler, then closes the scope, which finalizes what the
    scope created (even when the handler raised). Singletons outlive the scope.
    """

    def message_scope(self) -> contextlib.AbstractAsyncContextManager[MessageScope]:
        """A scope for one command: entering creates nothing, leaving finalizes what it made."""
        ...

    def provides(self, dependency: Any) -> bool:
        """Whether ``dependency`` can be resolved, checked without creating anything.

        A scoped resolver cannot be checked by resolving: that would create per-message
        instances outside a message.
        """
        ...


@dataclass(frozen=True, slots=True)
class _Factory:
    function: Callable[[], Any]
    scope: DependencyScope


class Dependencies:
    """A registry of singletons and per-message factories, resolved by exact type.

    A ``"singleton"`` factory is called once, on first use. A ``"message"`` factory is called
    once per handled command (sync or async); what it creates is finalized when the command is
    done, even if the handler raised: with ``await obj.aclose()`` or ``obj.close()`` when the
    object has one, or, when the factory is an (async) generator function, by running the
    generator past its ``yield`` (the handler's exception, if any, is raised at the ``yield``,
    as in :func:`contextlib.contextmanager`, so the factory can roll back instead of commit).

    Example:
        ```python
        async def session() -> AsyncIterator[Session]:
            async with engine.session() as s:
                yield s  # closed after each command

        deps = Dependencies().provide(StockService, StockService())
        deps.provide(Clock, factory=SystemClock)  # called once, on first use
        deps.provide(Session, factory=session, scope="message")
        ```
    """

    def __init__(self) -> None:
        self._instances: dict[Any, Any] = {}
        self._factories: dict[Any, _Factory] = {}

    def provide(
        self,
        dependency: type[T],
        instance: T | None = None,
        *,
        factory: Factory[T] | None = None,
        scope: DependencyScope = "singleton",
    ) -> Dependencies:
        """Register an instance, or a factory, for ``dependency``. Returns ``self``.

        Args:
            dependency: The type handlers annotate their parameter with.
            instance: The singleton to inject.
            factory: Makes the instance: called once on first use (``"singleton"``), or once
                per handled command (``"message"``; may be async or an (async) generator).
            scope: ``"singleton"`` (default) or ``"message"``.

        Raises:
            ValueError: not exactly one of ``instance`` and ``factory``, a message-scoped
                instance, or an unknown scope.
            TypeError: a singleton factory that is async or a generator (create it at start
                and pass the instance, or make it message-scoped).
        """
        name = dependency_name(dependency)
        if (instance is None) == (factory is None):
            raise ValueError(f"provide {name} with exactly one of instance or factory")
        if scope not in ("singleton", "message"):
            raise ValueError(f"provide {name}: scope must be 'singleton' or 'message'")
        if instance is not None:
            if scope != "singleton":
                raise ValueError(f"provide {name}: an instance is a singleton; pass a factory")
            self._factories.pop(dependency, None)
            self._instances[dependency] = instance
            return self
        assert factory is not None  # noqa: S101 - checked above
        if scope == "singleton" and _is_async_or_generator(factory):
            raise TypeError(
                f"provide {name}: a singleton factory must be a plain function; create the "
                "instance at start and pass it, or use scope='message'"
            )
        self._instances.pop(dependency, None)
        self._factories[dependency] = _Factory(factory, scope)
        return self

    def __len__(self) -> int:
        return len(self._instances.keys() | self._factories.keys())

    def __contains__(self, dependency: object) -> bool:
        return dependency in self._instances or dependency in self._factories

    def provides(self, dependency: Any) -> bool:
        """Whether ``dependency`` is registered (nothing is created)."""
        return dependency in self

    def resolve(self, dependency: type[T]) -> T:
        """Return the singleton for ``dependency``, creating it from its factory the first time.

        Raises:
            MissingDependency: nothing provides ``dependency``, or it is message-scoped (those
                are resolved inside :meth:`message_scope` only).
        """
        if dependency in self._instances:
            return typing.cast("T", self._instances[dependency])
        factory = self._factories.get(dependency)
        name = dependency_name(dependency)
        if factory is None:
            raise MissingDependency(
                f"nothing provides {name}: register it with .provide({name}, instance)"
            )
        if factory.scope == "message":
            raise MissingDependency(
                f"{name} is message-scoped: it is resolved only while a command is handled"
            )
        instance = factory.function()
        self._instances[dependency] = instance
        return typing.cast("T", instance)

    @contextlib.asynccontextmanager
    async def message_scope(self) -> AsyncIterator[MessageScope]:
        """A scope for one command: message-scoped instances are made on demand, then finalized.

        Finalizers run in reverse order of creation; the handler's exception, if any, is passed
        to generator factories. A finalizer's error propagates when the scope is left.
        """
        async with contextlib.AsyncExitStack() as stack:
            yield _DependenciesScope(self, stack)


class _DependenciesScope:
    """One command's view of :class:`Dependencies`: message-scoped instances cached here."""

    def __init__(self, dependencies: Dependencies, stack: contextlib.AsyncExitStack) -> None:
        self._dependencies = dependencies
        self._stack = stack
        self._created: dict[Any, Any] = {}

    def resolve(self, dependency: type[T]) -> T | Awaitable[T]:
        factory = self._dependencies._factories.get(dependency)  # noqa: SLF001 - companion class
        if factory is None or factory.scope != "message":
            return self._dependencies.resolve(dependency)
        if dependency in self._created:
            return typing.cast("T", self._created[dependency])
        function = factory.function
        if inspect.isasyncgenfunction(function):
            return self._enter_async(dependency, function)
        if inspect.isgeneratorfunction(function):
            manager = contextlib.contextmanager(function)()
            return typing.cast("T", self._keep(dependency, self._stack.enter_context(manager)))
        created = function()
        if inspect.isawaitable(created):
            return self._await_created(dependency, created)
        self._finalize_later(created)
        return typing.cast("T", self._keep(dependency, created))

    async def _enter_async(self, dependency: Any, function: Callable[[], Any]) -> Any:
        manager = contextlib.asynccontextmanager(function)()
        return self._keep(dependency, await self._stack.enter_async_context(manager))

    async def _await_created(self, dependency: Any, created: Awaitable[Any]) -> Any:
        instance = await created
        self._finalize_later(instance)
        return self._keep(dependency, instance)

    def _keep(self, dependency: Any, instance: Any) -> Any:
        self._created[dependency] = instance
        return instance

    def _finalize_later(self, instance: object) -> None:
        aclose = getattr(instance, "aclose", None)
        close = aclose if callable(aclose) else getattr(instance, "close", None)
        if callable(close):
            self._stack.push_async_callback(_call_and_await, close)


async def _call_and_await(function: Callable[[], object]) -> None:
    result = function()
    if inspect.isawaitable(result):
        await result


def _is_async_or_generator(function: Callable[..., Any]) -> bool:
    return (
        inspect.iscoroutinefunction(function)
        or inspect.isasyncgenfunction(function)
        or inspect.isgeneratorfunction(function)
    )


@dataclass(frozen=True, slots=True)
class InjectPlan:
    """How to call a handler: its first argument, then the other parameters by type."""

    first: str
    first_type: Any
    others: tuple[tuple[str, Any], ...]


def inject_plan(handler: Callable[..., Any], *, what: str) -> InjectPlan:
    """Read a handler's signature: its first parameter and the annotated types of the rest.

    Raises:
        TypeError: a parameter after the first has no type annotation.
    """
    signature = inspect.signature(handler)
    try:
        hints = typing.get_type_hints(handler)
    except (NameError, TypeError):
        hints = {}
    parameters = list(signature.parameters.values())
    if not parameters:
        raise TypeError(f"{what} {handler.__qualname__} must take at least one argument")
    first, rest = parameters[0], parameters[1:]
    others = []
    for parameter in rest:
        annotation = hints.get(parameter.name)
        if annotation is None:
            if parameter.default is not inspect.Parameter.empty:
                continue
            raise TypeError(
                f"{what} {handler.__qualname__}: parameter {parameter.name!r} needs a type "
                "annotation so it can be injected"
            )
        others.append((parameter.name, annotation))
    return InjectPlan(first.name, hints.get(first.name), tuple(others))

"""Container-agnostic dependency injection for local steps and step handlers.

Handlers declare what they need by type annotation; a :class:`Resolver` supplies it. The core
ships :class:`Dependencies`, a small registry of instances and factories; adapters for full DI
containers implement the same one-method protocol.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from sagas_abstractions import SagaError

if typing.TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Dependencies", "MissingDependency", "Resolver", "inject_plan"]

T = TypeVar("T")


class MissingDependency(SagaError):  # noqa: N818 - reads as a sentence
    """A handler asks for a type nobody provided."""


@runtime_checkable
class Resolver(Protocol):
    """Supplies an instance of a requested type."""

    def resolve(self, dependency: type[T]) -> T:
        """Return an instance of ``dependency``.

        Raises:
            MissingDependency: nothing provides that type.
        """
        ...


class Dependencies:
    """A registry of singletons and factories, resolved by exact type.

    Example:
        ```python
        deps = Dependencies().provide(StockService, StockService())
        deps.provide(Clock, factory=SystemClock)  # called once, on first use
        ```
    """

    def __init__(self) -> None:
        self._instances: dict[type[Any], Any] = {}
        self._factories: dict[type[Any], Callable[[], Any]] = {}

    def provide(
        self,
        dependency: type[T],
        instance: T | None = None,
        *,
        factory: Callable[[], T] | None = None,
    ) -> Dependencies:
        """Register an instance, or a factory called once on first use. Returns ``self``."""
        if (instance is None) == (factory is None):
            raise ValueError(f"provide {dependency!r} with exactly one of instance or factory")
        if instance is not None:
            self._instances[dependency] = instance
        elif factory is not None:
            self._factories[dependency] = factory
        return self

    def __len__(self) -> int:
        return len(self._instances.keys() | self._factories.keys())

    def __contains__(self, dependency: object) -> bool:
        return dependency in self._instances or dependency in self._factories

    def resolve(self, dependency: type[T]) -> T:
        """Return the instance for ``dependency``, creating it from its factory the first time."""
        if dependency in self._instances:
            return typing.cast("T", self._instances[dependency])
        factory = self._factories.get(dependency)
        if factory is None:
            name = getattr(dependency, "__qualname__", repr(dependency))
            raise MissingDependency(
                f"nothing provides {name}: register it with .provide({name}, instance)"
            )
        instance = factory()
        self._instances[dependency] = instance
        return typing.cast("T", instance)


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

"""The saga definitions an orchestrator knows, by saga type."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagas_abstractions import SagaAlreadyExists, UnknownSagaType

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from sagas_core.definition import SagaDefinition

__all__ = ["SagaRegistry"]


class SagaRegistry:
    """The saga definitions an orchestrator knows, by saga type."""

    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._definitions: dict[str, SagaDefinition] = {}
        for definition in definitions:
            self.register(definition)

    def register(self, definition: SagaDefinition) -> None:
        """Add a definition; a second one with the same name is an error."""
        existing = self._definitions.get(definition.name)
        if existing is not None and existing is not definition:
            raise SagaAlreadyExists(
                "a saga definition with this name is registered already",
                saga_type=definition.name,
            )
        self._definitions[definition.name] = definition

    def find(self, saga_type: str) -> SagaDefinition | None:
        """The definition for ``saga_type``, or ``None``."""
        return self._definitions.get(saga_type)

    def get(self, saga_type: str, *, saga_id: str | None = None) -> SagaDefinition:
        """The definition for ``saga_type``.

        Raises:
            UnknownSagaType: naming the type and the registered ones.
        """
        definition = self._definitions.get(saga_type)
        if definition is None:
            known = ", ".join(sorted(self._definitions)) or "none"
            raise UnknownSagaType(
                f"no saga definition registered under this type (registered: {known})",
                saga_id=saga_id,
                saga_type=saga_type,
            )
        return definition

    def __iter__(self) -> Iterator[SagaDefinition]:
        return iter(self._definitions.values())

    def __len__(self) -> int:
        return len(self._definitions)

"""Fast construction of the contract models from values the code made itself.

Validating a pydantic model costs 1-2 us; the engine, the codec and the in-memory store build
tens of them per saga step from values that are typed and checked already (enums from the
engine, ids from validated inputs, envelopes from validated messages). For those, filling
``__dict__`` directly costs a third of that. ``BaseModel.model_construct`` is no help: it runs
per-field Python and is slower than validating.

Only for models without validators that transform values, private attributes or extras (the
``sagas_abstractions`` models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from collections.abc import Mapping

M = TypeVar("M", bound=BaseModel)

_set = object.__setattr__


def trusted(cls: type[M], values: dict[str, Any]) -> M:
    """An instance of ``cls`` holding ``values``, without validating them.

    ``values`` must give every field, in declaration order (the order validation stores them
    in, which is the order of ``model_dump`` and of the JSON; the unit tests check the callers),
    with values of the fields' types. It is taken over, not copied.
    """
    made = cls.__new__(cls)
    _set(made, "__dict__", values)
    _set(made, "__pydantic_fields_set__", set(values))
    _set(made, "__pydantic_extra__", None)
    _set(made, "__pydantic_private__", None)
    return made


def replace(model: M, changes: Mapping[str, Any]) -> M:
    """``model.model_copy(update=changes)`` without its generic copying: a third the time.

    Like ``model_copy``, nothing is validated: pass values of the fields' types.
    """
    cls = type(model)
    copied = cls.__new__(cls)
    values = dict(model.__dict__)
    values.update(changes)
    _set(copied, "__dict__", values)
    _set(copied, "__pydantic_fields_set__", model.__pydantic_fields_set__ | changes.keys())
    _set(copied, "__pydantic_extra__", model.__pydantic_extra__)
    _set(copied, "__pydantic_private__", model.__pydantic_private__)
    return copied

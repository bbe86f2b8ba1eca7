"""Fast construction of the contract models from values the code made itself.

Validating a pydantic model costs 1-2 us; the engine, the codec and the in-memory store build
tens of them per saga step from values that are typed and checked already (enums from the
engine, ids from validated inputs, envelopes from validated messages). For those, filling
``__dict__`` directly costs a third of that. ``BaseModel.model_construct`` is no help: it runs
per-field Python and is slower than validating.

Only for models without validators that transform values, private attributes, extras or a
``__new__`` of their own (the ``sagas_abstractions`` models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from collections.abc import Mapping

M = TypeVar("M", bound=BaseModel)

# The slot descriptors of the four attributes every instance has, called directly: half the
# time of ``object.__setattr__(model, name, value)``, which looks each name up first.
_SLOTS = BaseModel.__dict__
_set_dict = _SLOTS["__dict__"].__set__
_set_fields_set = _SLOTS["__pydantic_fields_set__"].__set__
_set_extra = _SLOTS["__pydantic_extra__"].__set__
_set_private = _SLOTS["__pydantic_private__"].__set__
# ``object.__new__`` itself: ``cls.__new__`` goes through the model metaclass's __getattr__
# hook. Only for classes whose __new__ it is (checked once per class).
_new = object.__new__


def trusted(cls: type[M], values: dict[str, Any]) -> M:
    """An instance of ``cls`` (a frozen model) holding ``values``, without validating them.

    ``values`` must give every field, in declaration order (the order validation stores them
    in, which is the order of ``model_dump`` and of the JSON; the unit tests check the callers),
    with values of the fields' types. It is taken over, not copied.
    """
    # Every field is set, so every instance can share one set: frozen models never change it in
    # place (``model_copy`` copies it first). One allocation, and one object for the GC, less.
    fields = _ALL_FIELDS.get(cls)
    if fields is None:
        fields = _all_fields(cls)  # checks the class, once
    made = _new(cls)
    _set_dict(made, values)
    _set_fields_set(made, fields)
    _set_extra(made, None)
    _set_private(made, None)
    return made


def _all_fields(cls: type[BaseModel]) -> set[str]:
    shared = _ALL_FIELDS.get(cls)
    if shared is None:
        if not cls.model_config.get("frozen"):
            raise TypeError(f"{cls.__name__} is not frozen: its instances cannot share a set")
        if cls.__new__ is not _new:
            raise TypeError(f"{cls.__name__} has a __new__ of its own: it must run")
        shared = _ALL_FIELDS[cls] = set(cls.__pydantic_fields__)
    return shared


_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


def replace(model: M, changes: Mapping[str, Any]) -> M:
    """``model.model_copy(update=changes)`` of a frozen model, without the generic copying.

    A third the time. Like ``model_copy``, nothing is validated: pass values of the fields'
    types. The copy shares the set of set fields when the changes add none to it.
    """
    cls = type(model)
    all_fields = _ALL_FIELDS.get(cls)
    copied = _new(cls) if all_fields is not None else cls.__new__(cls)
    values = dict(model.__dict__)
    values.update(changes)
    _set_dict(copied, values)
    fields_set = model.__pydantic_fields_set__
    # A model made by ``trusted`` has every field set already: no need to look at the changes.
    if fields_set is not all_fields and not changes.keys() <= fields_set:
        fields_set = fields_set | changes.keys()  # a new set: the old one may be shared
    _set_fields_set(copied, fields_set)
    _set_extra(copied, model.__pydantic_extra__)
    _set_private(copied, model.__pydantic_private__)
    return copied

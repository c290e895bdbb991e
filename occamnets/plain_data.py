"""Dataclasses back from the plain data `dataclasses.asdict` and JSON made of them: reports
are written as JSON and read back as the typed results they were."""
import dataclasses
import types
import typing
from typing import Any, Dict, Type, TypeVar

T = TypeVar("T")


def from_plain(cls: Type[T], values: Dict, **given: Any) -> T:
    """An instance of the dataclass `cls` from `values` (JSON data), each field converted by
    its annotation (nested dataclasses, Optional, List, Tuple, Dict); `given` fields are taken
    as they are. Fields missing from `values` take their defaults; unknown keys are a
    ValueError naming them (data of another version or another type)."""
    kwargs = converted_fields(cls, {k: v for k, v in values.items() if k not in given})
    kwargs.update(given)
    return cls(**kwargs)


def converted_fields(cls: Type, values: Dict) -> Dict:
    """`values` (some of the dataclass `cls`'s fields, as JSON or parsed options give them:
    lists for tuples, dicts for dataclasses) each converted by its annotation; unknown keys
    are a ValueError naming them."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    return {name: _convert(hints[name], value) for name, value in values.items()}


def _convert(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):   # Optional[X], X | None: the X
        members = [a for a in arguments if a is not type(None)]
        return _convert(members[0], value) if len(members) == 1 else value
    if dataclasses.is_dataclass(annotation):
        return from_plain(annotation, value)
    if origin in (list, typing.List):
        return [_convert(arguments[0], item) for item in value] if arguments else list(value)
    if origin in (tuple, typing.Tuple):
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_convert(arguments[0], item) for item in value)
        return tuple(_convert(a, item) for a, item in zip(arguments, value)) if arguments \
            else tuple(value)
    if origin in (dict, typing.Dict):
        return {key: _convert(arguments[1], item) for key, item in value.items()} \
            if arguments else dict(value)
    return value

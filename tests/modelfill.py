"""Build a model instance with every field set, so "every field survives" tests grow with the models."""

from __future__ import annotations

import datetime as dt
import types
import typing
from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

WHEN = dt.datetime(2026, 11, 23, 3, 0, 0, tzinfo=dt.UTC)


def _value(annotation: Any, info: FieldInfo | None, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _value(next(a for a in args if a is not type(None)), info, name)
    if origin is typing.Annotated:
        return _value(args[0], info, name)
    if origin is typing.Literal:
        return args[0]
    if origin is list:
        return [_value(args[0], None, name)]
    if origin is dict:
        return {"example": _value(args[1], None, name)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return full(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return list(annotation)[-1].value
    if annotation is bool:
        return True
    if annotation is int:
        return 1
    if annotation is float:
        return 0.5
    if annotation is dt.datetime:
        return WHEN
    if annotation is str:
        if name in ("url", "report_url", "generator_url", "base_url"):
            return "https://example.com/x"
        if name == "data":
            return "aGVsbG8="
        if name in ("cpu", "memory"):
            return "100m"
        if name in ("type",):
            return "Ready"
        return f"{name}-value".replace("_", "-")
    raise TypeError(f"no example value for {annotation!r} ({name})")


def full(model: type[BaseModel]) -> BaseModel:
    values = {}
    for name, info in model.model_fields.items():
        values[name] = _value(info.annotation, info, name)
    if "url" in values and "data" in values:  # Screenshot: exactly one of the two
        del values["data"]
    if "status" in values and model.__name__ == "Condition":
        values["status"] = "True"
    return model.model_validate(values)

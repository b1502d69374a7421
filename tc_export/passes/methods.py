"""The method registry: one entry per method (its config dataclass), and config <-> dict conversion.

A method is a frozen dataclass config registered with ``@register_method(name, description)`` in its own module.
Its fields are its settings: the command-line flags (``--r``, ``--keep``, ...) and the recipe keys are derived
from them, so a new method touches its own files only. Field metadata (``setting(...)``) carries the help text
and, where the type needs it, a parser for the command-line string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .settings import setting  # noqa: F401 - the method modules import it from here


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    config_type: type


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str, description: str) -> Callable[[type], type]:
    """Class decorator: register a method config under ``name``."""

    def wrap(config_type: type) -> type:
        config_type.method = name  # type: ignore[attr-defined]
        METHODS.register(name, MethodSpec(name, description, config_type))
        return config_type

    return wrap


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def is_bool_field(field: dataclasses.Field) -> bool:
    return isinstance(field.default, bool)


def parse_field(field: dataclasses.Field, text: str) -> Any:
    """A flag's text as the field's value: the field's own parser, else by the type of its default."""
    parse = field.metadata.get("parse")
    if parse is not None:
        try:
            return parse(text)
        except (ValueError, TypeError):
            kind = getattr(parse, "__name__", "a value")
            expected = {"float": "a number", "int": "a whole number", "str": "text"}.get(kind, "a valid value")
            raise ConfigError(f"{flag_name(field)} must be {expected}, got {text!r}") from None
    kind = type(field.default) if field.default is not dataclasses.MISSING and field.default is not None else None
    annotation = str(field.type)
    try:
        if kind is int or (kind is None and annotation.startswith("int")):
            return int(text)
        if kind is float or (kind is None and annotation.startswith("float")):
            return float(text)
    except ValueError:
        expected = "a whole number" if kind is int or annotation.startswith("int") else "a number"
        raise ConfigError(f"{flag_name(field)} must be {expected}, got {text!r}") from None
    return text


def config_fields(config_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_type) if f.init]


def config_to_dict(config: object) -> dict[str, Any]:
    """``{"method": name, field: value, ...}`` with tuples as lists: what a recipe stage or ONNX metadata holds."""
    data: dict[str, Any] = {"method": type(config).method}  # type: ignore[attr-defined]
    for field in config_fields(type(config)):
        value = getattr(config, field.name)
        data[field.name] = list(value) if isinstance(value, tuple) else value
    return data


def config_from_dict(data: dict[str, Any], where: str = "config") -> object:
    """The config a ``config_to_dict`` dict (or a recipe stage) describes; errors name ``where`` and the key."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"{where}: each stage is a mapping with a 'method' key ({', '.join(METHODS.names())})")
    method = data["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; allowed methods: {', '.join(METHODS.names())}")
    config_type = METHODS.get(method).config_type
    fields = {f.name: f for f in config_fields(config_type)}
    values = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in fields:
            raise ConfigError(f"{where} ({method}): unknown key {key!r}; allowed keys: method, {', '.join(fields)}")
        values[key] = _value(fields[key], value, where)
    missing = [name for name, f in fields.items() if name not in values and _required(f)]
    if missing:
        raise ConfigError(f"{where} ({method}): missing key {missing[0]!r} (required by {method})")
    try:
        return config_type(**values)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{where} ({method}): {error}") from None


def _value(field: dataclasses.Field, value: Any, where: str) -> Any:
    if field.name == "layers" and value is not None:
        from .layers import parse_layers

        return parse_layers(value, where)
    if isinstance(value, str) and not is_bool_field(field) and field.metadata.get("parse") is not None:
        return parse_field(field, value)
    return tuple(value) if isinstance(value, list) else value


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING

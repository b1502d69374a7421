"""Recipes: multi-stage compression described in YAML, shipped here (``*.yaml``) or given as a file path.

A recipe is a list of stages, one method each, on disjoint layers::

    description: ToMe r=8 in blocks 0-5, then Top-K 0.7 at block 8
    stages:
      - {method: tome, r: 8, layers: 0-5}
      - {method: topk, keep: 0.7, layers: [8]}

Stage keys are the fields of the method's config (``ToMeConfig``, ``TopKConfig``, ...); ``layers`` takes a
list of indices, a range ``a-b`` (inclusive), or a mix (``[0-3, 7]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RECIPE_KEYS = ("description", "stages")


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # where it came from, for error messages
    description: str
    stages: tuple[object, ...]  # method configs, in order


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped in this package."""
    folder = resources.files(__name__)
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a recipe file by path."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"recipe {name_or_path!r} is neither a shipped recipe ({', '.join(sorted(shipped))}) nor a file"
            )
    return parse_recipe(path.read_text(), source=str(path), name=path.stem)


def parse_recipe(text: str, source: str, name: str = "recipe") -> Recipe:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {source}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source}: expected a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"recipe {source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(RECIPE_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"recipe {source}: 'stages' must be a non-empty list of stages")
    configs = tuple(_stage_config(stage, f"recipe {source}: stage {i + 1}") for i, stage in enumerate(stages))
    return Recipe(name, source, str(data.get("description", "")), configs)


def method_fields(config_type: type) -> list[str]:
    """The keys a stage of this method accepts (besides ``method``)."""
    return [f.name for f in dataclasses.fields(config_type)]


def _stage_config(stage: Any, where: str) -> object:
    from ..passes import METHODS

    if not isinstance(stage, dict) or "method" not in stage:
        raise ConfigError(f"{where}: each stage is a mapping with a 'method' key ({', '.join(METHODS.names())})")
    method = stage["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; allowed methods: {', '.join(METHODS.names())}")
    config_type = METHODS.get(method).config_type
    allowed = method_fields(config_type)
    values = {}
    for key, value in stage.items():
        if key == "method":
            continue
        if key not in allowed:
            raise ConfigError(f"{where} ({method}): unknown key {key!r}; allowed keys: method, {', '.join(allowed)}")
        values[key] = parse_layers(value, where) if key == "layers" else _tuples(value)
    missing = [f.name for f in dataclasses.fields(config_type) if f.name not in values and _required(f)]
    if missing:
        raise ConfigError(f"{where} ({method}): missing key {missing[0]!r} (required by {method})")
    try:
        return config_type(**values)
    except ConfigError as error:
        raise ConfigError(f"{where} ({method}): {error}") from None
    except TypeError as error:
        raise ConfigError(f"{where} ({method}): {error}") from None


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def parse_layers(value: Any, where: str) -> tuple[int, ...]:
    """``[0, 1, 2]``, ``"0-5"``, ``3``, ``[0-3, 7]`` or ``"3,6,9"`` -> a tuple of layer indices."""
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
    layers: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ConfigError(f"{where}: layers must be indices or ranges like 0-5, got {item!r}")
        if isinstance(item, int):
            layers.append(item)
            continue
        text = str(item).strip()
        low, dash, high = text.partition("-")
        try:
            if dash:
                start, stop = int(low), int(high)
                if stop < start:
                    raise ValueError
                layers.extend(range(start, stop + 1))
            else:
                layers.append(int(text))
        except ValueError:
            raise ConfigError(f"{where}: layers must be indices or ranges like 0-5, got {item!r}") from None
    return tuple(layers)


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value

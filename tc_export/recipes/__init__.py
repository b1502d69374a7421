"""Recipes: multi-stage compression described in YAML, shipped here (``*.yaml``) or given as a file path.

A recipe is a list of stages, one method each, on disjoint layers (projectors may follow each other at the
encoder output), with optional model-level settings ``features`` (the block whose tokens the model outputs),
``frames`` (video) and ``unit`` (merge units, docs/merge-units.md), and the ``model`` it is written for::

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
from ..passes.layers import parse_layers  # noqa: F401 - part of this module's interface

RECIPE_KEYS = ("description", "model", "features", "frames", "unit", "stages")


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str  # where it came from, for error messages
    description: str
    stages: tuple[object, ...]  # method configs, in order
    model: str | None = None  # the model it is written for (informational; any model may use it)
    features: int | None = None  # vision-tower mode: the block whose tokens the model outputs
    frames: int | None = None  # video: frames per clip
    unit: int | None = None  # merge units of unit x unit patches (docs/merge-units.md)


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
    for key in ("features", "frames", "unit"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"recipe {source}: {key} must be a whole number, got {value!r}")
    model = data.get("model")
    return Recipe(name, source, str(data.get("description", "")), configs, None if model is None else str(model),
                  data.get("features"), data.get("frames"), data.get("unit"))


def method_fields(config_type: type) -> list[str]:
    """The keys a stage of this method accepts (besides ``method``)."""
    return [f.name for f in dataclasses.fields(config_type)]


def _stage_config(stage: Any, where: str) -> object:
    from ..passes import config_from_dict

    return config_from_dict(stage, where)

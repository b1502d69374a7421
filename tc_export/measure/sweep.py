"""Which configurations a ``tc-export bench`` run measures: candidates, sweep axes, and their expansion.

A candidate is one set of method configs (one method, or a recipe's stages) with a label. ``--config`` gives
candidates side by side (``"tome r=8"``, ``"topk keep=0.7 layers=3,6,9"``, a recipe name or YAML file);
``--sweep r=0,4,8`` replaces that config field with each value on every candidate whose configs have it (several
axes: their product).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class SweepAxis:
    """One ``--sweep NAME=V1,V2,...``: a config field and its values (parsed as YAML scalars or lists)."""

    param: str
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.param.isidentifier():
            raise ConfigError(f"--sweep needs NAME=V1,V2,... with NAME a config field (e.g. r=0,8,16), got {self.param!r}")
        if not self.values:
            raise ConfigError(f"--sweep {self.param}= has no values: give e.g. {self.param}=0,8,16")


@dataclass(frozen=True)
class Candidate:
    """One configuration to measure: its method configs, a label for tables, the method name and parameters."""

    label: str
    method: str
    configs: tuple[object, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def uncompressed(self) -> bool:
        return not self.configs


def parse_sweep(text: str) -> SweepAxis:
    """``r=0,4,8`` -> SweepAxis("r", (0, 4, 8)); ``r=[8,8,4],16`` keeps the bracketed list whole."""
    import yaml

    name, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"--sweep needs NAME=V1,V2,... (e.g. r=0,8,16), got {text!r}")
    values = []
    for part in _split_top_level(rest):
        try:
            value = yaml.safe_load(part)
        except yaml.YAMLError:
            raise ConfigError(f"--sweep {name}: cannot read the value {part!r}") from None
        values.append(tuple(value) if isinstance(value, list) else value)
    return SweepAxis(name.strip(), tuple(v for v in values if v is not None))


def parse_config_spec(text: str) -> Candidate:
    """``"tome r=8 layers=0-5"`` -> a one-stage candidate; a shipped recipe name or YAML path -> its stages."""
    import yaml

    from ..passes import METHODS
    from ..recipes import load_recipe, parse_recipe

    words = text.split()
    if not words:
        raise ConfigError("--config is empty: give e.g. \"tome r=8\" or a recipe name")
    head, rest = words[0], words[1:]
    if head == "none" and not rest:
        return Candidate("uncompressed", "none", ())
    if head not in METHODS:
        if rest:
            raise ConfigError(f"--config {text!r}: unknown method {head!r}; known: {', '.join(METHODS.names())}")
        recipe = load_recipe(head)  # unknown name -> one-line error naming the shipped recipes
        return Candidate(f"recipe {recipe.name}", f"recipe {recipe.name}", recipe.stages, {"recipe": recipe.name})
    stage: dict[str, Any] = {"method": head}
    for word in rest:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"--config {text!r}: {word!r} is not KEY=VALUE (e.g. r=8)")
        stage[key] = value if key == "layers" else yaml.safe_load(value)
    recipe = parse_recipe(yaml.safe_dump({"stages": [stage]}), source=f"--config {text!r}")
    return candidate_from_configs(recipe.stages, head)


def candidate_from_configs(configs: Sequence[object], method: str | None = None) -> Candidate:
    """A candidate for configs built elsewhere (``method_configs(flags)``), labelled by their non-default fields."""
    configs = tuple(configs)
    if not configs:
        return Candidate("uncompressed", "none", ())
    if method is None:
        method = "+".join(getattr(c, "method", type(c).__name__) for c in configs)
    params = _params(configs)
    label = " ".join([method, *(f"{k}={_show(v)}" for k, v in params.items())]) if len(configs) == 1 else method
    return Candidate(label, method, configs, params)


def expand(candidates: Sequence[Candidate], axes: Sequence[SweepAxis]) -> list[Candidate]:
    """Every candidate crossed with every combination of sweep values, via ``dataclasses.replace``.

    A candidate none of whose configs has an axis's field is kept once, unswept; an axis no candidate has is an
    error. Swept values are checked by each config's own validation.
    """
    for axis in axes:
        if not any(_has_field(c, axis.param) for cand in candidates for c in cand.configs):
            fields = sorted({f.name for cand in candidates for c in cand.configs for f in dataclasses.fields(c)})
            raise ConfigError(
                f"--sweep {axis.param}: no configured method has a field {axis.param!r}"
                + (f" (fields: {', '.join(fields)})" if fields else " (no method given: add --method or --config)")
            )
    out: list[Candidate] = []
    for candidate in candidates:
        relevant = [a for a in axes if any(_has_field(c, a.param) for c in candidate.configs)]
        if not relevant:
            out.append(candidate)
            continue
        for values in itertools.product(*(a.values for a in relevant)):
            configs = candidate.configs
            for axis, value in zip(relevant, values):
                configs = tuple(_replace(c, axis.param, value) for c in configs)
            params = {**candidate.params, **{a.param: v for a, v in zip(relevant, values)}}
            if len(configs) == 1:
                label = " ".join([candidate.method, *(f"{k}={_show(v)}" for k, v in _params(configs).items())])
            else:
                label = candidate.label + " " + " ".join(f"{a.param}={_show(v)}" for a, v in zip(relevant, values))
            out.append(Candidate(label, candidate.method, configs, params))
    labels = [c.label for c in out]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"configuration {duplicates[0]!r} is given twice: drop one --config or sweep value")
    return out


def is_identity(candidate: Candidate) -> bool:
    """True when a candidate compresses nothing by its parameters alone (``r=0``, ``keep=1``, no configs)."""
    for config in candidate.configs:
        r = getattr(config, "r", None)
        if r is not None and (r == 0 or (isinstance(r, tuple) and not any(r))):
            continue
        if getattr(config, "method", "") == "topk" and getattr(config, "keep", None) == 1 and not config.fuse:
            continue
        return False
    return True


def _replace(config: object, param: str, value: Any) -> object:
    if not _has_field(config, param):
        return config
    if param == "layers" and value is not None:
        from ..recipes import parse_layers

        value = parse_layers(value if not isinstance(value, tuple) else list(value), f"--sweep {param}")
    try:
        return dataclasses.replace(config, **{param: value})
    except ConfigError as error:
        raise ConfigError(f"--sweep {param}={_show(value)}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"--sweep {param}={_show(value)}: {error}") from None


def _has_field(config: object, name: str) -> bool:
    return dataclasses.is_dataclass(config) and any(f.name == name for f in dataclasses.fields(config))


def _params(configs: Sequence[object]) -> dict[str, Any]:
    """Fields that differ from their defaults (the ones worth a label), of all stages."""
    params: dict[str, Any] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default or f.default is dataclasses.MISSING or f.name in ("r", "keep", "tokens"):
                params[f.name] = value
    return params


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts

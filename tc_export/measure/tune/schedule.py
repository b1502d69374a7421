"""A candidate schedule: method stages, their token counts per layer (computed, not traced), and its recipe.

The token counts follow each op's own rule (``effective_r`` for ToMe and adjacent merging, ``keep_count`` for
Top-K, the budget for PruMerge), so the latency model can price thousands of schedules without tracing one;
``tests/test_tune.py`` checks them against ``compress().token_counts()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError
from ...ops.adjacent import effective_pairs
from ...ops.tome import effective_r
from ...ops.topk import keep_count


@dataclass(frozen=True)
class Shape:
    """What the latency model needs of a model: tokens entering the first layer, protected prefix, layers."""

    tokens: int
    protected: int
    layers: int


@dataclass(frozen=True)
class Schedule:
    """One candidate: a label for tables, the family it came from, and its method configs in order."""

    label: str
    family: str
    stages: tuple[object, ...]

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(getattr(stage, "method", "?") for stage in self.stages)


def _active(stage: object, layer: int, layers: int) -> bool:
    chosen = getattr(stage, "layers", None)
    if chosen is None:
        chosen = stage.default_layers(layers)  # type: ignore[attr-defined]
    return layer in chosen


def _at_input(stage: object) -> bool:
    """The stage acts where the stream enters a layer (PruMerge; ToMe with ``placement: input``)."""
    return stage.insertion_point() == "block_input"  # type: ignore[attr-defined]


def op_key(stage: object) -> str:
    """The latency model's name for a stage's op cost: the method, ``@input`` for ToMe at a block input (its tokens
    are its metric: no key average, another cost per token)."""
    return getattr(stage, "method", "?") + ("@input" if getattr(stage, "placement", "attention") == "input" else "")


def _tokens_after(stage: object, n: int, layer: int, shape: Shape) -> int:
    """Tokens leaving ``stage``'s op at ``layer`` when ``n`` enter it, by the op's own rule."""
    method, p = getattr(stage, "method", ""), shape.protected
    if method == "prumerge":
        return p + stage.tokens + int(stage.extra)  # type: ignore[attr-defined]
    if method == "tome":
        return n - effective_r(n, stage.schedule(shape.layers)[layer], p)  # type: ignore[attr-defined]
    if method == "adjacent":
        return n - effective_pairs(n, stage.r, p)  # type: ignore[attr-defined]
    if method == "topk":
        keep = max(1, keep_count(n, stage.keep, p))  # type: ignore[attr-defined]
        if keep < n - p or stage.fuse:  # type: ignore[attr-defined]
            return p + keep + int(stage.fuse and keep < n - p)  # type: ignore[attr-defined]
        return n
    raise ConfigError(f"tune: no token-count rule for method {method!r}")


def layer_counts(stages: Sequence[object], shape: Shape) -> list[tuple[int, int]]:
    """(tokens entering the attention, tokens leaving the layer) for every layer of ``shape``."""
    n = shape.tokens
    out = []
    for layer in range(shape.layers):
        for stage in stages:
            if _at_input(stage) and _active(stage, layer, shape.layers):
                n = _tokens_after(stage, n, layer, shape)
        tokens_in = n
        for stage in stages:
            if not _at_input(stage) and _active(stage, layer, shape.layers):
                n = _tokens_after(stage, n, layer, shape)
        out.append((tokens_in, n))
    return out


def token_list(stages: Sequence[object], shape: Shape) -> list[int]:
    """As ``CompressedModel.token_counts()``: tokens each attention sees, then the tokens leaving the last."""
    counts = layer_counts(stages, shape)
    return [c[0] for c in counts] + [counts[-1][1]]


def op_tokens(stages: Sequence[object], shape: Shape) -> dict[str, int]:
    """Per op (``op_key``): the tokens entering its ops, summed over the layers where it changes the count."""
    totals: dict[str, int] = {}
    n = shape.tokens
    for layer in range(shape.layers):
        for at_input in (True, False):
            for stage in stages:
                if _at_input(stage) != at_input or not _active(stage, layer, shape.layers):
                    continue
                after = _tokens_after(stage, n, layer, shape)
                if after != n or getattr(stage, "method", "") == "prumerge":
                    totals[op_key(stage)] = totals.get(op_key(stage), 0) + n
                n = after
    return totals


def stage_dict(stage: object) -> dict[str, Any]:
    """A recipe stage: the method and every field that differs from its default (lists for tuples)."""
    out: dict[str, Any] = {"method": getattr(stage, "method")}
    for field in dataclasses.fields(stage):  # type: ignore[arg-type]
        value = getattr(stage, field.name)
        if field.default is not dataclasses.MISSING and value == field.default and field.name != "layers":
            continue
        if field.name == "layers" and value is None:
            continue
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def recipe_yaml(schedule: Schedule, model: str, description: str) -> str:
    """The schedule as a recipe file ``tc-export MODEL --recipe FILE`` reads."""
    import yaml

    document = {"description": description, "model": model, "stages": [stage_dict(s) for s in schedule.stages]}
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120)

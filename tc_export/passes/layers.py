"""Layer lists: parsing ``0-5,8`` forms, the checks every method shares, and a recipe's layer plan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .settings import setting


def parse_layers(value: Any, where: str) -> tuple[int, ...]:
    """``[0, 1, 2]``, ``"0-5"``, ``3``, ``[0-3, 7]`` or ``"3,6,9"`` -> a tuple of layer indices."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",") if isinstance(value, str) else [value]
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
            if dash and low:
                start, stop = int(low), int(high)
                if stop < start:
                    raise ValueError
                layers.extend(range(start, stop + 1))
            else:
                layers.append(int(text))
        except ValueError:
            raise ConfigError(f"{where}: layers must be indices or ranges like 0-5, got {item!r}") from None
    return tuple(layers)


def parse_layers_flag(text: str) -> tuple[int, ...]:
    return parse_layers(text, "--layers")


def parse_protected(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--protected must be a whole number of leading tokens, got {text!r}") from None


PREFIX_MODES = ("drop", "keep")
PREFIX_MODE_HELP = ("prumerge / topk at the tower output, projectors: drop or keep the class/register tokens in the "
                    "output, leading and trailing (LLaVA's 'patch' vs 'cls_patch'; default: as the published model "
                    "does)")


def parse_prefix_mode(text: str) -> str | None:
    """``drop`` / ``keep``, or ``auto`` (None: the method's published default)."""
    return None if text.lower() in ("none", "auto") else text


def check_prefix_mode(method: str, value: str | None) -> None:
    if value is not None and value not in PREFIX_MODES:
        raise ConfigError(f"{method}: prefix_mode must be drop, keep or auto, got {value!r}")


def parse_protected_suffix(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--protected-suffix must be a whole number of trailing tokens, got {text!r}") from None


def protected_suffix_setting() -> Any:
    """The ``protected_suffix`` field every method has (``--protected-suffix N``)."""
    return setting(None, "trailing tokens that never move, e.g. detection tokens (default: found in the graph)",
                   parse_protected_suffix)


def validate_placement(method: str, layers: tuple[int, ...] | None, protected: int | None,
                       protected_suffix: int | None = None) -> None:
    """Config-time checks every method shares: the layer list (whole numbers >= 0, no repeats), ``protected``,
    ``protected_suffix``."""
    for name, value in (("protected", protected), ("protected_suffix", protected_suffix)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{method}: {name} must be a whole number >= 0, got {value!r}")
    if layers is None:
        return
    if not layers:
        raise ConfigError(f"{method}: layers is empty; give at least one layer index")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(f"{method}: layers must be whole numbers >= 0, got {layer!r}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{method}: layers {list(layers)} repeat an index")


def layer_plan(configs: Sequence[Any], num_layers: int) -> dict[tuple[str, int], Any]:
    """(point, layer) -> the method acting there; out-of-range or doubly claimed places are errors."""
    plan: dict[tuple[str, int], Any] = {}
    for config in configs:
        point = config.insertion_point()
        if point == "encoder":  # several stages may act there, one after the other (e.g. pool, then mlp)
            plan[(point, sum(1 for key in plan if key[0] == "encoder"))] = config
            continue
        layers = list(config.layers) if config.layers is not None else config.default_layers(num_layers)
        for layer in layers:
            if layer >= num_layers:
                raise ConfigError(
                    f"{config.method}: layer {layer} is out of range: the model has {num_layers} attention layers "
                    f"(0-{num_layers - 1})"
                )
            if (point, layer) in plan:
                raise ConfigError(
                    f"layer {layer} is claimed by both {plan[(point, layer)].method} and {config.method}: one method "
                    "per layer"
                )
            plan[(point, layer)] = config
    return plan

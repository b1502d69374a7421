"""Method flags shared by ``export`` and ``bench``, and turning them into method configs (or a recipe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

# Which flags each method takes (flag -> methods); anything else is a mistake worth naming.
FLAG_METHODS = {
    "--r": ("tome", "adjacent"),
    "--inflect": ("tome",),
    "--no-prop-attn": ("tome", "adjacent", "prumerge"),
    "--keep": ("topk",),
    "--layers": ("tome", "topk", "prumerge", "adjacent"),
    "--fuse": ("topk",),
    "--keep-order": ("topk",),
    "--tokens": ("prumerge",),
    "--extra": ("prumerge",),
}


@dataclass(frozen=True)
class MethodFlags:
    """The single-method flags as given on the command line (None / False: not given)."""

    method: str | None = None
    recipe: str | None = None
    r: str | None = None
    inflect: float | None = None
    no_prop_attn: bool = False
    keep: float | None = None
    layers: str | None = None
    fuse: bool = False
    keep_order: bool = False
    tokens: int | None = None
    extra: bool = False

    def given(self) -> list[str]:
        values = {
            "--r": self.r is not None, "--inflect": self.inflect is not None, "--no-prop-attn": self.no_prop_attn,
            "--keep": self.keep is not None, "--layers": self.layers is not None, "--fuse": self.fuse,
            "--keep-order": self.keep_order, "--tokens": self.tokens is not None, "--extra": self.extra,
        }
        return [flag for flag, on in values.items() if on]


def method_options(function: F) -> F:
    """Add the method flags to a click command; the command receives them as one ``flags: MethodFlags``."""
    options = [
        click.option("--method", "-m", default=None, help="Compression method (see `tc-export list`)."),
        click.option("--recipe", default=None, help="Multi-stage recipe: a shipped name or a YAML file."),
        click.option("--r", "r", default=None, help="tome/adjacent: tokens merged per layer (tome: or a list 8,8,4)."),
        click.option("--inflect", type=float, default=None, help="tome: linear r schedule with this inflection."),
        click.option("--no-prop-attn", is_flag=True, help="Merging methods: no proportional attention."),
        click.option("--keep", type=float, default=None, help="topk: fraction of tokens kept, e.g. 0.7."),
        click.option("--layers", default=None, help="Layers to act on, e.g. 3,6,9 or 0-5 (zero-indexed)."),
        click.option("--fuse", is_flag=True, help="topk: add EViT's fused token of the pruned tokens."),
        click.option("--keep-order", is_flag=True, help="topk: survivors keep their original order."),
        click.option("--tokens", type=int, default=None, help="prumerge: token budget K kept per layer."),
        click.option("--extra", is_flag=True, help="prumerge: one extra token for the pruned mass."),
    ]

    def wrapped(**kwargs: Any) -> Any:
        names = [f.name for f in MethodFlags.__dataclass_fields__.values()]
        flags = MethodFlags(**{name: kwargs.pop(name) for name in names})
        return function(flags=flags, **kwargs)

    wrapped.__name__ = function.__name__
    wrapped.__doc__ = function.__doc__
    wrapped.__click_params__ = list(getattr(function, "__click_params__", []))  # options declared below this one
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped  # type: ignore[return-value]


def parse_r(text: str) -> int | tuple[int, ...]:
    """``16`` -> 16; ``8,8,4`` -> (8, 8, 4) (a per-layer list). Rejects non-integers and negatives."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(
                f"--r must be a whole number of tokens per layer (or a comma-separated per-layer list), got {text!r}"
            ) from None
        if value < 0:
            raise ConfigError(f"--r must be >= 0 (tokens merged per layer), got {value}")
        values.append(value)
    return values[0] if len(values) == 1 and "," not in text else tuple(values)


def method_configs(flags: MethodFlags, default_method: str | None = None) -> tuple[tuple[object, ...], str]:
    """The method configs the flags ask for, and a label for reports. No method and no recipe: uncompressed."""
    if flags.recipe is not None:
        if flags.method is not None or flags.given():
            extra = ", ".join((["--method"] if flags.method else []) + flags.given())
            raise ConfigError(f"--recipe describes every stage itself; drop {extra} or drop --recipe")
        from ..recipes import load_recipe

        recipe = load_recipe(flags.recipe)
        return recipe.stages, f"recipe {recipe.name}"
    method = flags.method or default_method
    if method is None:
        if flags.given():
            raise ConfigError(f"{flags.given()[0]} needs a method: add --method (see `tc-export list`)")
        return (), "uncompressed"
    from ..passes import METHODS

    METHODS.get(method)  # unknown method -> one-line error with the known ones
    for flag in flags.given():
        if method not in FLAG_METHODS[flag]:
            raise ConfigError(f"{flag} does not apply to --method {method} (it is for {', '.join(FLAG_METHODS[flag])})")
    config = _single_config(method, flags)
    return (config,), f"{method} {_describe(method, flags)}".strip()


def _single_config(method: str, flags: MethodFlags) -> object:
    from ..passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig
    from ..recipes import parse_layers

    layers = parse_layers(flags.layers, "--layers") if flags.layers is not None else None
    prop_attn = not flags.no_prop_attn
    if method == "tome":
        r = parse_r(flags.r) if flags.r is not None else 16
        return ToMeConfig(r=r, inflection=flags.inflect, prop_attn=prop_attn, layers=layers)
    if method == "adjacent":
        r = parse_r(flags.r) if flags.r is not None else AdjacentConfig.r
        if isinstance(r, tuple):
            raise ConfigError("--r for adjacent is one number of pairs per layer; choose layers with --layers")
        return AdjacentConfig(r=r, layers=layers, prop_attn=prop_attn)
    if method == "topk":
        keep = flags.keep if flags.keep is not None else TopKConfig.keep
        return TopKConfig(keep=keep, layers=layers, fuse=flags.fuse, keep_order=flags.keep_order)
    if method == "prumerge":
        if flags.tokens is None:
            raise ConfigError("--method prumerge needs --tokens K (the number of tokens to keep)")
        return PruMergeConfig(tokens=flags.tokens, extra=flags.extra, layers=layers, prop_attn=prop_attn)
    raise ConfigError(f"method {method!r} has no command-line flags")


def _describe(method: str, flags: MethodFlags) -> str:
    from ..passes import AdjacentConfig, TopKConfig

    parts = []
    if method in ("tome", "adjacent"):
        parts.append(f"r={flags.r or (16 if method == 'tome' else AdjacentConfig.r)}")
    if method == "topk":
        parts.append(f"keep={flags.keep or TopKConfig.keep}")
    if method == "prumerge":
        parts.append(f"tokens={flags.tokens}")
    if flags.layers:
        parts.append(f"layers={flags.layers}")
    return " ".join(parts)

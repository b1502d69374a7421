"""Method flags shared by ``export`` and ``bench``, derived from the registered method configs' fields.

Each config field is a flag (``r`` -> ``--r``, ``keep_order`` -> ``--keep-order``, booleans as ``--x/--no-x``);
fields of the same name in several methods share one flag, parsed by the chosen method's own field. A new method
therefore brings its flags with it; nothing here names a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class FlagSpec:
    """One command-line flag and the config fields (of which methods) behind it."""

    name: str  # the field name, e.g. "keep_order"
    flag: str  # "--keep-order"
    is_bool: bool
    help: str
    methods: tuple[str, ...]


def flag_specs() -> dict[str, FlagSpec]:
    """Every method setting as a flag, in registration order of first appearance."""
    from ..passes import METHODS
    from ..passes.methods import config_fields, flag_name, is_bool_field

    specs: dict[str, FlagSpec] = {}
    for name, spec in METHODS.items():
        for field in config_fields(spec.config_type):
            known = specs.get(field.name)
            if known is None:
                specs[field.name] = FlagSpec(field.name, flag_name(field), is_bool_field(field),
                                             field.metadata.get("help", ""), (name,))
            else:
                extra = field.metadata.get("help", "")
                helps = known.help if not extra or extra in known.help else f"{known.help}; {extra}".strip("; ")
                specs[field.name] = dataclasses.replace(known, methods=(*known.methods, name), help=helps)
    return specs


@dataclass(frozen=True)
class MethodFlags:
    """The single-method flags as given on the command line (only those given)."""

    method: str | None = None
    recipe: str | None = None
    values: tuple[tuple[str, Any], ...] = ()  # field name -> the flag's text (or bool), in the order given

    def given(self) -> list[str]:
        specs = flag_specs()
        return [specs[name].flag if value is not False or not specs[name].is_bool else f"--no-{specs[name].flag[2:]}"
                for name, value in self.values]


def method_options(function: F) -> F:
    """Add ``--method``, ``--recipe`` and every method's flags to a click command; it receives ``flags``."""
    specs = flag_specs()
    options = [
        click.option("--method", "-m", default=None, help="Compression method (see `tc-export list`)."),
        click.option("--recipe", default=None, help="Multi-stage recipe: a shipped name or a YAML file."),
    ]
    for spec in specs.values():
        methods = ", ".join(spec.methods)
        help_text = f"{spec.help} [{methods}]" if spec.help else f"[{methods}]"
        if spec.is_bool:
            options.append(click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=None, help=help_text))
        else:
            options.append(click.option(spec.flag, spec.name, default=None, type=str, help=help_text))

    def wrapped(**kwargs: Any) -> Any:
        values = tuple((name, kwargs.pop(name)) for name in specs if kwargs.get(name) is not None)
        for name in specs:
            kwargs.pop(name, None)
        flags = MethodFlags(kwargs.pop("method"), kwargs.pop("recipe"), values)
        return function(flags=flags, **kwargs)

    wrapped.__name__ = function.__name__
    wrapped.__doc__ = function.__doc__
    wrapped.__click_params__ = list(getattr(function, "__click_params__", []))  # options declared below this one
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped  # type: ignore[return-value]


def weights_seed_option(function: F) -> F:
    """``--weights-seed N``: ``ModelOptions.weights_seed``, the seed of every random weight (one flag, three commands)."""
    from ..models.seeding import DEFAULT_WEIGHTS_SEED

    return click.option("--weights-seed", type=int, default=DEFAULT_WEIGHTS_SEED, show_default=True,
                        help="Seed of the random weights of a model without --weights/--pretrained and of projectors: "
                             "the same seed builds the same model.")(function)


def method_configs(flags: MethodFlags, default_method: str | None = None) -> tuple[tuple[object, ...], str]:
    """The method configs the flags ask for, and a label for reports. No method and no recipe: uncompressed."""
    if flags.recipe is not None:
        if flags.method is not None or flags.values:
            extra = ", ".join((["--method"] if flags.method else []) + flags.given())
            raise ConfigError(f"--recipe describes every stage itself; drop {extra} or drop --recipe")
        from ..recipes import load_recipe

        recipe = load_recipe(flags.recipe)
        return recipe.stages, f"recipe {recipe.name}"
    method = flags.method or default_method
    if method is None:
        if flags.values:
            raise ConfigError(f"{flags.given()[0]} needs a method: add --method (see `tc-export list`)")
        return (), "uncompressed"
    config = single_config(method, dict(flags.values))
    return (config,), describe_config(config, [name for name, _ in flags.values])


def single_config(method: str, values: dict[str, Any]) -> object:
    """The config of ``method`` from flag values (field name -> text or bool); unknown or missing flags named."""
    from ..passes import METHODS
    from ..passes.methods import config_fields, flag_name, parse_field

    config_type = METHODS.get(method).config_type  # unknown method -> one-line error with the known ones
    fields = {field.name: field for field in config_fields(config_type)}
    specs = flag_specs()
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(
                f"{specs[name].flag} does not apply to --method {method} (it is for {', '.join(specs[name].methods)})"
            )
        kwargs[name] = value if isinstance(value, bool) else parse_field(fields[name], value)
    for name, field in fields.items():
        if name not in kwargs and field.default is dataclasses.MISSING:
            metavar = f" {field.metadata['metavar']}" if field.metadata.get("metavar") else ""
            raise ConfigError(f"--method {method} needs {flag_name(field)}{metavar} ({field.metadata.get('help', name)})")
    return config_type(**kwargs)


def describe_config(config: object, given: list[str] | None = None) -> str:
    """``tome r=16``: the method, its first setting, and any other setting given."""
    from ..passes.methods import config_fields

    fields = config_fields(type(config))
    shown = [fields[0].name] + [name for name in (given or []) if name != fields[0].name]
    parts = []
    for name in shown:
        value = getattr(config, name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append(name if value is True else f"no-{name}" if value is False else f"{name}={value}")
    return " ".join([type(config).method, *parts])  # type: ignore[attr-defined]

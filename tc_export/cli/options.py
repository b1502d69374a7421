"""Turning CLI flag values into method configs."""

from __future__ import annotations

from ..errors import ConfigError
from ..passes import METHODS, ToMeConfig


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


def method_config(method: str | None, r: str | None, inflect: float | None, prop_attn: bool) -> tuple[object, ...]:
    """One method's config from the single-method flags (no method: an uncompressed export)."""
    if method is None:
        if r is not None or inflect is not None:
            raise ConfigError("--r/--inflect need a method: add --method tome")
        return ()
    METHODS.get(method)  # unknown method -> one-line error with the known ones
    if method == "tome":
        return (ToMeConfig(r=parse_r(r) if r is not None else 16, inflection=inflect, prop_attn=prop_attn),)
    raise ConfigError(f"method {method!r} has no command-line flags yet")

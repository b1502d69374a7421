"""The common shape of a projector: static facts in, (B, prefix + H*W, C) tokens -> (B, M, D) tokens out.

A projector is built from what the site model knows at export time: the token width ``channels``, the patch
``grid`` ((H, W) for images, (T,) for a frame sequence) and the ``prefix`` (class/register tokens in front of the
grid tokens, row-major). Everything shape-related is decided in ``__init__``, so the exported graph is static.
Settings the user chooses are keyword-only arguments; bad values raise ``ConfigError`` with a one-line message.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ...errors import ConfigError

Grid = tuple[int, ...]


def check_grid(grid: tuple[int, ...], name: str) -> Grid:
    """Validate a (H, W) or (T,) grid of positive ints and return it as a tuple."""
    grid = tuple(grid)
    if len(grid) not in (1, 2) or any(not isinstance(g, int) or g < 1 for g in grid):
        raise ConfigError(f"{name}: grid must be (H, W) or (T,) of positive ints, got {grid}")
    return grid


def check_positive(value: int, setting: str, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: {setting} must be a positive integer, got {value!r}")
    return value


def check_choice(value: str, setting: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: {setting} must be one of {', '.join(choices)}, got {value!r}")
    return value


class Projector(nn.Module):
    """Base class: holds the static facts and the input check; subclasses set the output facts.

    Subclasses call ``super().__init__(channels, grid, prefix)``, build their layers, call
    ``reset_parameters()``, and implement ``forward``, ``tokens_out``, ``channels_out``, ``output_grid``.
    ``prefix_out()`` is the number of non-grid tokens in front of the output grid (0 unless kept or added).
    """

    name: str = "projector"

    def __init__(self, channels: int, grid: tuple[int, int] | tuple[int], prefix: int) -> None:
        super().__init__()
        self.channels = check_positive(channels, "channels", self.name)
        self.grid = check_grid(grid, self.name)
        if not isinstance(prefix, int) or prefix < 0:
            raise ConfigError(f"{self.name}: prefix must be an integer >= 0, got {prefix!r}")
        self.prefix = prefix

    @property
    def grid_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tokens_in(self) -> int:
        return self.prefix + self.grid_tokens

    def tokens_out(self) -> int:
        raise NotImplementedError

    def channels_out(self) -> int:
        raise NotImplementedError

    def output_grid(self) -> Grid | None:
        raise NotImplementedError

    def prefix_out(self) -> int:
        return 0

    def reset_parameters(self) -> None:
        """Initialise every parameter as the reference code does (see the subclass docstring)."""

    def require_2d(self) -> tuple[int, int]:
        if len(self.grid) != 2:
            raise ConfigError(f"{self.name} needs a 2-D patch grid (H, W), got the 1-D grid {self.grid}")
        return self.grid[0], self.grid[1]

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.tokens_in or x.shape[2] != self.channels:
            raise ValueError(
                f"{self.name}: expected (B, {self.tokens_in}, {self.channels}) tokens, got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, grid={self.grid}, prefix={self.prefix}"


def out_channels_or(out_channels: int | None, channels: int, name: str, setting: str = "out_channels") -> int:
    """A width setting: ``channels`` when None, else a positive int."""
    return channels if out_channels is None else check_positive(out_channels, setting, name)


def tokens_nchw_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    return x.flatten(2).transpose(1, 2)


def trunc_normal_(tensor: Tensor, std: float = 0.02) -> Tensor:
    """timm's / MAE's trunc_normal_(std) with the default cut at +-2 (absolute), as the references use."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


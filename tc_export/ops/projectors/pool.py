"""Static pooling on the patch grid (LLaVA-NeXT ``get_2dPool``, LLaVA-OneVision, audio-LM frame pooling).

Tokens (B, prefix + H*W, C) -> NCHW grid -> pool -> tokens. Modes, with stride ``s``:
- ``avg``: ``avg_pool2d(kernel=s, stride=s)``, floor rule: an H x W grid becomes floor(H/s) x floor(W/s)
  (27x27 -> 13x13 at s=2); the last row/column of an odd grid is dropped, as in LLaVA-NeXT.
- ``max``: ``max_pool2d(kernel=s, stride=s)``, the same floor rule.
- ``bilinear``: ``interpolate(size=(ceil(H/s), ceil(W/s)), mode="bilinear", align_corners=False)``, no antialias:
  the ceil rule (27x27 -> 14x14), the transformers LLaVA-OneVision default. Exports as Resize(linear).
Non-square grids pool each axis by its own rule. On a 1-D grid (T,) (an audio encoder's frames) the same modes
run over frames: ``avg_pool1d`` / ``max_pool1d`` (floor(T/s)) or linear interpolation to ceil(T/s).
Prefix tokens are dropped (``prefix_mode="drop"``, the default) or kept unchanged in front (``"keep"``).
No parameters.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .base import Grid, Projector, check_choice, check_positive

Mode = Literal["avg", "max", "bilinear"]
PrefixMode = Literal["drop", "keep"]
MODES: tuple[str, ...] = get_args(Mode)
PREFIX_MODES: tuple[str, ...] = get_args(PrefixMode)


def pooled_size(size: int, stride: int, mode: str) -> int:
    """One axis after pooling: floor for avg/max, ceil for bilinear."""
    return math.ceil(size / stride) if mode == "bilinear" else size // stride


class PoolProjector(Projector):
    """``pool``: (B, prefix + H*W, C) -> (B, [prefix +] H'*W', C)."""

    name = "pool"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        stride: int = 2,
        mode: Mode = "avg",
        prefix_mode: PrefixMode = "drop",
    ) -> None:
        super().__init__(channels, grid, prefix)
        self.stride = check_positive(stride, "stride", self.name)
        self.mode = check_choice(mode, "mode", MODES, self.name)
        self.prefix_mode = check_choice(prefix_mode, "prefix_mode", PREFIX_MODES, self.name)
        self.out_grid: Grid = tuple(pooled_size(g, stride, mode) for g in self.grid)
        if min(self.out_grid) < 1:
            raise ConfigError(
                f"pool: stride {stride} is larger than the grid {self.grid} ({mode} pooling keeps floor(size/stride)"
                " per axis): use a smaller --stride"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        b = x.shape[0]
        grid = x[:, self.prefix :].transpose(1, 2).reshape(b, self.channels, *self.grid)
        s = self.stride
        if self.mode == "bilinear":
            mode = "bilinear" if len(self.grid) == 2 else "linear"
            pooled = F.interpolate(grid, size=self.out_grid, mode=mode, align_corners=False)
        elif len(self.grid) == 2:
            pooled = F.avg_pool2d(grid, s, s) if self.mode == "avg" else F.max_pool2d(grid, s, s)
        else:
            pooled = F.avg_pool1d(grid, s, s) if self.mode == "avg" else F.max_pool1d(grid, s, s)
        tokens = pooled.flatten(2).transpose(1, 2)
        if self.prefix_mode == "keep" and self.prefix:
            tokens = torch.cat([x[:, : self.prefix], tokens], dim=1)
        return tokens

    def window_forward(self, windows: Tensor) -> Tensor:
        """(B, U, s*s, C) windows -> (B, U, C): each window's mean (avg) or maximum (max). Not for bilinear,
        which interpolates across windows."""
        return windows.mean(2) if self.mode == "avg" else windows.amax(2)

    def tokens_out(self) -> int:
        return self.prefix_out() + math.prod(self.out_grid)

    def channels_out(self) -> int:
        return self.channels

    def output_grid(self) -> Grid | None:
        return self.out_grid

    def prefix_out(self) -> int:
        return self.prefix if self.prefix_mode == "keep" else 0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, mode={self.mode}, prefix_mode={self.prefix_mode}"

"""A window projector (patchmerger, unshuffle, pool avg/max) applied at merge-unit granularity.

With merge units (docs/merge-units.md) the tokens reaching the projector are in unit-window order: after the
protected prefix, each unit's s^2 tokens consecutive in the projector's in-window order ((di, dj) row-major). Each
unit, kept or merged, is one window: the projector's ``window_forward`` maps it to one output token, in the order
the units come. Uncompressed (the units still in raster order of the unit grid) the output equals the projector on
the raster tokens, token for token (InternVL v1's column-major output order included). The output token of a unit
sits at the unit's carried position (``ops.state.project_unit_state``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Grid, Projector


class UnitWindows(nn.Module):
    """``projector`` (with a ``window_forward``) on (B, prefix + U*s^2, C) unit-ordered tokens -> (B, [prefix +] U, D).

    ``raster``: the units are all there, in raster order of the unit grid (no compression before): the output then
    follows the projector's own output order and grid.
    """

    def __init__(self, projector: Projector, units: int, unit: int, raster: bool) -> None:
        super().__init__()
        self.projector, self.units, self.unit, self.raster = projector, units, unit, raster
        self.transposed = getattr(projector, "ps_version", "v2") == "v1"  # output windows column-major

    def forward(self, x: Tensor) -> Tensor:
        p = self.projector
        batch = x.shape[0]
        windows = x[:, p.prefix:].reshape(batch, self.units, self.unit * self.unit, x.shape[-1])
        out = p.window_forward(windows)
        if self.raster and self.transposed:
            h, w = p.grid[0] // self.unit, p.grid[1] // self.unit
            out = out.reshape(batch, h, w, -1).transpose(1, 2).reshape(batch, self.units, -1)
        if p.prefix_out():
            out = torch.cat([x[:, : p.prefix], out], dim=1)
        return out

    def tokens_out(self) -> int:
        return self.projector.prefix_out() + self.units

    def channels_out(self) -> int:
        return self.projector.channels_out()

    def prefix_out(self) -> int:
        return self.projector.prefix_out()

    def output_grid(self) -> Grid | None:
        return self.projector.output_grid() if self.raster else None

    def extra_repr(self) -> str:
        return f"units={self.units}, unit={self.unit}, raster={self.raster}"

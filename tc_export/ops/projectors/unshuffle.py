"""InternVL's pixel shuffle (scale 0.5, version v2) followed by its ``mlp1`` projector.

Each k x k window of the grid (k = 1/scale, 2 for InternVL) becomes one token whose channels are the window's
tokens concatenated row-major: ``out[n, i, j, (k*di + dj)*C + c] = x[n, k*i + di, k*j + dj, c]`` - ONNX
SpaceToDepth (DCR) on NCHW, not ``torch.pixel_unshuffle`` (whose channel order is c*k*k + k*di + dj). The class
/register prefix is dropped (InternVL drops the class token). Then ``mlp1``: LayerNorm(k*k*C, eps 1e-5) ->
Linear(k*k*C -> D) -> GELU (erf) -> Linear(D -> D); state-dict names ``mlp1.{0,1,3}.*`` as InternVL's.
Initialisation: PyTorch defaults (LayerNorm 1/0, ``nn.Linear`` default), InternVL's ``mlp1`` as constructed.

Grid rule: H and W must both be divisible by k (InternVL requires it); otherwise a ConfigError (pool or resize
first). 1-D grids are refused. Output grid: (H/k, W/k).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import ConfigError
from .base import Grid, Projector, out_channels_or


def block_size(scale: float) -> int:
    """The window side k for a downscale factor ``scale`` = 1/k (0.5 -> 2)."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < 1:
        raise ConfigError(f"unshuffle: scale must be 1/k for an integer k >= 2 (InternVL: 0.5), got {scale!r}")
    k = round(1 / scale)
    if abs(k * scale - 1) > 1e-6:
        raise ConfigError(f"unshuffle: scale must be 1/k for an integer k >= 2 (InternVL: 0.5), got {scale!r}")
    return k


class UnshuffleProjector(Projector):
    """``unshuffle``: (B, prefix + H*W, C) -> (B, (H/k)*(W/k), D) with k = 1/scale."""

    name = "unshuffle"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        scale: float = 0.5,
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix)
        self.scale = scale
        self.block = k = block_size(scale)
        h, w = self.require_2d()
        if h % k or w % k:
            raise ConfigError(
                f"unshuffle: scale {scale} needs a grid divisible by {k}, got {h}x{w}: pick an image size with an"
                f" even patch grid, or pool first"
            )
        self.out_grid: Grid = (h // k, w // k)
        self.out_channels = out_channels_or(out_channels, channels, self.name)
        wide = k * k * channels
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(wide, eps=1e-5),
            nn.Linear(wide, self.out_channels),
            nn.GELU(approximate="none"),
            nn.Linear(self.out_channels, self.out_channels),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i in (0, 1, 3):
            self.mlp1[i].reset_parameters()

    def unshuffle(self, x: Tensor) -> Tensor:
        """(B, prefix + H*W, C) -> (B, (H/k)*(W/k), k*k*C) in InternVL v2 channel order."""
        (h, w), k, c = self.grid, self.block, self.channels
        b = x.shape[0]
        windows = x[:, self.prefix :].reshape(b, h // k, k, w // k, k, c)
        return windows.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // k) * (w // k), k * k * c)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.mlp1(self.unshuffle(x))

    def tokens_out(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return self.out_grid

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, out_channels={self.out_channels}"

"""InternVL's pixel shuffle (scale 0.5, version v2 or v1) followed by its ``mlp1`` projector.

Each k x k window of the grid (k = 1/scale, 2 for InternVL) becomes one token whose channels are the window's
tokens concatenated row-major: ``out[n, i, j, (k*di + dj)*C + c] = x[n, k*i + di, k*j + dj, c]`` - ONNX
SpaceToDepth (DCR) on NCHW, not ``torch.pixel_unshuffle`` (whose channel order is c*k*k + k*di + dj). The class
/register prefix is dropped (InternVL drops the class token). ``ps_version="v1"`` (InternVL 1.2) skips the published
code's last permute: the same tokens come out in column-major window order (the output grid transposed). Then ``mlp1``: LayerNorm(k*k*C, eps 1e-5) ->
Linear(k*k*C -> D) -> GELU (erf) -> Linear(D -> D); state-dict names ``mlp1.{0,1,3}.*`` as InternVL's.
Initialisation: PyTorch defaults (LayerNorm 1/0, ``nn.Linear`` default), InternVL's ``mlp1`` as constructed.

Grid rule: H and W must both be divisible by k (InternVL requires it); otherwise a ConfigError (pool or resize
first). 1-D grids are refused. Output grid: (H/k, W/k).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import ConfigError
from .base import Grid, Projector, check_choice, out_channels_or

VERSIONS = ("v2", "v1")


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
        ps_version: str = "v2",
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix)
        self.scale = scale
        self.ps_version = check_choice(ps_version, "ps_version", VERSIONS, self.name)
        self.block = k = block_size(scale)
        h, w = self.require_2d()
        if h % k or w % k:
            raise ConfigError(
                f"unshuffle: scale {scale} needs a grid divisible by {k}, got {h}x{w}: pick an image size with an"
                f" even patch grid, or pool first"
            )
        self.out_grid: Grid = (h // k, w // k) if self.ps_version == "v2" else (w // k, h // k)
        self.out_channels = out_channels_or(out_channels, channels, self.name)
        self.build_projector(k * k * channels)
        self.reset_parameters()

    def build_projector(self, wide: int) -> None:
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(wide, eps=1e-5),
            nn.Linear(wide, self.out_channels),
            nn.GELU(approximate="none"),
            nn.Linear(self.out_channels, self.out_channels),
        )

    def reset_parameters(self) -> None:
        for i in (0, 1, 3):
            self.mlp1[i].reset_parameters()

    def unshuffle(self, x: Tensor) -> Tensor:
        """(B, prefix + H*W, C) -> (B, (H/k)*(W/k), k*k*C) in InternVL's channel order (v1: windows column-major)."""
        (h, w), k, c = self.grid, self.block, self.channels
        b = x.shape[0]
        windows = x[:, self.prefix :].reshape(b, h // k, k, w // k, k, c)  # (b, i, di, j, dj, c)
        order = (0, 1, 3, 2, 4, 5) if self.ps_version == "v2" else (0, 3, 1, 2, 4, 5)  # (i, j) or (j, i) windows
        return windows.permute(*order).reshape(b, (h // k) * (w // k), k * k * c)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.project(self.unshuffle(x))

    def project(self, wide: Tensor) -> Tensor:
        """(B, M, k*k*C) unshuffled windows -> (B, M, D): the layers after the pixel unshuffle."""
        return self.mlp1(wide)

    def window_forward(self, windows: Tensor) -> Tensor:
        """(B, U, k*k, C) windows, tokens in (di, dj) row-major order -> (B, U, D): one output token per window."""
        return self.project(windows.flatten(2))

    def tokens_out(self) -> int:
        return self.out_grid[0] * self.out_grid[1]

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return self.out_grid

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, ps_version={self.ps_version}, out_channels={self.out_channels}"

"""Qwen2-VL's PatchMerger: each 2 x 2 window of the grid becomes one token of 4C channels, then an MLP.

Behaviour (Qwen2-VL ``modeling_qwen2_vl.py`` ``PatchMerger``, spatial merge size 2): LayerNorm(C, eps 1e-6) on
every patch token (``ln_q``), the window's four tokens concatenated row-major (the window order of InternVL's
v2 pixel shuffle: ``out[n, i, j, (k*di + dj)*C + c]``; Qwen2-VL's patch embedding already emits the tokens window
by window, a plain tower emits them row by row, so the windows are gathered here), then ``mlp``:
Linear(4C -> 4C) -> GELU (erf) -> Linear(4C -> D). State-dict names ``ln_q.*``, ``mlp.{0,2}.*`` as Qwen2-VL's.
Initialisation: PyTorch defaults. The class/register prefix is dropped; H and W must be divisible by k.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Projector
from .unshuffle import UnshuffleProjector


class PatchMergerProjector(UnshuffleProjector):
    """``patchmerger``: (B, prefix + H*W, C) -> (B, (H/k)*(W/k), D) with k = 1/scale (Qwen2-VL: 2)."""

    name = "patchmerger"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        scale: float = 0.5,
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix, scale=scale, ps_version="v2", out_channels=out_channels)

    def build_projector(self, wide: int) -> None:
        self.ln_q = nn.LayerNorm(self.channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(approximate="none"), nn.Linear(wide, self.out_channels))

    def reset_parameters(self) -> None:
        self.ln_q.reset_parameters()
        for i in (0, 2):
            self.mlp[i].reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.mlp(self.unshuffle(self.ln_q(x)))  # per-token norm: the prefix it also sees is dropped after

    def window_forward(self, windows: Tensor) -> Tensor:
        """(B, U, k*k, C) windows, tokens in (di, dj) row-major order -> (B, U, D): one output token per window."""
        return self.mlp(self.ln_q(windows).flatten(2))

    def extra_repr(self) -> str:
        return f"{Projector.extra_repr(self)}, scale={self.scale}, out_channels={self.out_channels}"

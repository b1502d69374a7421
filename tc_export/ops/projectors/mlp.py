"""LLaVA-1.5's ``mlp2x_gelu`` projector: Linear(C -> D) -> GELU (exact, erf) -> Linear(D -> D), per token.

Acts on every token it is given, prefix included and in place (drop the class token before it, or put it after
``pool``). State-dict names: LLaVA's ``mm_projector.{0,2}.{weight,bias}`` are ``net.{0,2}.{weight,bias}`` here.
Initialisation: PyTorch's default ``nn.Linear`` init (LLaVA builds plain ``nn.Linear`` layers).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Grid, Projector, out_channels_or


class MLPProjector(Projector):
    """``mlp``: (B, prefix + H*W, C) -> (B, prefix + H*W, D); the grid and the prefix are kept."""

    name = "mlp"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix)
        self.out_channels = out_channels_or(out_channels, channels, self.name)
        self.net = nn.Sequential(
            nn.Linear(channels, self.out_channels),
            nn.GELU(approximate="none"),
            nn.Linear(self.out_channels, self.out_channels),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.net[0].reset_parameters()
        self.net[2].reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.net(x)

    def tokens_out(self) -> int:
        return self.tokens_in

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return self.grid

    def prefix_out(self) -> int:
        return self.prefix

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_channels={self.out_channels}"

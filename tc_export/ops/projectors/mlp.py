"""LLaVA-1.5's ``mlp2x_gelu`` projector: Linear(C -> D) -> GELU (exact, erf) -> Linear(D -> D), per token.

Per token. ``prefix_mode="drop"`` (the default; LLaVA's ``mm_vision_select_feature = "patch"``) leaves the
class/register tokens out: CLIP ViT-L/14-336 gives 576 tokens; ``"keep"`` (LLaVA's ``cls_patch``) projects them
too, in front (577). State-dict names: LLaVA's ``mm_projector.{0,2}.{weight,bias}`` are ``net.{0,2}.{weight,bias}`` here.
Initialisation: PyTorch's default ``nn.Linear`` init (LLaVA builds plain ``nn.Linear`` layers).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Grid, Projector, check_choice, out_channels_or
from .pool import PREFIX_MODES, PrefixMode


class MLPProjector(Projector):
    """``mlp``: (B, prefix + H*W, C) -> (B, [prefix +] H*W, D); the grid is kept."""

    name = "mlp"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        out_channels: int | None = None,
        prefix_mode: PrefixMode = "drop",
    ) -> None:
        super().__init__(channels, grid, prefix)
        self.out_channels = out_channels_or(out_channels, channels, self.name)
        self.prefix_mode = check_choice(prefix_mode, "prefix_mode", PREFIX_MODES, self.name)
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
        return self.net(x if self.prefix_mode == "keep" else x[:, self.prefix :])

    def tokens_out(self) -> int:
        return self.prefix_out() + self.grid_tokens

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return self.grid

    def prefix_out(self) -> int:
        return self.prefix if self.prefix_mode == "keep" else 0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_channels={self.out_channels}, prefix_mode={self.prefix_mode}"

"""Honeybee's C-Abstractor (``honeybee/projectors.py`` ``CAbstractor``, depth 3, MLP depth 2) as a static module.

Forward: drop the prefix; add a learned position embedding (1, H*W, C); NCHW; stage 1 (``depth`` RegNet
bottleneck blocks, C -> hidden); adaptive average pooling to sqrt(M) x sqrt(M); stage 2 (``depth`` blocks, hidden
-> hidden); tokens (row-major); readout Linear(hidden -> D) -> SiLU -> Linear(D -> D).

A block is timm's ``regnet.Bottleneck`` as Honeybee builds it (``RegStage(stride=1, dilation=1, act_layer=SiLU,
norm_layer=LayerNorm2d)``, bottle ratio 1, group size 1, SE ratio 0.25 of the block's *input* width):
conv1 1x1 -> LN2d -> SiLU -> conv2 3x3 depthwise (pad 1) -> LN2d -> SiLU -> squeeze-excite (mean, 1x1 conv,
SiLU, 1x1 conv, sigmoid gate) -> conv3 1x1 -> LN2d -> + shortcut (identity, or 1x1 conv -> LN2d when the width
changes) -> SiLU. Convs have no bias (SE convs do). LayerNorm2d eps is 1e-5: timm's ``ConvNormAct`` turns
``LayerNorm2d`` (default eps 1e-6) into ``LayerNormAct2d``, whose default eps is 1e-5 (measured, timm 1.0.31).

Adaptive pooling is a constant bin-averaging matrix per axis (``A_h @ x @ A_w^T``), bins
[floor(i*H/h'), ceil((i+1)*H/h')) exactly as ``adaptive_avg_pool2d``; it exports for any sizes (16 -> 12 too).

State-dict names follow Honeybee's ``abstractor.*``: ``pos_emb``, ``net.0.b{i}.*`` (stage 1, timm names),
``net.2.b{i}.*`` (stage 2), ``readout.{0,2}.*``. Versions of Honeybee that drop the class token inside the
projector give ``pos_emb`` a class-token row, (1, 1 + H*W, C), added and then dropped: drop that row to load it.

Initialisation as Honeybee: ``pos_emb`` trunc_normal(std 0.02); then its ``_init_weights`` (``post_init``):
Conv2d and Linear weights normal(0, initializer_range), biases 0, LayerNorms weight 1 bias 0; initializer_range
is taken as 0.02 here (a config value, not checked against a released checkpoint's config).

Rules: ``tokens`` (M) must be a perfect square; 2-D grids only; sqrt(M) may exceed the grid (adaptive pooling
then repeats rows, as PyTorch's does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .base import Grid, Projector, check_positive, out_channels_or, tokens_nchw_to_tokens, trunc_normal_

NORM_EPS = 1e-5
SE_RATIO = 0.25
INIT_STD = 0.02


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvNorm(nn.Module):
    """conv (no bias) -> LayerNorm2d -> optional SiLU; names ``conv`` / ``bn`` as timm's ``ConvNormAct``."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNorm2d(cout, eps=NORM_EPS)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(SiLU(fc1(mean_hw(x)))))."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    """One RegNet bottleneck block, stride 1, bottle ratio 1, depthwise 3x3, SE on the input width."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        reduced = int(round(cin * SE_RATIO))
        if reduced < 1:
            raise ConfigError(f"cabstractor: width {cin} is too small for squeeze-excite (needs >= 2 channels)")
        self.conv1 = ConvNorm(cin, cout, 1)
        self.conv2 = ConvNorm(cout, cout, 3, groups=cout)
        self.se = SqueezeExcite(cout, reduced)
        self.conv3 = ConvNorm(cout, cout, 1, act=False)
        self.downsample = ConvNorm(cin, cout, 1, act=False) if cin != cout else nn.Identity()
        self.act3 = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(y + self.downsample(x))


class RegStage(nn.Sequential):
    """``depth`` bottleneck blocks named ``b1``, ``b2``, ... (timm's names)."""

    def __init__(self, depth: int, cin: int, cout: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout))


def adaptive_pool_matrix(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in) averaging matrix: row i averages [floor(i*n/m), ceil((i+1)*n/m)) as PyTorch does."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.to(torch.float32)


class BinAveragePool2d(nn.Module):
    """``adaptive_avg_pool2d`` to a fixed output size for a fixed input size, as two constant matmuls."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
        super().__init__()
        self.size_in, self.size_out = size_in, size_out
        self.register_buffer("rows", adaptive_pool_matrix(size_in[0], size_out[0]), persistent=False)
        self.register_buffer("cols_t", adaptive_pool_matrix(size_in[1], size_out[1]).T.contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols_t)

    def extra_repr(self) -> str:
        return f"{self.size_in} -> {self.size_out}"


class CAbstractor(Projector):
    """``cabstractor``: (B, prefix + H*W, C) -> (B, M, D), M = ``tokens`` (a perfect square)."""

    name = "cabstractor"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        tokens: int = 144,
        hidden: int | None = None,
        depth: int = 3,
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix)
        h, w = self.require_2d()
        self.tokens = check_positive(tokens, "tokens", self.name)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ConfigError(
                f"cabstractor: tokens must be a perfect square (pooled to sqrt x sqrt), got {tokens}:"
                f" try {side * side} or {(side + 1) ** 2}"
            )
        self.side = side
        self.hidden = out_channels_or(hidden, channels, self.name, "hidden")
        self.depth = check_positive(depth, "depth", self.name)
        self.out_channels = out_channels_or(out_channels, channels, self.name)
        self.pos_emb = nn.Parameter(torch.zeros(1, h * w, channels))
        self.net = nn.Sequential(
            RegStage(depth, channels, self.hidden),
            BinAveragePool2d((h, w), (side, side)),
            RegStage(depth, self.hidden, self.hidden),
        )
        self.readout = nn.Sequential(
            nn.Linear(self.hidden, self.out_channels), nn.SiLU(), nn.Linear(self.out_channels, self.out_channels)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        trunc_normal_(self.pos_emb, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, INIT_STD)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        tokens = x[:, self.prefix :] + self.pos_emb
        grid = tokens.transpose(1, 2).reshape(x.shape[0], self.channels, *self.grid)
        return self.readout(tokens_nchw_to_tokens(self.net(grid)))

    def tokens_out(self) -> int:
        return self.tokens

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return (self.side, self.side)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, tokens={self.tokens}, hidden={self.hidden}, depth={self.depth},"
            f" out_channels={self.out_channels}"
        )

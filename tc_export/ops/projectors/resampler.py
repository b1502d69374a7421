"""Qwen-VL's query resampler (``visual.py`` ``Resampler`` + ``ln_post`` + ``proj``), static, with an optional stack.

Layer 1 is Qwen-VL's: kv = ln_kv(kv_proj(x)) with kv_proj = Linear(C -> D, no bias) (Identity when C == D, as
Qwen-VL); M learned queries; q = ln_q(query) + pos_q; k = kv + pos_k; v = kv; h = MultiheadAttention(q, k, v)
(``heads`` heads, no residual). Then ``ln_post`` and ``h @ proj`` (a D x D matrix, no bias). The prefix is dropped
(every key needs a grid position).

Positions: MAE's fixed 2-D sin-cos table (first D/2 channels encode the column, the last D/2 the row; each half
is [sin, cos] of pos * 10000^(-k/(D/4))) on an s x s grid with s = ceil(sqrt(M)). pos_q = the first M cells of
that grid, row-major (all of it when M is a square, as Qwen-VL; M = 32 uses 32 of 6 x 6 = 36 cells). pos_k = the
whole s x s table resized to the input grid (H, W) with bicubic interpolation (align_corners=False), computed once
here and stored as a constant buffer, so the export holds no Resize; skipped when (H, W) == (s, s).

``depth`` > 1 adds depth - 1 Perceiver-style layers after layer 1, each pre-norm with residuals, attending to the
same kv and pos_k: h = h + MHA(LN(h) + pos_q, kv + pos_k, kv); h = h + MLP(LN(h)) with MLP = Linear(D -> 4D) ->
GELU -> Linear(4D -> D). ``ln_post`` and ``proj`` come after the last layer.

State-dict names as Qwen-VL's ``visual.*``: ``attn_pool.{query, pos_embed, kv_proj.weight, attn.*, ln_q.*,
ln_kv.*}``, ``ln_post.*``, ``proj``; extra layers ``layers.{i}.*``. LayerNorm eps 1e-6 (Qwen-VL's norm_layer).
Initialisation as Qwen-VL: query and every Linear weight trunc_normal(std 0.02), Linear biases 0, LayerNorms 1/0,
the attention's packed in-projection keeps nn.MultiheadAttention's xavier_uniform (bias 0), proj = D^-0.5 * randn.
Rules: D divisible by 4 (sin-cos) and by ``heads`` (default max(1, D // 128), Qwen-VL's rule); 2-D grids only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .base import Grid, Projector, check_positive, out_channels_or, trunc_normal_

LN_EPS = 1e-6
INIT_STD = 0.02


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(len(positions), dim): [sin(p * w_k), cos(p * w_k)], w_k = 10000^(-k / (dim/2)), k < dim/2."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, side: int) -> Tensor:
    """(side*side, dim) MAE table, row-major cells (i, j): cat(sincos_1d(dim/2, j), sincos_1d(dim/2, i))."""
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).to(torch.float32)


def resize_positions(table: Tensor, side: int, size: tuple[int, int]) -> Tensor:
    """(side*side, D) table -> (H*W, D) by bicubic interpolation (align_corners=False), at construction only."""
    if size == (side, side):
        return table.clone()
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


class CrossAttentionPool(nn.Module):
    """Qwen-VL's ``Resampler``: learned queries attend once to the projected, normalised tokens."""

    def __init__(self, channels: int, dim: int, heads: int, queries: int, grid: tuple[int, int]) -> None:
        super().__init__()
        side = math.ceil(math.sqrt(queries))
        table = sincos_2d(dim, side)
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.register_buffer("pos_embed", table[:queries].clone())
        self.register_buffer("key_pos", resize_positions(table, side, grid), persistent=False)
        self.kv_proj = nn.Linear(channels, dim, bias=False) if channels != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, C) -> (h (B, M, D), kv (B, N, D), keys (B, N, D))."""
        kv = self.ln_kv(self.kv_proj(x))
        keys = kv + self.key_pos
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, keys, kv, need_weights=False)[0], kv, keys


class PerceiverLayer(nn.Module):
    """An extra layer: h + MHA(LN(h) + pos_q, keys, kv), then h + MLP(LN(h))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_ff = nn.LayerNorm(dim, eps=LN_EPS)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="none"), nn.Linear(4 * dim, dim))

    def forward(self, h: Tensor, pos_q: Tensor, keys: Tensor, kv: Tensor) -> Tensor:
        h = h + self.attn(self.ln_q(h) + pos_q, keys, kv, need_weights=False)[0]
        return h + self.ff(self.ln_ff(h))


class ResamplerProjector(Projector):
    """``resampler``: (B, prefix + H*W, C) -> (B, M, D), M = ``queries``."""

    name = "resampler"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        queries: int = 256,
        heads: int | None = None,
        depth: int = 1,
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix)
        h, w = self.require_2d()
        self.queries = check_positive(queries, "queries", self.name)
        self.depth = check_positive(depth, "depth", self.name)
        self.out_channels = d = out_channels_or(out_channels, channels, self.name)
        self.heads = max(1, d // 128) if heads is None else check_positive(heads, "heads", self.name)
        if d % 4:
            raise ConfigError(f"resampler: the width D={d} must be divisible by 4 (2-D sin-cos positions)")
        if d % self.heads:
            raise ConfigError(f"resampler: the width D={d} is not divisible by heads={self.heads}: set heads")
        self.attn_pool = CrossAttentionPool(channels, d, self.heads, queries, (h, w))
        self.layers = nn.ModuleList(PerceiverLayer(d, self.heads) for _ in range(depth - 1))
        self.ln_post = nn.LayerNorm(d, eps=LN_EPS)
        self.proj = nn.Parameter(torch.empty(d, d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                module._reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        trunc_normal_(self.attn_pool.query, std=INIT_STD)
        self.proj.copy_(torch.randn(self.out_channels, self.out_channels) * self.out_channels**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        h, kv, keys = self.attn_pool(x[:, self.prefix :])
        for layer in self.layers:
            h = layer(h, self.attn_pool.pos_embed, keys, kv)
        return self.ln_post(h) @ self.proj

    def tokens_out(self) -> int:
        return self.queries

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        side = math.isqrt(self.queries)
        return (side, side) if side * side == self.queries else None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, queries={self.queries}, heads={self.heads}, depth={self.depth},"
            f" out_channels={self.out_channels}"
        )

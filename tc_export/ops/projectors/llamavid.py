"""LLaMA-VID's two-token projector (``llamavid/model/llamavid_arch.py`` ``token_generation``, not long-video).

``forward(x, queries)``: ``x`` (B, prefix + H*W, C) visual tokens, ``queries`` (B, Q, Dq) text queries (the
Q-Former output over the prompt; a second input of the exported model, static Q and Dq). With V the visual tokens
(prefix dropped, as LLaMA-VID drops the class token):
- context token: Qp = Linear(Dq -> C)(queries) (``vlm_att_projector``); K = Linear(C -> C)(V)
  (``vlm_att_key_projector``); A = softmax(Qp K^T / sqrt(C)) over the visual tokens; context =
  Linear(C -> D)(mean over the Q queries of A V) (``vlm_att_val_projector``). V itself is not projected.
- content tokens: ``grid_size`` 1 = mean over all visual tokens (1 token, LLaMA-VID ``compress_type='mean'``);
  ``grid_size`` g > 1 = ``avg_pool2d(kernel=stride=H//g)`` per axis (LLaMA-VID ``'grid:g'``), which must give
  exactly g x g (else a ConfigError naming the sizes that do); then ``mm_projector`` = LLaVA mlp2x_gelu
  Linear(C -> D) -> GELU -> Linear(D -> D).
Output cat(context, content): (B, 1 + g*g, D). Output grid: (g, g) after a 1-token prefix when g > 1, else None.
State-dict names are LLaMA-VID's (``vlm_att_projector``, ``vlm_att_key_projector``, ``vlm_att_val_projector``,
``mm_projector.{0,2}``). Initialisation: PyTorch's default ``nn.Linear`` init (LLaMA-VID builds these layers
after the model's ``post_init``, so they keep it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .base import Grid, Projector, check_positive, out_channels_or


def grid_pool_stride(size: int, grid_size: int) -> int:
    """LLaMA-VID's pooling stride for one axis: size // grid_size (the output is size // stride)."""
    return size // grid_size


def valid_grid_sizes(grid: tuple[int, ...]) -> list[int]:
    return [g for g in range(2, min(grid) + 1) if all(s // (s // g) == g for s in grid)]


class LlamaVidProjector(Projector):
    """``llamavid``: (x (B, prefix + H*W, C), queries (B, Q, Dq)) -> (B, 1 + g*g, D)."""

    name = "llamavid"

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int] | tuple[int],
        prefix: int,
        *,
        grid_size: int = 1,
        queries: int = 32,
        query_channels: int = 768,
        out_channels: int | None = None,
    ) -> None:
        super().__init__(channels, grid, prefix)
        self.grid_size = g = check_positive(grid_size, "grid_size", self.name)
        self.queries = check_positive(queries, "queries", self.name)
        self.query_channels = check_positive(query_channels, "query_channels", self.name)
        self.out_channels = d = out_channels_or(out_channels, channels, self.name)
        if g > 1:
            self.require_2d()
            if min(self.grid) < g or any(s // (s // g) != g for s in self.grid):
                valid = ", ".join(map(str, valid_grid_sizes(self.grid))) or "none"
                raise ConfigError(
                    f"llamavid: grid_size {g} on a {'x'.join(map(str, self.grid))} grid pools with stride H//g to a"
                    f" different size; grid sizes that work here: 1, {valid}"
                )
            self.pool_stride = tuple(grid_pool_stride(s, g) for s in self.grid)
        self.vlm_att_projector = nn.Linear(query_channels, channels)
        self.vlm_att_key_projector = nn.Linear(channels, channels)
        self.vlm_att_val_projector = nn.Linear(channels, d)
        self.mm_projector = nn.Sequential(nn.Linear(channels, d), nn.GELU(approximate="none"), nn.Linear(d, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def context(self, vis: Tensor, queries: Tensor) -> Tensor:
        """(B, N, C) visual tokens, (B, Q, Dq) queries -> (B, 1, D) context token."""
        q = self.vlm_att_projector(queries)
        k = self.vlm_att_key_projector(vis)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.channels), dim=-1)
        return self.vlm_att_val_projector((attn @ vis).mean(1, keepdim=True))

    def content(self, vis: Tensor) -> Tensor:
        """(B, N, C) visual tokens -> (B, g*g, D) content tokens."""
        if self.grid_size == 1:
            pooled = vis.mean(1, keepdim=True)
        else:
            b, (h, w) = vis.shape[0], self.grid
            nchw = vis.transpose(1, 2).reshape(b, self.channels, h, w)
            pooled = F.avg_pool2d(nchw, self.pool_stride, self.pool_stride).flatten(2).transpose(1, 2)
        return self.mm_projector(pooled)

    def forward(self, x: Tensor, queries: Tensor) -> Tensor:
        self.check_input(x)
        if queries.dim() != 3 or queries.shape[1:] != (self.queries, self.query_channels):
            raise ValueError(
                f"llamavid: expected queries (B, {self.queries}, {self.query_channels}), got {tuple(queries.shape)}"
            )
        vis = x[:, self.prefix :]
        return torch.cat([self.context(vis, queries), self.content(vis)], dim=1)

    def tokens_out(self) -> int:
        return 1 + self.grid_size**2

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return (self.grid_size, self.grid_size) if self.grid_size > 1 else None

    def prefix_out(self) -> int:
        return 1 if self.grid_size > 1 else 0

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, grid_size={self.grid_size}, queries={self.queries},"
            f" query_channels={self.query_channels}, out_channels={self.out_channels}"
        )

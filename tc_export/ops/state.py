"""The per-token state every token op maps besides the features: one "mass" tensor.

A token stands for ``size`` original tokens. When positions are carried, the state is (B, N, 1 + P):
column 0 the size, columns 1..P the size times the token's position (P coordinates: (row, column) for images,
(frame, row, column) for video, the index for 1-D sequences); without positions it is the plain size (B, N, 1).
Every op maps all columns the same way it maps the size: a merge sums its members' rows, pruning gathers rows,
a fused or extra token sums the rows it absorbs. So a merged token's position, mass / size, is the size-weighted
mean of its members' positions, a pruned token's is its exact original one, and a new per-token quantity is one
more column here, not a change in every op. Where an op needs the size itself (a weight, padding), it reads
column 0 with ``size_column``; consumers outside the ops (attention bias, pooling) do too.

Protected tokens (prefix and suffix) start with position -1 in every coordinate (mass [1, -1, ...]); no op merges
them, so they keep it. Padding tokens have size 0 and therefore mass 0: their position reads as 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .rows import WEIGHT_FLOOR


def size_column(state: Tensor) -> Tensor:
    """The sizes (B, N, 1) of a token state: its first column (the state itself when it has one column, so a
    model without positions exports exactly the same graph)."""
    return state if state.shape[-1] == 1 else state[..., :1]


def positions_of(state: Tensor) -> Tensor:
    """The carried positions (B, N, P) of a state with positions: mass / size (0 for size-0 padding)."""
    size = state[..., :1]
    return state[..., 1:] / size.clamp_min(WEIGHT_FLOOR)


def original_positions(
    tokens: int, prefix: int, suffix: int, grid: tuple[int, ...] | None, frames: int | None = None,
) -> Tensor:
    """Positions (N, P) of the original tokens: -1 on the protected rows; grid coordinates (row-major) of the
    tokens between them, or their index along a 1-D sequence (no grid, or a 1-D grid). ``frames``: a video
    tower run frame by frame (frames in the batch): a frame coordinate comes first, filled by ``initial_state``."""
    body = tokens - prefix - suffix
    if grid is not None and len(grid) >= 2 and math.prod(grid) == body:
        axes = [torch.arange(extent, dtype=torch.float32) for extent in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(body, len(grid))
    else:
        coords = torch.arange(body, dtype=torch.float32).unsqueeze(-1)
    if frames is not None:
        coords = torch.cat([torch.zeros(body, 1), coords], dim=-1)
    width = coords.shape[-1]
    return torch.cat([torch.full((prefix, width), -1.0), coords, torch.full((suffix, width), -1.0)])


def initial_state(
    x: Tensor, size: Tensor | None, prefix: int, suffix: int, grid: tuple[int, ...] | None,
    frames: int | None = None,
) -> Tensor:
    """The state with positions (B, N, 1 + P) of the tokens ``x`` (B, N, C) entering the first op.

    ``size``: the initial sizes (B, N, 1) from a padding mask, or None (all 1). ``frames``: the batch holds
    ``frames`` consecutive frames per clip; each body token's frame coordinate is its batch index mod ``frames``.
    """
    batch, tokens = x.shape[0], x.shape[1]
    positions = original_positions(tokens, prefix, suffix, grid, frames).to(x.device)
    positions = positions.unsqueeze(0).expand(batch, -1, -1)
    if frames is not None:
        frame = (torch.arange(batch, device=x.device) % frames).to(torch.float32)
        body = torch.zeros(tokens, 1, device=x.device)
        body[prefix:tokens - suffix] = 1.0
        positions = torch.cat([positions[..., :1] + frame[:, None, None] * body, positions[..., 1:]], dim=-1)
    size = torch.ones(batch, tokens, 1, device=x.device) if size is None else size.to(torch.float32)
    return torch.cat([size, size * positions], dim=-1)


def leading_tokens(tokens: Tensor, suffix: int) -> Tensor:
    """The rows of (B, N, ...) ``tokens`` in front of the ``suffix`` protected trailing tokens: what an op sees."""
    return tokens[:, : tokens.shape[1] - suffix]


def rejoin_suffix(body: Tensor, whole: Tensor | None, suffix: int) -> Tensor:
    """An op's output ``body`` followed by the ``suffix`` protected trailing rows of ``whole``, unchanged and in
    order (ones when ``whole`` is None: sizes that were all 1)."""
    if whole is None:
        tail = body.new_ones(body.shape[0], suffix, body.shape[2])
    else:
        tail = whole[:, whole.shape[1] - suffix:]
    return torch.cat([body, tail], dim=1)


def grid_state(tokens: Tensor, prefix: int, grid: tuple[int, ...], covered: float) -> Tensor:
    """The state with positions of a projector's output (B, prefix + prod(grid), C): its grid's coordinates
    (-1 on the prefix rows), each token standing for ``covered`` original patches."""
    positions = original_positions(tokens.shape[1], prefix, 0, grid).to(tokens.device)
    mass = torch.cat([torch.ones(positions.shape[0], 1, device=tokens.device), positions], dim=-1) * covered
    return mass.unsqueeze(0).expand(tokens.shape[0], -1, -1)

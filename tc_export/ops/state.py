"""The per-token state every token op maps besides the features: one "mass" tensor.

A token stands for ``size`` original tokens. When positions are carried, the state is (B, N, 1 + P):
column 0 the size, columns 1..P the size times the token's position (P coordinates: (row, column) for images,
(frame, row, column) for video, the index for 1-D sequences); without positions it is the plain size (B, N, 1).
Every op maps all columns the same way it maps the size: a merge sums its members' rows, pruning gathers rows,
a fused or extra token sums the rows it absorbs. So a merged token's position, mass / size, is the size-weighted
mean of its members' positions, a pruned token's is its exact original one, and a new per-token quantity is one
more column here, not a change in every op. Where an op needs the size itself (a weight, padding), it reads
column 0 with ``size_column``; consumers outside the ops (attention bias, pooling) do too.

A stream carried along (Qwen3-VL's deepstack: an earlier layer's tokens that must follow the same later decisions)
is more columns of the same kind: ``carried_mass`` (size x the unit's tokens, slot by slot) joined to the state
for each op (``join_columns``, ``split_columns``), read back with ``carried_windows`` (mass / size): gathered exactly
where units are pruned, the size-weighted mean of the members where units merge (ToMe's own rule for tokens).

Protected tokens (prefix and suffix) start with position -1 in every coordinate (mass [1, -1, ...]); no op merges
them, so they keep it. Padding tokens have size 0 and therefore mass 0: their position reads as 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .rows import WEIGHT_FLOOR, top_k


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


def grid_state(tokens: Tensor, prefix: int, grid: tuple[int, ...], covered: float, frames: int | None = None) -> Tensor:
    """The state with positions of a projector's output (B, prefix + prod(grid), C): its grid's coordinates
    (-1 on the prefix rows), each token standing for ``covered`` original patches."""
    return initial_state(tokens, None, prefix, 0, grid, frames) * covered


# --- Merge units (docs/merge-units.md) ---------------------------------------------------------------------------
# With a unit s, the patch tokens run through the tower in unit-window order: each s x s window's tokens
# consecutive, (di, dj) row-major (the order PatchMerger and pixel unshuffle v2 read), windows in raster order of the
# unit grid (H/s, W/s). The state then holds one row per protected token and one row per unit: the unit's size (the
# original units it stands for) and, when carried, its position on the unit grid (frame coordinate first). Every
# per-token consumer reads ``expand_units`` of it.


def unit_grid(grid: tuple[int, ...] | None, unit: int) -> tuple[int, int]:
    """The unit grid (H/s, W/s) of a patch grid; a one-line ConfigError when there is none or s does not divide it."""
    from ..errors import ConfigError

    if grid is None or len(grid) != 2:
        raise ConfigError(f"--unit {unit} needs a 2-D patch grid, and this model has {grid or 'none'}")
    if grid[0] % unit or grid[1] % unit:
        raise ConfigError(f"--unit {unit} does not divide the {grid[0]}x{grid[1]} patch grid: pick an image size "
                          f"whose grid is a multiple of {unit}")
    return grid[0] // unit, grid[1] // unit


def unit_window_order(grid: tuple[int, int], unit: int) -> Tensor:
    """Raster indices (H*W,) of the patch tokens in unit-window order: entry u*s^2 + di*s + dj is the patch
    (s*i + di, s*j + dj) of unit u = i*(W/s) + j."""
    h, w = grid
    raster = torch.arange(h * w).reshape(h // unit, unit, w // unit, unit)  # (i, di, j, dj)
    return raster.permute(0, 2, 1, 3).reshape(-1)


def window_unit_order(grid: tuple[int, int], unit: int, window: int) -> Tensor:
    """Raster indices (H*W,) of the patch tokens in window-then-unit order: windows of ``window`` x ``window`` units
    in raster order of the window grid, units in raster order within their window, each unit's tokens (di, dj)
    row-major (Qwen2.5-VL's own token order, ``get_vision_window_index``, for grids the windows divide)."""
    from ..errors import ConfigError

    rows, cols = grid[0] // unit, grid[1] // unit
    if rows % window or cols % window:
        raise ConfigError(f"windows of {window}x{window} units do not divide the {rows}x{cols} unit grid")
    units = torch.arange(rows * cols).reshape(rows // window, window, cols // window, window)  # (I, i, J, j)
    return unit_window_order(grid, unit).view(rows * cols, unit * unit)[units.permute(0, 2, 1, 3).reshape(-1)] \
        .reshape(-1)


def to_unit_order(x: Tensor, prefix: int, grid: tuple[int, int], unit: int, window: int | None = None) -> Tensor:
    """The tokens (B, N, C) with the ``grid`` patch rows after the ``prefix`` gathered into unit-window order
    (``unit_window_order``; ``window``: window-then-unit order, ``window_unit_order``; one constant Gather);
    protected prefix and suffix rows untouched."""
    order = unit_window_order(grid, unit) if window is None else window_unit_order(grid, unit, window)
    index = torch.cat([torch.arange(prefix), order + prefix, torch.arange(prefix + order.numel(), x.shape[1])])
    return x.index_select(1, index.to(x.device))


def unit_offsets(unit: int, dims: int, frames: bool) -> Tensor:
    """(s^2, dims) in-window offsets (di, dj) of a unit's tokens, in window order; 0 on a leading frame coordinate."""
    steps = torch.arange(unit, dtype=torch.float32)
    offsets = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1).reshape(unit * unit, 2)
    if frames:
        offsets = torch.cat([torch.zeros(unit * unit, 1), offsets], dim=-1)
    if offsets.shape[1] != dims:
        raise ValueError(f"a unit state has (frame,) row, column positions, not {dims} coordinates")
    return offsets


def expand_units(state: Tensor, prefix: int, suffix: int, unit: int, frames: bool = False) -> Tensor:
    """The per-token state (B, prefix + U*s^2 + suffix, K) of a unit state (B, prefix + U + suffix, K).

    Protected rows once, each unit row s^2 times (its tokens stand for ``size`` original tokens each, slot by slot).
    Carried positions become patch coordinates: s * (unit position) + (di, dj) on the spatial axes (a leading frame
    coordinate unchanged); as masses: s * mass + size * offset. Exact for merged units too: slot (di, dj) of a
    merged unit is the size-weighted mean of its members' slot tokens.
    """
    units = state.shape[1] - prefix - suffix
    body = state[:, prefix:prefix + units].repeat_interleave(unit * unit, dim=1)
    if state.shape[-1] > 1:
        dims = state.shape[-1] - 1
        offsets = unit_offsets(unit, dims, frames).to(state)
        scale = torch.tensor([1.0] * int(frames) + [float(unit)] * (dims - int(frames)), device=state.device,
                             dtype=state.dtype)
        size = body[..., :1]
        body = torch.cat([size, body[..., 1:] * scale + size * offsets.repeat(units, 1)], dim=-1)
    return torch.cat([state[:, :prefix], body, state[:, prefix + units:]], dim=1)


def initial_unit_state(x: Tensor, prefix: int, suffix: int, grid: tuple[int, int], frames: int | None = None,
                       window: int | None = None) -> Tensor:
    """The unit state with positions of ``x`` (B, prefix + U*s^2 + suffix, C) entering the first op: one row per
    protected token (position -1) and one per unit of the unit ``grid`` (its (row, column) there, raster order;
    ``window``: windows of ``window`` x ``window`` units one after the other, the order of ``window_unit_order``)."""
    rows = prefix + grid[0] * grid[1] + suffix
    state = initial_state(x[:, :rows], None, prefix, suffix, grid, frames)
    if window is None:
        return state
    units = grid[0] * grid[1]
    order = window_unit_order(grid, 1, window).to(x.device)  # the unit grid's cells in window order
    return torch.cat([state[:, :prefix], state[:, prefix:prefix + units][:, order], state[:, prefix + units:]], dim=1)


def raster_units(tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens (B, n, C) and their state (B, n, 1 + P), one row per unit, sorted into raster order of the units'
    carried (row, column): by row, then by column, exact ties to the earlier row (two
    TopKs: by column, then stably by row). A windowed tower's reverse window order, which gives its merger's output
    in raster order; merged units sit at fractional positions (the size-weighted mean of their members'), which a
    single key row x width + column would not order by row."""
    rows = tokens.shape[1]
    position = positions_of(state)[..., -2:]
    by_column = top_k(position[..., 1], rows, largest=False)[1]
    row = position[..., 0].gather(1, by_column)
    order = by_column.gather(1, top_k(row, rows, largest=False)[1])
    pick = order.unsqueeze(-1)
    return tokens.gather(1, pick.expand(-1, -1, tokens.shape[-1])), state.gather(1, pick.expand(-1, -1, state.shape[-1]))


def project_unit_state(state: Tensor, prefix: int, keep_prefix: bool, unit: int, transposed: bool) -> Tensor:
    """The state of a window projector's output (one token per unit) from the unit state entering it: each token
    covers its unit's size x s^2 patches at the unit's position on the unit grid ((column, row) when the projector's
    output grid is transposed, InternVL v1); the protected rows only when the projector keeps them."""
    body = state[:, prefix:] * float(unit * unit)
    if transposed and body.shape[-1] >= 3:
        body = torch.cat([body[..., :-2], body[..., -1:], body[..., -2:-1]], dim=-1)
    return torch.cat([state[:, :prefix], body], dim=1) if keep_prefix else body


def carried_mass(tokens: Tensor, state: Tensor, unit: int) -> Tensor:
    """A stream ``tokens`` (B, U*s^2, C) in unit order as state columns (B, U, s^2 * C): each unit's tokens
    concatenated slot by slot, times the unit's size, so that every op maps them as it maps the size."""
    rows = tokens.reshape(tokens.shape[0], state.shape[1], unit * unit * tokens.shape[-1])
    return rows * size_column(state)


def carried_windows(mass: Tensor, state: Tensor, unit: int) -> Tensor:
    """The carried stream back as windows (B, U, s^2, C): mass / size (``carried_mass``'s inverse)."""
    rows = mass / size_column(state).clamp_min(WEIGHT_FLOOR)
    return rows.reshape(rows.shape[0], rows.shape[1], unit * unit, -1)


def join_columns(state: Tensor, *carried: Tensor) -> Tensor:
    """The state with carried columns after its own (what an op maps, all columns alike)."""
    return torch.cat([state, *carried], dim=-1)


def split_columns(joined: Tensor, widths: tuple[int, ...]) -> tuple[Tensor, ...]:
    """``join_columns``' inverse: the state, then each carried stream's columns."""
    return tuple(torch.split(joined, list(widths), dim=-1))

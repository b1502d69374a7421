"""Rotary position embeddings recomputed from the carried positions.

A rotary unit is ``x * cos + rotate(x) * sin`` on the queries or keys of one attention site, where ``cos`` and
``sin`` are fixed tables (computed from parameters and constants only, laid out by token). Every rotary variant
this finder meets (timm's axial, mixed-frequency, EVA-02, DINOv3 and PE ropes; transformers' DINOv3ViT,
ModernBERT, Qwen2-VL) has angles that are affine in the token's coordinates, ``angle = offset + sum_p coord_p *
freq_p``, per channel (and per head for mixed ropes). The finder reads ``freq`` and ``offset`` from the model's
own table at the original grid (the angle step between neighbouring grid positions) and checks that they
rebuild the whole table; the rewired site evaluates the same formula at the carried coordinates, so a merged
token's fractional position goes straight into the frequency formula (cos/sin are never averaged). A table that
is not affine in the raster-order coordinates, or whose angle step is too close to half a turn to tell its
frequency apart from an alias (a fractional position would then land on the wrong angle), is not rebuilt from
frequencies: its rows are gathered by the carried positions instead (``GatheredRotaryTable``), exact while
tokens are only pruned; the token pass refuses it after a method that merges.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

from ..export.precision import KEEP_FP32
from .graph import ancestors, is_add, is_shape_query, tensor_meta_shape
from .position_tables import PositionTable, register_finder
from .structure import AttentionSite, Structure

_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_ALIAS_LIMIT = 0.9 * math.pi  # an angle step beyond this is too close to aliasing to extend to fractions
_TABLE_ATOL = 2e-5


def rotary_angles(positions: torch.Tensor, freqs: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Angles ``offset + sum_p positions[..., p] * freqs[p]``: positions (B, n, P) already broadcast to the
    table's layout as (B, *lead, n, *trail, P) by the caller; ``freqs`` (P, *table) and ``offset`` (*table)
    have a token axis of size 1. The last P coordinates are the table's: a video tower's frame coordinate, carried
    first, has no frequency."""
    angles = offset.unsqueeze(0)
    first = positions.shape[-1] - freqs.shape[0]
    for p in range(freqs.shape[0]):
        angles = angles + positions[..., first + p] * freqs[p].unsqueeze(0)
    return angles


def positions_as_table(positions: torch.Tensor, start: int, stop_from_end: int, rank: int, token_axis: int) -> torch.Tensor:
    """Rows ``start : N - stop_from_end`` of positions (B, N, P) laid out as (B, ..., n, ..., P) with the token
    axis at ``token_axis`` (counted in a table of ``rank`` dims after the batch)."""
    rows = positions[:, start: positions.shape[1] - stop_from_end]
    shape = [rows.shape[0]] + [1] * rank + [rows.shape[2]]
    shape[1 + token_axis] = rows.shape[1]
    return rows.reshape(shape)


def protected_rows(table: torch.Tensor, rows: torch.Tensor, head: int, tail: int, token_axis: int) -> torch.Tensor:
    """``rows`` (B, ..., n, ...) with the model's own fixed rows of the protected tokens put back around them, in
    the table's dtype (rows computed in fp32 from fp32 positions, then cast as the model casts its table)."""
    rows = rows.to(table.dtype)
    parts = []
    length = table.shape[token_axis]
    batch = rows.shape[0]
    if head:
        parts.append(table.narrow(token_axis, 0, head).unsqueeze(0).expand(batch, *[-1] * table.dim()))
    parts.append(rows)
    if tail:
        parts.append(table.narrow(token_axis, length - tail, tail).unsqueeze(0).expand(batch, *[-1] * table.dim()))
    return torch.cat(parts, dim=1 + token_axis) if len(parts) > 1 else rows


def _token_axis(x_shape: tuple[int, ...], table: tuple[int, ...], tokens: int, structure: Structure) -> int | None:
    """The table's token axis: the axis (after the batch) where the activation and the table both hold the
    tokens, or the tokens after the protected prefix (heads first (B, H, N, d), tokens first (B, N, H, d) or
    (B, N, D)); None when no axis fits."""
    counts = {tokens, tokens - structure.prefix}
    rank = len(x_shape) - 1
    for axis in [rank - 2] + [a for a in range(rank - 1) if a != rank - 2]:
        if axis >= 0 and x_shape[1 + axis] == table[axis] and table[axis] in counts:
            return axis
    return None


@dataclass(eq=False)
class RotaryTable(PositionTable):
    """One rotary unit (``x * cos + rotate(x) * sin``) of a site, with the frequencies read from its table."""

    cos_node: fx.Node = field(default=None)  # type: ignore[assignment]
    sin_node: fx.Node = field(default=None)  # type: ignore[assignment]
    products: tuple[fx.Node, fx.Node] = ()  # type: ignore[assignment]  (x * cos, rotate(x) * sin)
    cos_value: torch.Tensor = field(default=None)  # type: ignore[assignment]
    sin_value: torch.Tensor = field(default=None)  # type: ignore[assignment]
    freqs: torch.Tensor = field(default=None)  # type: ignore[assignment]  (P, *table with token axis 1)
    offset: torch.Tensor = field(default=None)  # type: ignore[assignment]
    token_axis: int = 0
    first_row: int = 0  # the stream row of the table's first row
    sequence_first: bool = False  # the activation is (N, B, ...): the rebuilt (B, N, ...) table is transposed

    def rewire(self, gm: fx.GraphModule, positions: fx.Node, prefix: int, suffix: int) -> None:
        graph = gm.graph
        name = f"rotary_{self.site}_{self.cos_node.name}"
        # the frequencies stay fp32 in a half-precision file (angles of far positions need their bits); the fixed
        # rows are table values, in the model's dtype
        for suffix_name, value in (("freqs" + KEEP_FP32, self.freqs), ("offset" + KEEP_FP32, self.offset),
                                   ("cos", self.cos_value), ("sin", self.sin_value)):
            gm.register_buffer(f"{name}_{suffix_name}", value.clone())
        head = max(0, prefix - self.first_row)
        with graph.inserting_before(min(self.products, key=_order(graph))):
            freqs, offset, cos_fixed, sin_fixed = (graph.get_attr(f"{name}_{s}") for s in
                                                   ("freqs" + KEEP_FP32, "offset" + KEEP_FP32, "cos", "sin"))
            tables = []
            for fn, fixed in ((torch.cos, cos_fixed), (torch.sin, sin_fixed)):
                value = self._rows(graph, positions, fn, fixed, freqs, offset, head, suffix)
                table = graph.call_function(protected_rows, (fixed, value, head, suffix, self.token_axis))
                if self.sequence_first:
                    table = graph.call_function(torch.transpose, (table, 0, 1))
                tables.append(table)
        for product, old, new in zip(self.products, (self.cos_node, self.sin_node), tables):
            product.replace_input_with(old, new)

    def _rows(self, graph: fx.Graph, positions: fx.Node, fn: object, fixed: fx.Node, freqs: fx.Node,
              offset: fx.Node, head: int, suffix: int) -> fx.Node:
        """The cos (``fn``) or sin table rows of the unprotected tokens: evaluated at their carried coordinates."""
        rows = graph.call_function(positions_as_table, (positions, self.first_row + head, suffix,
                                                        self.cos_value.dim(), self.token_axis))
        return graph.call_function(fn, (graph.call_function(rotary_angles, (rows, freqs, offset)),))


def gathered_rows(table: torch.Tensor, positions: torch.Tensor, start: int, stop_from_end: int, head: int,
                  columns: int, token_axis: int) -> torch.Tensor:
    """Rows of a fixed table (token axis ``token_axis``) for the tokens ``start : N - stop_from_end`` of
    positions (B, N, P), each at its own original row: ``head`` + row * columns + column (or + index)."""
    rows = positions[:, start: positions.shape[1] - stop_from_end].round().long()
    index = rows[..., 0] * columns + rows[..., 1] if rows.shape[-1] == 2 else rows[..., -1]
    picked = table.movedim(token_axis, 0)[index + head]  # (B, n, rest of the table)
    return picked.movedim(1, 1 + token_axis)


@dataclass(eq=False)
class GatheredRotaryTable(RotaryTable):
    """A rotary table whose angles are not affine in the token's coordinates (no frequencies fit it): each pruned
    token reads its own original row, which is exact; a merged token has no row, so merging is refused."""

    exact_positions_only: ClassVar[bool] = True
    why_exact: ClassVar[str] = "its table is not a rotary function of the position (no frequencies rebuild it)"
    columns: int = 1  # the grid's width (row-major rows), 1 on a sequence

    def _rows(self, graph: fx.Graph, positions: fx.Node, fn: object, fixed: fx.Node, freqs: fx.Node,
              offset: fx.Node, head: int, suffix: int) -> fx.Node:
        return graph.call_function(gathered_rows, (fixed, positions, self.first_row + head, suffix, head,
                                                   self.columns, self.token_axis))


def _order(graph: fx.Graph):
    index = {node: i for i, node in enumerate(graph.nodes)}
    return lambda node: index[node]


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MUL) or (node.op == "call_method" and node.target == "mul")


def _is_fixed(node: fx.Node) -> bool:
    """Computed from parameters, buffers and constants only (shape reads of the input allowed)."""
    if node.op == "placeholder":
        return False
    return not any(n.op == "placeholder" for n in ancestors(node, through_shape_queries=False))


def _split(mul: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(activation, fixed table) of a product, or None."""
    a, b = (x for x in mul.args[:2]) if len(mul.args) >= 2 else (None, None)
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    if _is_fixed(b) and not _is_fixed(a):
        return a, b
    if _is_fixed(a) and not _is_fixed(b):
        return b, a
    return None


def _rotary_units(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node, tuple[fx.Node, fx.Node]]]:
    """(add, activation, cos node, sin node, the two products) for every ``x * cos + rotate(x) * sin``."""
    units = []
    for node in gm.graph.nodes:
        if not is_add(node) or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            continue
        a, b = node.args[:2]
        if not (_is_mul(a) and _is_mul(b)):
            continue
        first, second = _split(a), _split(b)
        if first is None or second is None:
            continue
        for (x, cos, m1), (rotated, sin, m2) in (((*first, a), (*second, b)), ((*second, b), (*first, a))):
            if x in ancestors(rotated) and x is not rotated:
                units.append((node, x, cos, sin, (m1, m2)))
                break
    return units


def _site_of(add: fx.Node, sites: list[AttentionSite]) -> AttentionSite | None:
    below: set[fx.Node] = set()
    stack = list(add.users)
    while stack:
        current = stack.pop()
        if current in below:
            continue
        below.add(current)
        for site in sites:
            if current is site.attention:
                return site
        stack.extend(current.users)
    return None


def _values(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values of fixed nodes: the graph run once on zeros of the recorded input shapes (they read shapes)."""
    wanted = set(nodes)
    found: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):  # noqa: ANN202
            result = super().run_node(n)
            if n in wanted:
                found[n] = result.detach().clone()
            return result

    args = []
    for placeholder in (n for n in gm.graph.nodes if n.op == "placeholder"):
        meta = placeholder.meta.get("tensor_meta") or placeholder.meta.get("val")
        if meta is not None and hasattr(meta, "shape"):
            args.append(torch.zeros(tuple(int(d) for d in meta.shape), dtype=meta.dtype))
        else:
            args.append(placeholder.args[0] if placeholder.args else None)
    with torch.no_grad():
        Recorder(gm).run(*args)
    return found


def _grid_positions(structure: Structure, rows: int) -> torch.Tensor | None:
    """Raster-order coordinates (rows, P) of the unprotected tokens: (row, column) on a 2-D grid, else the index."""
    grid = structure.grid
    if grid is not None and len(grid) == 2 and grid[0] * grid[1] == rows:
        r, c = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        return torch.stack([r.flatten(), c.flatten()], dim=-1).double()
    return torch.arange(rows).double().unsqueeze(-1)


def _fit(cos: torch.Tensor, sin: torch.Tensor, coords: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Frequencies (P, *table with the token axis 1) and offset with ``angle = offset + coords @ freqs``, read
    from the table and checked against all of it; None when the table is not of that form."""
    angles = torch.atan2(sin.double(), cos.double()).movedim(axis, 0)
    if not torch.allclose(cos.double() ** 2 + sin.double() ** 2, torch.ones((), dtype=torch.float64), atol=1e-4):
        return None
    origin = int(torch.nonzero((coords == 0).all(dim=1))[0]) if (coords == 0).all(dim=1).any() else None
    if origin is None:
        return None
    offset = angles[origin]
    freqs = []
    for p in range(coords.shape[1]):
        step = torch.zeros(coords.shape[1], dtype=coords.dtype)
        step[p] = 1
        neighbour = torch.nonzero((coords == step).all(dim=1))
        if len(neighbour) == 0:
            freqs.append(torch.zeros_like(offset))
            continue
        delta = angles[int(neighbour[0])] - offset
        freqs.append(torch.remainder(delta + math.pi, 2 * math.pi) - math.pi)
    freq = torch.stack(freqs)
    if freq.abs().max() > _ALIAS_LIMIT:
        return None
    shape = (-1,) + (1,) * (angles.dim() - 1)
    rebuilt = offset.unsqueeze(0) + sum(coords[:, p].reshape(shape) * freq[p].unsqueeze(0) for p in range(freq.shape[0]))
    # A float32 table of large angles (a long 1-D sequence) is off by the rounding of each angle: ulp(angle).
    tolerance = _TABLE_ATOL + 4 * torch.finfo(torch.float32).eps * rebuilt.abs()
    if not (((torch.cos(rebuilt) - cos.double().movedim(axis, 0)).abs() <= tolerance).all()
            and ((torch.sin(rebuilt) - sin.double().movedim(axis, 0)).abs() <= tolerance).all()):
        return None
    return freq.unsqueeze(1).movedim(1, 1 + axis).float(), offset.unsqueeze(0).movedim(0, axis).float()


@register_finder
def find_rotary_tables(gm: fx.GraphModule, structure: Structure) -> list[PositionTable]:
    """Every rotary unit feeding an attention site's queries or keys whose angles are affine in the raster-order
    coordinates of the tokens."""
    units = _rotary_units(gm)
    if not units:
        return []
    values = _values(gm, [n for unit in units for n in unit[2:4]])
    tables: list[PositionTable] = []
    for add, x, cos_node, sin_node, products in units:
        site = _site_of(add, structure.sites)
        cos, sin = values.get(cos_node), values.get(sin_node)
        if site is None or cos is None or sin is None or cos.shape != sin.shape:
            continue
        table = _table(site, structure, x, cos_node, sin_node, cos, sin)
        if table is not None:
            table.products = products
            tables.append(table)
    return tables


def _table(site: AttentionSite, structure: Structure, x: fx.Node, cos_node: fx.Node, sin_node: fx.Node,
           cos: torch.Tensor, sin: torch.Tensor) -> RotaryTable | None:
    """The table of one unit: its token axis (the activation's token axis, -2) and the stream rows it covers."""
    x_shape = tensor_meta_shape(x)
    tokens = site.num_tokens()
    if x_shape is None or len(x_shape) < 3:
        return None
    rank = len(x_shape) - 1  # the table's dims after the batch
    sequence_first = (cos.dim() == len(x_shape) and cos.shape[0] == x_shape[0] > 1 and cos.shape[1] == 1
                      and x_shape[0] in (tokens, tokens - structure.prefix))
    if sequence_first:  # (N, B, H, d) activations (wav2vec2-Conformer's): the table without its batch axis
        cos, sin, x_shape = cos.squeeze(1), sin.squeeze(1), (x_shape[1], x_shape[0], *x_shape[2:])
    while cos.dim() < rank:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.dim() == rank + 1:
        if cos.shape[0] != 1:
            return None  # a per-sample table: not a fixed layout
        cos, sin = cos[0], sin[0]
    if cos.dim() != rank:
        return None
    token_axis = _token_axis(x_shape, cos.shape, tokens, structure)
    if token_axis is None:
        return None
    rows = cos.shape[token_axis]
    first_row = tokens - rows
    if first_row not in (0, structure.prefix):
        return None
    head = max(0, structure.prefix - first_row)
    grid_rows = rows - head - structure.suffix  # the table ends at the stream's last row (a class token last)
    coords = _grid_positions(structure, grid_rows)
    fit = _fit(cos.narrow(token_axis, head, grid_rows), sin.narrow(token_axis, head, grid_rows), coords, token_axis)
    kind, extra = RotaryTable, {}
    if fit is None:  # not affine: gathered by the exact positions (pruning only)
        kind = GatheredRotaryTable
        grid = structure.grid
        extra = {"columns": grid[1] if grid is not None and len(grid) == 2 and grid[0] * grid[1] == grid_rows else 1}
        fit = (torch.zeros(1), torch.zeros(1))
    freqs, offset = fit
    return kind(site=site.index, kind="rotary position embedding", nodes=frozenset({cos_node, sin_node}),
                       cos_node=cos_node, sin_node=sin_node, cos_value=cos.float(), sin_value=sin.float(),
                       freqs=freqs, offset=offset, token_axis=token_axis, first_row=first_row,
                       sequence_first=sequence_first, **extra)

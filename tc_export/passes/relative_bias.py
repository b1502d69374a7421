"""Relative position biases (BEiT, Data2VecVision, timm relpos ViTs, T5): looked up by the carried positions.

Each of these models adds to its attention logits a fixed, learned (heads, N, N) tensor: entry (i, j) depends only
on where tokens i and j sat in the original sequence (their offset in the patch grid, an entry of its own for the
class token, or T5's bucket of the 1-D distance). However the model computes it (a table gathered by an index
buffer, an MLP over log-spaced offsets, a bucket function over ``arange``), the graph holds it materialised for the
original tokens. So one rule serves every family: after tokens move, the bias between current tokens i and j is
the original bias between the original tokens at their positions, ``bias[index(i), index(j)]``.

Pruned tokens carry their exact coordinates, so pruning is exact. A merged token carries the size-weighted mean
of its members' coordinates; a table has no entry between grid points, so each coordinate is rounded (half up) to
the nearest grid point (half up): the merged token is looked up where the centre of its members lies. The alternatives
(the destination token's own position, interpolating the table at the fractional offset, the size-weighted mean
of the members' biases, no bias) are measured in ``benchmarks/relative_bias_rules.py``.
Protected tokens (class, registers) are looked up by their index, as the model does.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import torch
from torch import Tensor, fx

from ..errors import StructureNotFoundError
from .graph import ancestors, is_add, node_kwarg, tensor_meta_shape
from .padding import learned_part
from .position_tables import PositionTable, register_finder
from .rewrite import write_out_biased_sdpa
from .structure import AttentionSite, Structure

KIND = "relative position bias"
# Round half up, and a mean within 1e-3 below a half counts as the half: a mean of integer positions is a half
# exactly or at least 1 / (2 * size) away from one, and backends differ in the last bit of mass / size (ONNX
# Runtime may multiply by the reciprocal), which must not move a token to another table entry.
HALF_UP = 0.5 + 1e-3


@dataclass(eq=False)
class RelativeBiasTable(PositionTable):
    """The materialised bias (…, N, N) read by one attention site, for ``tokens`` original tokens laid out as
    ``grid`` (the unprotected tokens' grid; ``None``: a 1-D sequence)."""

    bias: fx.Node
    tokens: int
    grid: tuple[int, ...] | None

    def rewire(self, gm: fx.GraphModule, positions: fx.Node, prefix: int, suffix: int) -> None:
        inner = self.tokens - prefix - suffix
        layout = self.grid or (inner,)
        if math.prod(layout) != inner:
            raise StructureNotFoundError(
                f"{KIND} at attention layer {self.site}: the bias covers {self.tokens} tokens, which are not "
                f"{prefix} protected + {suffix} trailing + a {'x'.join(map(str, layout))} grid, so the carried "
                "positions cannot look it up"
            )
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        live = ancestors(output)
        users = [user for user in self.bias.users if user in live]  # not a mask the padding logic replaced
        if not users:
            return
        with gm.graph.inserting_before(users[0]):
            gathered = gm.graph.call_function(relative_bias_at, (self.bias, positions, prefix, suffix, layout))
        for user in users:
            user.replace_input_with(self.bias, gathered)


def original_index(positions: Tensor, prefix: int, suffix: int, layout: tuple[int, ...], tokens: int) -> Tensor:
    """(B, n) index of each current token among the ``tokens`` original ones: protected rows by their place, the
    others at their carried coordinates rounded half up (merged tokens: the rounded size-weighted mean)."""
    batch, count, _ = positions.shape
    inner = positions[:, prefix:count - suffix, -len(layout):]  # a video tower's frame coordinate: not in the table
    flat = torch.zeros(inner.shape[:2], dtype=positions.dtype, device=positions.device)
    for axis, extent in enumerate(layout):
        coordinate = torch.floor(inner[..., axis] + HALF_UP)
        coordinate = torch.where(coordinate == coordinate, coordinate, 0.0)  # no NaN from a size-0 merge
        flat = flat * extent + coordinate.clamp(0, extent - 1)
    head = torch.arange(prefix, device=positions.device).expand(batch, prefix)
    tail = torch.arange(tokens - suffix, tokens, device=positions.device).expand(batch, suffix)
    return torch.cat([head, flat.long() + prefix, tail], dim=1)


def relative_bias_at(bias: Tensor, positions: Tensor, prefix: int, suffix: int, layout: tuple[int, ...]) -> Tensor:
    """The model's bias (…, N, N) between the current tokens, (B, heads, n, n), from their carried positions."""
    tokens = bias.shape[-1]
    index = original_index(positions, prefix, suffix, layout, tokens)
    pairs = index[:, :, None] * tokens + index[:, None, :]  # (B, n, n)
    return bias.reshape(-1, tokens * tokens)[:, pairs].transpose(0, 1)


@register_finder
def find_relative_biases(gm: fx.GraphModule, structure: Structure) -> list[PositionTable]:
    """A learned bias (…, N, N) computed from parameters alone that reaches a site's logits (its SDPA mask, or
    an add before its softmax), at every site."""
    tables: list[PositionTable] = []
    found = {site.index: _bias_of(gm, site) for site in structure.sites}
    for site in structure.sites:
        if found[site.index] is not None and found[site.index][0] is found[site.index][1]:
            write_out_biased_sdpa(site)  # the mask is the bias alone (T5's joins the padding mask later)
    readers: dict[fx.Node, list[AttentionSite]] = {}
    for site in structure.sites:
        if found[site.index] is not None:
            readers.setdefault(found[site.index][0], []).append(site)
    paths = {index: _mask_path(site, found[index]) for index, site in enumerate(structure.sites)}
    for bias, sites in readers.items():
        shape = tensor_meta_shape(bias)
        for site in sites:
            own = bias if len(sites) == 1 else _own_copy(gm, bias, site.index, paths)
            if own is None:
                continue  # shared past this site: stays refused by the position check
            tables.append(RelativeBiasTable(site.index, KIND, frozenset({own}), own, shape[-1], structure.grid))
    return tables


def _bias_of(gm: fx.GraphModule, site: AttentionSite) -> tuple[fx.Node, fx.Node] | None:
    """(the learned bias, the logit addend or mask it reaches the site through)."""
    tokens = (tensor_meta_shape(site.query) or (0, 0))[-2]
    if site.softmax is None:
        mask = node_kwarg(site.attention, "attn_mask", 3)
        candidates = [mask] if isinstance(mask, fx.Node) else []
    else:
        candidates = _logit_addends(site.softmax)
    found = {(b, node) for node in candidates if (b := learned_part(gm, node, tokens)) is not None}
    return found.pop() if len(found) == 1 else None


def _mask_path(site: AttentionSite, found: tuple[fx.Node, fx.Node] | None) -> set[fx.Node]:
    """The nodes between a site's bias and its logits (the attention itself included)."""
    if found is None:
        return {site.attention}
    return {site.attention, found[1], *ancestors(found[1])}


def _logit_addends(softmax: fx.Node) -> list[fx.Node]:
    """The tensors added to the logits on the way into ``softmax``."""
    addends, node = [], softmax.args[0]
    for _ in range(6):
        if not isinstance(node, fx.Node) or not is_add(node):
            break
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 2:
            break
        addends.append(tensors[1])
        node = tensors[0]
    return addends


def _own_copy(gm: fx.GraphModule, bias: fx.Node, site: int, paths: dict[int, set[fx.Node]]) -> fx.Node | None:
    """A per-site alias of a bias several sites read (T5 computes it once): this site's reads go through it, so
    each site can look the bias up at its own tokens."""
    mine = [user for user in bias.users if user in paths[site]]
    if not mine or any(user in path for user in mine for other, path in paths.items() if other != site):
        return None
    with gm.graph.inserting_after(bias):
        own = gm.graph.call_function(torch.Tensor.contiguous, (bias,))
    own.meta = dict(bias.meta)
    for user in mine:
        user.replace_input_with(bias, own)
    return own

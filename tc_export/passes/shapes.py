"""Re-deriving baked-in token counts after a pass changed the number of tokens mid-graph.

``torch.export`` graphs carry shapes as constants (``view(x, [1, 197, -1, 64])``); once a merge makes 181 tokens
of 197, every later shape argument that spelled 197 must spell 181. This walks the graph with real tensors;
wherever a shape op's input no longer has the shape recorded before the pass, its shape argument is re-derived
from the new input shape. ``torch.fx.symbolic_trace`` graphs read shapes from
tensors at run time and pass through untouched. A view whose input is no longer contiguous becomes a reshape.
A ``split_with_sizes`` along a changed dim (DINOv3ViT splits its class and register tokens off the patches before
its rotary) gives the change to its largest recorded part, the compressible tokens: the parts it peels off are
protected tokens, which no token op adds or removes.

The map is positional, not by value (a head dimension of 32 and 32 tokens must not be confused): a view's input
and output dims are paired into runs of equal product, and a changed input dim changes the output dim of its run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from ..errors import StructureNotFoundError

_RESHAPE_METHODS = ("view", "reshape")
WINDOW_FOLD = "tc_export_window_fold"  # node meta: a reshape folding declared attention windows (token pass)
_SHAPE_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
}


def _recorded_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _groups(old_in: tuple[int, ...], old_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product, as a view/reshape maps them.

    Size-1 dims are left out (they pair with anything); the smallest runs are taken, so a dim that keeps its
    size in the view pairs with itself alone.
    """
    ins = [i for i, d in enumerate(old_in) if d != 1]
    outs = [j for j, d in enumerate(old_out) if d != 1]
    groups, a, b = [], 0, 0
    while a < len(ins) and b < len(outs):
        group_in, group_out = [ins[a]], [outs[b]]
        p_in, p_out = old_in[ins[a]], old_out[outs[b]]
        a, b = a + 1, b + 1
        while p_in != p_out:
            if p_in < p_out and a < len(ins):
                group_in.append(ins[a])
                p_in *= old_in[ins[a]]
                a += 1
            elif p_out < p_in and b < len(outs):
                group_out.append(outs[b])
                p_out *= old_out[outs[b]]
                b += 1
            else:
                return None
        groups.append((group_in, group_out))
    return groups if a == len(ins) and b == len(outs) else None


def _new_view_shape(shape: list, old_in: tuple[int, ...], new_in: tuple[int, ...], old_out: tuple[int, ...]) -> list:
    """The view/reshape argument for the new input: each changed input dim changes the output dim it maps to."""
    groups = _groups(old_in, old_out)
    if groups is None or len(shape) != len(old_out):
        return shape
    updated = list(shape)
    for ins, outs in groups:
        if all(old_in[i] == new_in[i] for i in ins):
            continue
        if len(outs) != 1 or not isinstance(shape[outs[0]], int) or shape[outs[0]] == -1:
            continue  # the group's -1 (or a symbol) absorbs the change
        product = 1
        for i in ins:
            product *= new_in[i]
        updated[outs[0]] = product
    return updated


class _Retargeter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.changed = 0

    def run_node(self, node: fx.Node) -> Any:
        if (node.op == "call_function" and node.target in _SHAPE_OPS and node.target
                is not torch.ops.aten.expand.default) or (node.op == "call_method" and node.target in _RESHAPE_METHODS) \
                or (node.op == "call_function" and node.target is torch.reshape):
            self._refuse_grid_split(node)
        if node.op == "call_function" and node.target in _SHAPE_OPS and len(node.args) >= 2:
            self._retarget(node)
            self._view_to_reshape(node)
        if node.op == "call_function" and node.target is torch.ops.aten.split_with_sizes.default:
            self._retarget_split(node)
        return super().run_node(node)

    def _retarget_split(self, node: fx.Node) -> None:
        """``split_with_sizes(x, sizes, dim)`` on a dim that changed: the largest recorded part takes the change."""
        source, sizes = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        old = _recorded_shape(source)
        value = self.env.get(source) if isinstance(source, fx.Node) else None
        if old is None or not isinstance(value, torch.Tensor) or len(value.shape) != len(old) \
                or not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) for s in sizes):
            return
        delta = int(value.shape[dim]) - old[dim]
        largest = max(sizes)
        if delta == 0 or sum(sizes) != old[dim] or list(sizes).count(largest) != 1 or largest + delta < 0:
            return
        updated = [s + delta if s == largest else s for s in sizes]
        node.args = (source, updated, *node.args[2:])
        self.changed += 1

    def _refuse_grid_split(self, node: fx.Node) -> None:
        """A view/reshape that splits a dim whose size changed (the tokens) into several dims (a grid, as PiT's
        stages reshape their tokens back to the (H, W) grid they read) cannot hold merged or pruned tokens: refused
        by name. Splitting off the batch (``(B * N, C) -> (B, N, C)``) is not a grid, nor are declared attention
        windows folded into or out of the heads (``WINDOW_FOLD``: every window keeps the same count of tokens)."""
        if node.meta.get(WINDOW_FOLD):
            return
        source = node.args[0] if node.args else None
        old, old_out = _recorded_shape(source), _recorded_shape(node)
        value = self.env.get(source) if isinstance(source, fx.Node) else None
        if old is None or old_out is None or not isinstance(value, torch.Tensor) or tuple(value.shape) == old \
                or value.dim() != len(old):
            return
        for ins, outs in _groups(old, old_out) or []:
            if len(outs) >= 2 and min(outs) > 0 and any(old[i] != value.shape[i] for i in ins):
                grid = " x ".join(str(old_out[j]) for j in outs)
                tokens = " x ".join(str(old[i]) for i in ins)
                raise StructureNotFoundError(
                    f"{node.name} reshapes the compressed tokens back to the {grid} grid of the {tokens} tokens it "
                    f"read (now {' x '.join(str(int(value.shape[i])) for i in ins)}), as PiT's pooling stages do: "
                    "merged or pruned tokens have no grid, so no token op can run in a stage that ends in such a "
                    "reshape"
                )

    def _view_to_reshape(self, node: fx.Node) -> None:
        """A view whose input lost the memory layout it relied on becomes a reshape (same values; it may copy).

        An attention that now takes a bias may run another SDPA kernel whose output has other strides, so a
        ``permute`` + ``view`` the original trace could do without ``contiguous`` no longer can."""
        value = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if node.target is torch.ops.aten.view.default and isinstance(value, torch.Tensor) \
                and not value.is_contiguous():
            node.target = torch.ops.aten.reshape.default
            self.changed += 1

    def _resized_symbols(self, node: fx.Node, shape: list, old: tuple[int, ...], new: tuple[int, ...],
                         old_out: tuple[int, ...], value: torch.Tensor) -> list:
        """A symbolic entry (a dynamic batch ``s0 * T``) of a view whose input dim it stands for changed size (an op
        that joins a clip's frames into one row): read that dim from the new input instead."""
        groups = _groups(old, old_out)
        if groups is None or len(shape) != len(old_out):
            return shape
        for ins, outs in groups:
            if len(ins) == 1 and len(outs) == 1 and isinstance(shape[outs[0]], fx.Node) \
                    and old[ins[0]] != new[ins[0]]:
                with node.graph.inserting_before(node):
                    size = node.graph.call_function(torch.ops.aten.sym_size.int, (node.args[0], ins[0]))
                self.env[size] = int(value.shape[ins[0]])
                shape[outs[0]] = size
        return shape

    def _retarget(self, node: fx.Node) -> None:
        source, shape = node.args[0], node.args[1]
        old, old_out = _recorded_shape(source), _recorded_shape(node)
        value = self.env.get(source) if isinstance(source, fx.Node) else None
        if old is None or old_out is None or not isinstance(value, torch.Tensor) or tuple(value.shape) == old:
            return
        new = tuple(value.shape)
        if len(new) != len(old) or not isinstance(shape, (list, tuple)):
            return
        if node.target is torch.ops.aten.expand.default:
            offset = len(shape) - len(old)
            updated = list(shape)
            for d, (o, n) in enumerate(zip(old, new)):
                if o != n and isinstance(shape[offset + d], int) and shape[offset + d] == o:
                    updated[offset + d] = n
        else:
            updated = self._resized_symbols(node, list(shape), old, new, old_out, value)
            updated = _new_view_shape(updated, old, new, old_out)
        if updated != list(shape):
            node.args = (source, updated, *node.args[2:])
            self.changed += 1


def retarget_token_dims(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> int:
    """Rewrite stale token counts in shape arguments; returns how many ops changed (0 for symbolic graphs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [example_inputs.get(str(n.target), n.args[0] if n.args else None) for n in placeholders]
    retargeter = _Retargeter(gm)
    with torch.no_grad():
        try:
            retargeter.run(*args)
        except StructureNotFoundError as error:  # fx's interpreter appended the node and its trace: one line
            raise StructureNotFoundError(str(error).strip().splitlines()[0]) from None
    if retargeter.changed:
        gm.recompile()
    return retargeter.changed

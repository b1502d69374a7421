"""Pooling after compression: a mean over tokens becomes the size-weighted mean; positional reads are checked.

The published ToMe code pools its MAE models by ``sum(x * size) / sum(size)``: a merged token stands for several
original ones. Positional pooling (``x[:, 0]``, ``x[:, prefix:]``) stays right only for the protected prefix,
which every method keeps first and in order; a read of any other position (``x[:, -1]``, an EOS token) would pick
whatever token merging or pruning moved there, so it is refused.
"""

from __future__ import annotations

import operator
import sys

import torch
from torch import fx

from ..errors import StructureNotFoundError
from ..ops.tokens import is_weighted_mean
from .graph import data_inputs, descendants, tensor_meta_shape

aten = torch.ops.aten
_BIG = sys.maxsize // 2


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """sum(x * size) / sum(size) over the token axis of (B, N, C) tokens with sizes (B, N, 1)."""
    size = size.to(x.dtype)
    return (x * size).sum(dim=1, keepdim=keepdim) / size.sum(dim=1, keepdim=keepdim)


def slice_tokens(size: torch.Tensor, start: int | None, stop: int | None) -> torch.Tensor:
    return size[:, start:stop]


def _dims(value: object) -> list[int] | None:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def token_access(node: fx.Node) -> tuple | None:
    """How ``node`` reads the token axis (dim 1) of a 3-D tensor: ("mean", keepdim), ("index", i),
    ("slice", start, stop), ("other", what) for another reduction over tokens, or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    shape = tensor_meta_shape(node.args[0])
    if shape is None or len(shape) != 3:
        return None
    target, args, kwargs = node.target, node.args, node.kwargs
    name = target if node.op == "call_method" else getattr(target, "__name__", str(target))
    if node.op in ("call_method", "call_function") and name in ("mean", "mean.dim", "sum", "sum.dim_IntList",
                                                               "amax", "amax.default", "max", "max.dim"):
        dims = _dims(kwargs.get("dim", args[1] if len(args) > 1 else None))
        if dims is None or not any(d in (1, -2) for d in dims):
            return None
        keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
        kind = name.split(".")[0]
        if kind == "mean" and dims in ([1], [-2]):
            return ("mean", keepdim)
        return ("other", kind) if kind == "sum" else None  # max pooling needs no sizes
    if node.op == "call_function" and target is operator.getitem and isinstance(args[1], tuple) and len(args[1]) >= 2:
        first, second = args[1][0], args[1][1]
        if not (isinstance(first, slice) and first == slice(None)):
            return None
        if isinstance(second, int):
            return ("index", second)
        if isinstance(second, slice) and second.step in (None, 1):
            return ("slice", second.start, second.stop)
        return None
    if node.op == "call_function" and target is aten.select.int and args[1] in (1, -2):
        return ("index", args[2])
    if node.op == "call_function" and target is aten.slice.Tensor and len(args) > 1 and args[1] in (1, -2):
        start = args[2] if len(args) > 2 else None
        stop = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        return ("slice", start, stop) if step == 1 else ("other", "strided slice")
    return None


def _positional_ok(access: tuple, tokens: int, protected: int, suffix: int = 0) -> bool:
    """A read of the protected prefix, of the protected suffix, or of everything after the prefix survives any
    method (every method keeps both protected ends in place)."""
    if access[0] == "index":
        index = access[1] + tokens if access[1] < 0 else access[1]
        return 0 <= index < protected or tokens - suffix <= index < tokens
    start = access[1] or 0
    start = start + tokens if start < 0 else start
    stop = tokens if access[2] is None or access[2] >= _BIG else access[2]
    stop = stop + tokens if stop < 0 else stop
    return (start == 0 and stop <= protected) or (start == protected and stop >= tokens) \
        or (suffix > 0 and start >= tokens - suffix and stop <= tokens) \
        or (suffix > 0 and start == protected and stop == tokens - suffix)


def follow_pooling(gm: fx.GraphModule, last_op: fx.Node, size: fx.Node, protected: int,
                   padding: fx.Node | None, tokens_before: int, suffix: int = 0) -> None:
    """Point every mean over tokens after ``last_op`` at the sizes; refuse positional reads that moved.

    Only reads of the token stream count: a tensor whose token axis had ``tokens_before`` tokens (or that many
    less the protected prefix) before the pass; an attention-pooling head's latent, say, is not one.
    """
    graph = gm.graph
    below = descendants(last_op)
    for node in list(graph.nodes):
        if node not in below or is_weighted_mean(node):
            continue
        access = token_access(node)
        if access is None:
            continue
        source = node.args[0]
        tokens = tensor_meta_shape(source)[1]  # type: ignore[index]
        if tokens not in (tokens_before, tokens_before - protected):
            continue
        if access[0] in ("index", "slice"):
            if not _positional_ok(access, tokens, protected, suffix):
                what = f"token {access[1]}" if access[0] == "index" else f"tokens {access[1]}:{access[2]}"
                leading = access[0] == "index" and 0 <= access[1] < tokens
                hint = (f"--protected {access[1] + 1} keeps the first {access[1] + 1} in place (a [CLS] from the "
                        "input ids, say)" if leading else "protect it with --protected N")
                raise StructureNotFoundError(
                    f"the model reads {what} of the sequence at {node.name} (pooling by position), but the methods "
                    f"move tokens: only the {protected} protected leading tokens"
                    + (f" and the {suffix} protected trailing tokens" if suffix else "")
                    + f" keep their place. {hint[0].upper()}"
                    f"{hint[1:]}, or export without compression after that layer"
                )
            continue
        if access[0] == "other":
            raise StructureNotFoundError(
                f"the model reduces over tokens with {access[1]} at {node.name}; merged tokens stand for several "
                "original ones, and only a mean (made size-weighted) or max pooling follows them"
            )
        if padding is not None:
            raise StructureNotFoundError(
                f"the model averages over all tokens at {node.name}, padding included; pool with the mask instead"
            )
        weights = _aligned_sizes(graph, source, size, below)
        with graph.inserting_before(node):
            pooled = graph.call_function(size_weighted_mean, (source, weights, access[1]))
        node.replace_all_uses_with(pooled)
        graph.erase_node(node)


def _aligned_sizes(graph: fx.Graph, source: fx.Node, size: fx.Node, below: set[fx.Node]) -> fx.Node:
    """``size`` cut the way ``source`` was cut from the token stream (e.g. ``x[:, prefix:]``)."""
    slices = []
    node = source
    while node in below:
        access = token_access(node)
        if access is not None and access[0] == "slice":
            slices.append((access[1], access[2]))
        inputs = data_inputs(node)
        if len(inputs) != 1:
            break
        node = inputs[0]
    weights = size
    for start, stop in reversed(slices):
        with graph.inserting_after(weights):
            weights = graph.call_function(slice_tokens, (weights, start, None if stop is not None and stop >= _BIG else stop))
    return weights

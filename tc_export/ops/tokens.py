"""Size-aware pooling that survives tracing as one node, so a pass can point it at the final token sizes.

``weighted_mean(x, weights)`` is a ``torch.library`` custom op: ``torch.export`` and ``torch.fx`` both keep it
as a single call, where a plain function would be inlined into anonymous arithmetic on the original token
count. Model wrappers pool with it (weights: the attention mask); the token pass re-points its weights to the
sizes after the last compression; ``lower_custom_ops`` swaps it for plain ops before ONNX export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, fx


@torch.library.custom_op("tc_export::weighted_mean", mutates_args=())
def weighted_mean(x: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``x`` (B, N, C) over tokens weighted by ``weights`` (B, N) or (B, N, 1); zero weights drop out."""
    return weighted_mean_plain(x, weights)


@weighted_mean.register_fake
def _(x: Tensor, weights: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[2])


def weighted_mean_plain(x: Tensor, weights: Tensor) -> Tensor:
    weights = weights.to(x.dtype)
    if weights.dim() == 2:
        weights = weights.unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


_TRACEABLE = [True]


def pool_mean(x: Tensor, weights: Tensor) -> Tensor:
    """What model wrappers call: the custom op while tracing for passes, plain ops inside ``plain_ops()``."""
    return weighted_mean(x, weights) if _TRACEABLE[0] else weighted_mean_plain(x, weights)


@contextmanager
def plain_ops() -> Iterator[None]:
    """Within this block ``pool_mean`` traces as plain ops (ONNX export of an uncompressed wrapper)."""
    _TRACEABLE[0] = False
    try:
        yield
    finally:
        _TRACEABLE[0] = True


def is_weighted_mean(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.tc_export.weighted_mean.default, weighted_mean)


def lower_custom_ops(module: torch.nn.Module) -> torch.nn.Module:
    """Replace this package's custom ops in a GraphModule by their plain-op implementations (for export)."""
    if not isinstance(module, fx.GraphModule):
        return module
    changed = False
    for node in module.graph.nodes:
        if is_weighted_mean(node):
            node.target = weighted_mean_plain
            changed = True
    if changed:
        module.recompile()
    return module

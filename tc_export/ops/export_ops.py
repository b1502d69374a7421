"""One custom op that stands for a ``TokenOp`` call during ONNX export, so each site exports as a single node.

``torch.export`` inlines a module call into anonymous ATen ops; ``tc_export::token_op`` keeps it whole. Its ``key``
names the op instance in a registry filled only while an export runs (``registered_sites``); the ONNX side
translates the call into a node of the op's own type (``tc_export.export.functions``). The size input is always
a tensor here: a site whose size is None (all tokens of size 1) gets explicit ones, which every op treats exactly
like None, so one function signature serves every site.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, fx

from .base import TokenOp

_SITES: dict[str, TokenOp] = {}


def _run(x: Tensor, size: Tensor, signals: list[Tensor], key: str) -> tuple[Tensor, Tensor]:
    out_x, out_size = _SITES[key](x, size, *signals)
    if out_size is None:  # an op that never creates sizes only drops None; sizes came in, so pass them on
        out_size = size
    # Custom op outputs may not alias inputs (an op with nothing to do returns its input).
    return (out_x.clone() if out_x is x else out_x), (out_size.clone() if out_size is size else out_size)


@torch.library.custom_op("tc_export::token_op", mutates_args=())
def token_op(x: Tensor, size: Tensor, signals: list[Tensor], key: str) -> tuple[Tensor, Tensor]:
    """Run the registered op ``key`` on ``(x, size, *signals)``; returns ``(x, size)``."""
    return _run(x, size, signals, key)


@token_op.register_fake
def _(x: Tensor, size: Tensor, signals: list[Tensor], key: str) -> tuple[Tensor, Tensor]:
    return _run(x, size, signals, key)


def unit_sizes(x: Tensor) -> Tensor:
    """Sizes of a token stream whose tokens all stand for one token: ones of shape (B, N, 1)."""
    return x.new_ones(x.shape[0], x.shape[1], 1)


@contextmanager
def registered_sites(sites: Mapping[str, TokenOp]) -> Iterator[None]:
    """Make ``sites`` (key -> op) callable through ``token_op`` for the duration of the block."""
    _SITES.update(sites)
    try:
        yield
    finally:
        for key in sites:
            _SITES.pop(key, None)


def calls_as_custom_ops(gm: fx.GraphModule, keys: Mapping[str, str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules whose ``call_module`` sites named in ``keys`` call ``token_op``.

    ``keys`` maps a submodule name to its registry key. ``gm`` itself is left unchanged.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in keys:
            stream, size, *signals = (env[arg] if isinstance(arg, fx.Node) else arg for arg in node.args)
            if size is None:
                size = graph.call_function(unit_sizes, (stream,))
            arguments = (stream, size, list(signals), keys[node.target])
            call = graph.call_function(torch.ops.tc_export.token_op.default, arguments)
            call.meta = dict(node.meta)
            env[node] = call
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return fx.GraphModule(gm, graph)


def is_token_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (token_op, torch.ops.tc_export.token_op.default)


__all__ = ["calls_as_custom_ops", "is_token_call", "registered_sites", "token_op", "unit_sizes"]

"""Scatter-free ONNX translations of ``slice_scatter`` / ``select_scatter``, for shape-generic function bodies.

An op that writes into a fresh mask (``mask[i, :] = -inf``) traces to a slice or select scatter. With static
shapes the exporter folds it to a constant; in a body exported with symbolic shapes it stays and becomes
ScatterElements / ScatterND. These translations write it as ``Where(position in slice, src, self)`` instead
(Range, comparisons, Gather, Where: all parsed natively by TensorRT, no scatter layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnxscript import opset18 as op


def _scalar(value):  # noqa: ANN001, ANN202 - a Python int or a symbolic int64 scalar
    return op.Constant(value_int=value) if isinstance(value, int) else value


def _positions(x, dim: int):  # noqa: ANN001, ANN202
    """0..n-1 along ``dim`` of ``x``, shaped to broadcast against ``x``; and n."""
    n = op.Gather(op.Shape(x), op.Constant(value_int=dim))
    positions = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))
    rank = len(x.shape)
    others = [axis for axis in range(rank) if axis != dim % rank]
    return (op.Unsqueeze(positions, op.Constant(value_ints=others)) if others else positions), n


def _wrap(index, n):  # noqa: ANN001, ANN202 - a negative index counts from the end
    return op.Where(op.Less(index, op.Constant(value_int=0)), op.Add(index, n), index)


def select_scatter(self, src, dim: int, index):  # noqa: ANN001, ANN201
    positions, n = _positions(self, dim)
    chosen = op.Equal(positions, _wrap(_scalar(index), n))
    return op.Where(chosen, op.Unsqueeze(src, op.Constant(value_ints=[dim])), self)


def slice_scatter(self, src, dim: int = 0, start=None, end=None, step: int = 1):  # noqa: ANN001, ANN201
    positions, n = _positions(self, dim)
    first = _wrap(op.Constant(value_int=0) if start is None else _scalar(start), n)
    stop = n if end is None else _wrap(op.Min(_scalar(end), n), n)
    stride = _scalar(step)
    offset = op.Sub(positions, first)
    inside = op.And(op.GreaterOrEqual(positions, first), op.Less(positions, stop))
    inside = op.And(inside, op.Equal(op.Mod(offset, stride), op.Constant(value_int=0)))
    last = op.Sub(op.Gather(op.Shape(src), op.Constant(value_int=dim)), op.Constant(value_int=1))
    row = op.Max(op.Min(op.Div(offset, stride), last), op.Constant(value_int=0))
    taken = op.Gather(src, op.Reshape(row, op.Constant(value_ints=[-1])), axis=dim % len(self.shape))
    return op.Where(inside, taken, self)


def scatter_free_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` entries for ``torch.onnx.export``."""
    return {torch.ops.aten.select_scatter.default: select_scatter, torch.ops.aten.slice_scatter.default: slice_scatter}

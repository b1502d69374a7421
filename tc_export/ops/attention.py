"""Attention with an additive bias, written out (no fused kernel).

Used where a pass adds a bias (proportional attention, a padding mask) to an attention that was a
``scaled_dot_product_attention`` call: the exporter's handling of SDPA with a float mask records strides that
its own decomposition later contradicts, and the written-out form exports to the same MatMul/Softmax ops.
"""

from __future__ import annotations

import torch
from torch import Tensor


def biased_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(scale * q k^T + bias) v for (..., N, d) queries, keys and values."""
    logits = (query * scale) @ key.transpose(-2, -1)
    return torch.softmax(logits + bias, dim=-1) @ value

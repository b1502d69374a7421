"""Multiply-accumulate counts of a PyTorch forward (matmuls, linears, convolutions, attention)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_macs(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """MACs of one forward, counted by PyTorch's FlopCounterMode (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    # The math backend writes SDPA out as matmuls, so attention is counted like any explicit attention.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        module(**inputs)
    return counter.get_total_flops() // 2

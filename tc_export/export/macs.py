"""Multiply-accumulate counts of a PyTorch forward (matmuls, linears, convolutions, attention)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_macs(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """MACs of one forward, counted by PyTorch's FlopCounterMode (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    # The counter's module tracker hooks the gradients of module inputs; a parameter viewed inside a forward (an
    # attention-pooling head's expanded latent) then fails under no_grad, so parameters stop asking for gradients.
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for parameter, _ in grads:
            parameter.requires_grad_(False)
        # The math backend writes SDPA out as matmuls, so attention is counted like any explicit attention.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            module(**inputs)
    finally:
        for parameter, wanted in grads:
            parameter.requires_grad_(wanted)
    return counter.get_total_flops() // 2

"""Multiply-accumulate counts of a PyTorch forward (matmuls, linears, convolutions, attention)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten
# The CPU kernel of scaled_dot_product_attention has no formula of its own: counted as the other SDPA kernels are
# (q k^T and probs @ v), so attention is counted like any explicit attention. Forcing the math backend instead
# changes the output's memory layout, which a traced graph's views were recorded against (Data2VecVision).


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_macs(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """MACs of one forward, counted by PyTorch's FlopCounterMode (FLOPs / 2)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    # The counter's module tracker hooks the gradients of module inputs; a parameter viewed inside a forward (an
    # attention-pooling head's expanded latent) then fails under no_grad, so parameters stop asking for gradients.
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for parameter, _ in grads:
            parameter.requires_grad_(False)
        with torch.no_grad(), counter:
            module(**inputs)
    finally:
        for parameter, wanted in grads:
            parameter.requires_grad_(wanted)
    return counter.get_total_flops() // 2

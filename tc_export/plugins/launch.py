"""Launch parameters for the plugin kernels, and host wrappers that run them on torch tensors.

The parameters are pure Python (no Triton import): the grid, warps and compile-time block sizes follow from the
input shape and the op's settings alone. Shared memory is what the compiler reports, so it comes from
``aot.compile_kernel`` (``CompiledKernel.shared_mem``), not from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError

# Blocks are powers of two >= 16 (but ToMe's BLOCK_J); the score/rank tiles are at most MAX_TILE columns wide
# (looped over the rest).
MIN_BLOCK = 16
MAX_TILE = 64
MAX_BLOCK_C = 64
# ToMe holds every A row of a sample in registers (BLOCK_A = N/2 rounded up to a power of two, 16 warps from 256
# rows) and works on (BLOCK_A, BLOCK_J) tiles of at most MAX_TILE_ELEMENTS: BLOCK_J narrows as the rows grow (64
# up to 128 A rows, 4 at 2,048), which keeps ptxas from spilling registers (a 16,384-element tile spills ~800
# bytes a thread at 4,096 tokens). Up to 4,096 tokens (e.g. an 896 x 896 image at patch 14).
MAX_TILE_ELEMENTS = 128 * MAX_TILE
MAX_TOME_TOKENS = 4096
# Top-K loops over tiles of at most MAX_TOPK_ROWS tokens: up to 4,096 tokens.
MAX_TOPK_ROWS = 256
MAX_TOPK_TOKENS = 4096
# Tokens each plugin kernel takes (TensorRT plugin name -> limit), as the lint states them.
PLUGIN_TOKEN_LIMITS = {"ToMeMerge": MAX_TOME_TOKENS, "TopKSelect": MAX_TOPK_TOKENS}


def next_pow2(value: int) -> int:
    """Smallest power of two >= ``value`` (1 for values <= 1)."""
    return 1 << max(0, value - 1).bit_length()


def _block(value: int, cap: int | None = None) -> int:
    size = max(MIN_BLOCK, next_pow2(value))
    return size if cap is None else min(size, cap)


@dataclass(frozen=True)
class LaunchParams:
    """How to launch one plugin kernel for one input shape: a (B, 1, 1) grid of ``num_warps * 32``-thread blocks.

    ``constexprs`` are the kernel's compile-time arguments (shapes, settings, block sizes); ``out_tokens`` is
    the output's token count.
    """

    grid: tuple[int, int, int]
    num_warps: int
    constexprs: Mapping[str, int] = field(default_factory=dict)
    out_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "constexprs", MappingProxyType(dict(self.constexprs)))

    @property
    def block(self) -> tuple[int, int, int]:
        """Threads per block (TensorRT's ``block_x``): Triton's warps times 32."""
        return (self.num_warps * 32, 1, 1)


def effective_r(num_tokens: int, r: int, protected: int) -> int:
    """Merges performed: ``r`` capped at half the unprotected tokens (as ``tc_export.ops.tome.effective_r``)."""
    return max(0, min(r, (num_tokens - protected) // 2))


def _check_common(batch: int, num_tokens: int, channels: int, protected: int) -> None:
    if batch < 1 or num_tokens < 1 or channels < 1:
        raise ConfigError(f"plugin input shape ({batch}, {num_tokens}, {channels}) must be all positive")
    if not 0 <= protected <= num_tokens:
        raise ConfigError(f"protected={protected} must be between 0 and the token count {num_tokens}")


def tome_merge_launch(
    batch: int, num_tokens: int, channels: int, metric_dim: int, r: int, protected: int, padded: bool = False,
    state: int = 1,
) -> LaunchParams:
    """Launch parameters of ``tome_merge_kernel`` for x (B, N, C), metric (B, N, d), a state (B, N, ``state``)."""
    _check_common(batch, num_tokens, channels, protected)
    if r < 0 or metric_dim < 1:
        raise ConfigError(f"ToMeMerge needs r >= 0 and a metric width >= 1 (got r={r}, d={metric_dim})")
    if num_tokens > MAX_TOME_TOKENS:
        raise ConfigError(
            f"the ToMeMerge kernel takes at most {MAX_TOME_TOKENS} tokens (got {num_tokens}); "
            "use the function body (--plugins off) for this layer"
        )
    merges = effective_r(num_tokens, r, protected)
    block_a = _block((num_tokens + 1) // 2)
    block_b = _block(num_tokens // 2, MAX_TILE)
    constexprs = {
        "N": num_tokens,
        "C": channels,
        "D": metric_dim,
        "R": merges,
        "PROTECTED": protected,
        "PADDED": int(padded),
        "S": state,
        "BLOCK_A": block_a,
        "BLOCK_J": min(block_b, MAX_TILE_ELEMENTS // block_a),
        "BLOCK_B": block_b,
        "BLOCK_C": _block(channels, MAX_BLOCK_C),
    }
    # Warps by the A rows held: 4 up to 64 rows, 8 up to 128, 16 from 256 (at most 4 rows per thread at 2,048).
    return LaunchParams((batch, 1, 1), _warps(block_a * block_a), constexprs, num_tokens - merges)


def topk_select_launch(
    batch: int, num_tokens: int, channels: int, keep: int, protected: int, fuse: bool = False, keep_order: bool = False,
    state: int = 1,
) -> LaunchParams:
    """Launch parameters of ``topk_select_kernel`` for x (B, N, C), class attention (B, N), a state (B, N, ``state``)."""
    _check_common(batch, num_tokens, channels, protected)
    if not 1 <= keep <= num_tokens - protected:
        raise ConfigError(
            f"TopKSelect keep={keep} must be between 1 and the {num_tokens - protected} unprotected tokens"
        )
    if num_tokens > MAX_TOPK_TOKENS:
        raise ConfigError(f"the TopKSelect kernel takes at most {MAX_TOPK_TOKENS} tokens (got {num_tokens})")
    block_n = _block(num_tokens, MAX_TOPK_ROWS)
    block_k = _block(num_tokens, MAX_TILE)
    block_c = _block(channels, MAX_BLOCK_C)
    constexprs = {
        "N": num_tokens,
        "C": channels,
        "KEEP": keep,
        "PROTECTED": protected,
        "FUSE": int(fuse),
        "KEEP_ORDER": int(keep_order),
        "S": state,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "BLOCK_C": block_c,
    }
    out_tokens = protected + keep + int(fuse)
    return LaunchParams((batch, 1, 1), _warps(block_n * max(block_k, block_c)), constexprs, out_tokens)


def _warps(tile_elements: int) -> int:
    """4 warps for tiles up to 64x64 elements, 8 up to 128x128, else 16 (at most 32 tile elements per thread)."""
    if tile_elements <= 64 * 64:
        return 4
    return 8 if tile_elements <= 128 * 128 else 16


# Host wrappers: run the kernels on torch tensors (CPU tensors need TRITON_INTERPRET=1 set before importing triton).


def tome_merge_triton(
    x: Tensor, size: Tensor, metric: Tensor, r: int, protected: int, padded: bool = False
) -> tuple[Tensor, Tensor]:
    """(x (B, N, C), state (B, N, S), metric (B, N, d)) -> (x', state') with ``tome_merge_kernel``."""
    from .kernels import tome_merge_kernel

    batch, num_tokens, channels = x.shape
    params = tome_merge_launch(batch, num_tokens, channels, metric.shape[-1], r, protected, padded, size.shape[-1])
    return _launch(tome_merge_kernel, params, x, size, metric)


def topk_select_triton(
    x: Tensor, size: Tensor, class_attn: Tensor, keep: int, protected: int, fuse: bool = False, keep_order: bool = False
) -> tuple[Tensor, Tensor]:
    """(x (B, N, C), state (B, N, S), class_attn (B, N)) -> (x', state') with ``topk_select_kernel``."""
    from .kernels import topk_select_kernel

    batch, num_tokens, channels = x.shape
    params = topk_select_launch(batch, num_tokens, channels, keep, protected, fuse, keep_order, size.shape[-1])
    return _launch(topk_select_kernel, params, x, size, class_attn)


def _launch(kernel: Any, params: LaunchParams, x: Tensor, size: Tensor, signal: Tensor) -> tuple[Tensor, Tensor]:
    """Run a token-op kernel in the AOT argument order: inputs, the batch size, then the outputs."""
    batch, _, channels = x.shape
    x, size, signal = x.contiguous(), size.contiguous(), signal.contiguous()
    x_out = torch.empty(batch, params.out_tokens, channels, dtype=x.dtype, device=x.device)
    size_out = torch.empty(batch, params.out_tokens, size.shape[-1], dtype=size.dtype, device=x.device)
    options = {"num_warps": params.num_warps, "enable_fp_fusion": False}  # as aot.compile_kernel
    kernel[params.grid](x, size, signal, batch, x_out, size_out, **options, **params.constexprs)
    return x_out, size_out

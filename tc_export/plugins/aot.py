"""Ahead-of-time compilation of the plugin kernels to PTX and cubin for a CUDA compute capability, no GPU needed.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` runs Triton's whole
CUDA pipeline on the CPU (cubin via Triton's bundled ptxas). TensorRT's AOT plugins embed the PTX and launch it
with the grid/block/shared memory recorded here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import BackendUnavailableError, ConfigError
from .launch import LaunchParams

# Jetson Orin (8.7), Ada (8.9), Hopper (9.0): the targets the export presets name.
SUPPORTED_CC = (87, 89, 90)
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", "fp32": "fp32", "fp16": "fp16"}


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one compute capability: what a TensorRT AOT plugin needs to launch it."""

    name: str
    ptx: str
    cubin: bytes | None
    shared_mem: int
    num_warps: int
    compute_capability: int
    scratch_bytes: int = 0  # Triton global/profile scratch; TensorRT provides none, so it must stay 0

    @property
    def block_x(self) -> int:
        """Threads per block."""
        return self.num_warps * 32

    @property
    def ptx_target(self) -> str | None:
        """The ``.target`` the PTX declares (e.g. ``sm_87``)."""
        found = re.search(r"^\.target\s+(\w+)", self.ptx, re.MULTILINE)
        return found.group(1) if found else None


def triton_dtype(dtype: torch.dtype | str) -> str:
    """Triton's pointer element name for a supported plugin dtype (fp32 or fp16)."""
    if dtype not in _TRITON_DTYPES:
        raise ConfigError(f"plugin kernels take fp32 or fp16 tensors, not {dtype}")
    return _TRITON_DTYPES[dtype]


def compile_kernel(
    fn: Any, signature: Mapping[str, str], params: LaunchParams, compute_capability: int
) -> CompiledKernel:
    """Compile ``fn`` with runtime ``signature`` and ``params.constexprs`` for ``compute_capability`` (e.g. 87)."""
    if compute_capability < 80:
        raise ConfigError(f"plugin kernels need compute capability >= 8.0 (got {compute_capability / 10:.1f})")
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - triton is in the dev extras
        raise BackendUnavailableError("ahead-of-time kernels need Triton: pip install 'tc-export[triton]'") from exc
    full_signature = dict(signature) | {name: "constexpr" for name in params.constexprs}
    source = ASTSource(fn, full_signature, dict(params.constexprs))
    # No FMA contraction: the padding scores must round exactly as PyTorch's separate multiply and add.
    options = {"num_warps": params.num_warps, "enable_fp_fusion": False}
    with knobs.compilation.scope():
        knobs.compilation.disable_line_info = True  # no debug sections: the PTX is embedded in every engine
        compiled = triton.compile(source, target=GPUTarget("cuda", compute_capability, 32), options=options)
    return CompiledKernel(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        cubin=compiled.asm.get("cubin"),
        shared_mem=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
        compute_capability=compute_capability,
        scratch_bytes=int(getattr(compiled.metadata, "global_scratch_size", 0) or 0)
        + int(getattr(compiled.metadata, "profile_scratch_size", 0) or 0),
    )


def _signature(
    dtype: torch.dtype | str, size_dtype: torch.dtype | str | None, signal_dtype: torch.dtype | str | None, signal: str
) -> dict[str, str]:
    """Runtime argument types in kernel order: inputs, the batch (int32), outputs."""
    x_type = triton_dtype(dtype)
    size_type = triton_dtype(size_dtype or dtype)
    return {
        "x_ptr": f"*{x_type}",
        "size_ptr": f"*{size_type}",
        signal: f"*{triton_dtype(signal_dtype or dtype)}",
        "batch": "i32",
        "x_out_ptr": f"*{x_type}",
        "size_out_ptr": f"*{size_type}",
    }


def compile_tome_merge(
    params: LaunchParams,
    compute_capability: int,
    dtype: torch.dtype | str = torch.float32,
    size_dtype: torch.dtype | str | None = None,
    metric_dtype: torch.dtype | str | None = None,
) -> CompiledKernel:
    """``tome_merge_kernel`` for ``params`` (from ``tome_merge_launch``); size/metric dtypes default to x's."""
    from .kernels import tome_merge_kernel

    return compile_kernel(
        tome_merge_kernel, _signature(dtype, size_dtype, metric_dtype, "metric_ptr"), params, compute_capability
    )


def compile_topk_select(
    params: LaunchParams,
    compute_capability: int,
    dtype: torch.dtype | str = torch.float32,
    size_dtype: torch.dtype | str | None = None,
    attn_dtype: torch.dtype | str | None = None,
) -> CompiledKernel:
    """``topk_select_kernel`` for ``params`` (from ``topk_select_launch``); size/attention dtypes default to x's."""
    from .kernels import topk_select_kernel

    return compile_kernel(
        topk_select_kernel, _signature(dtype, size_dtype, attn_dtype, "attn_ptr"), params, compute_capability
    )

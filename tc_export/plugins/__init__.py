"""TensorRT plugins for the compressed ops: Triton kernels, their launch parameters and ahead-of-time compilation.

Layers, from tested to untested:

- ``launch``: pure-Python launch parameters (grid, warps, block sizes) for a given input shape, and host wrappers
  that run the kernels on torch tensors (CPU under ``TRITON_INTERPRET=1``, or CUDA).
- ``kernels``: the ``@triton.jit`` kernels (one per op, one program per batch item).
- ``aot``: ``triton.compile`` for a CUDA compute capability without a GPU -> PTX and cubin.
- ``trt_plugins``: the ``tensorrt.plugin`` registration (needs TensorRT >= 10.9; never run on these machines).

Triton is optional: importing this package (or ``launch``) does not import it.
"""

from __future__ import annotations

import importlib
import importlib.util

from .launch import LaunchParams, topk_select_launch, tome_merge_launch

__all__ = ["LaunchParams", "load_trt_plugins", "tome_merge_launch", "topk_select_launch"]


def load_trt_plugins() -> bool:
    """Register the TensorRT plugins (``tc_export::ToMeMerge``, ``tc_export::TopKSelect``) if TensorRT is present.

    Returns False, registering nothing, where ``tensorrt`` cannot be imported. Registering twice is a no-op.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt.plugin  # noqa: F401  (needs the TensorRT libraries, not only the bindings wheel)
    except (ImportError, OSError):
        return False
    importlib.import_module(f"{__name__}.trt_plugins")
    return True

"""TensorRT plugins for the compressed ops: Triton kernels, their launch parameters and ahead-of-time compilation.

Layers, from tested to untested:

- ``launch``: pure-Python launch parameters (grid, warps, block sizes) for a given input shape, and host wrappers
  that run the kernels on torch tensors (CPU under ``TRITON_INTERPRET=1``, or CUDA).
- ``kernels``: the ``@triton.jit`` kernels (one per op, one program per batch item).
- ``aot``: ``triton.compile`` for a CUDA compute capability without a GPU -> PTX and cubin.
- the ``tensorrt.plugin`` registration lives with the other TensorRT code: ``tc_export.export.tensorrt.plugins``
  (needs TensorRT >= 10.9; never run on these machines), loaded by ``tc_export.export.tensorrt.load_trt_plugins``.

Triton is optional: importing this package (or ``launch``) does not import it.
"""

from __future__ import annotations

from .launch import LaunchParams, topk_select_launch, tome_merge_launch

__all__ = ["LaunchParams", "tome_merge_launch", "topk_select_launch"]

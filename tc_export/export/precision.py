"""Half-precision files (``--dtype fp16|bf16``): the model's weights and compute in that dtype, its inputs and
outputs in fp32, so the file keeps the interface (and the bundles, benchmarks and engines built from it) of the
fp32 export at half the size. The token ops score and select in fp32 inside their functions (ops/tome.py,
ops/topk.py cast their scores)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# Measured with onnx 1.23 / onnxruntime 1.32 (docs/half-precision.md, single-node models per op): ONNX's Conv (the
# patch embedding) has no bfloat16 type, so a bf16 ViT fails the checker; ONNX Runtime's CPU provider has bf16
# kernels for Cast, Concat, Transpose, Clip, Identity and LayerNormalization only, none for Add, Sub, Mul, Div,
# MatMul, Gemm, Softmax, Erf, Sqrt, Log, Neg, ReduceMean, ReduceL2, Equal or Conv: no runtime here can run (so check)
# the file, and an fp32 upcast of it would check the fp32 file, not the bf16 one.
UNSUPPORTED = {"bf16": "ONNX's Conv has no bfloat16 type and ONNX Runtime's CPU provider has no bf16 kernels for "
                       "Add, Mul, MatMul, Softmax, Erf, Conv and most other ops, so no runtime here can check the "
                       "file: use --dtype fp16 (half the file too); a TensorRT engine builds bf16 kernels from the "
                       "fp32 or fp16 file (--precision bf16)"}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name in UNSUPPORTED:
        raise ConfigError(f"--dtype {name} is not supported: {UNSUPPORTED[name]}")
    return DTYPES[name]


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its weights cast to ``dtype`` in place (a module sharing them is cast too), taking and
    giving fp32. A compressed ``GraphModule`` gets the casts in its graph, so its token op sites stay where the
    ONNX functions plan finds them; any other module is wrapped (``InDtype``)."""
    if not isinstance(module, torch.fx.GraphModule):
        return InDtype(module, dtype)
    module.to(dtype)
    graph = module.graph
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        with graph.inserting_after(node):
            cast = graph.call_function(_cast, (node, dtype))
        node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        output.args = torch.fx.node.map_arg(output.args, lambda n: graph.call_function(_cast, (n, torch.float32)))
    module.recompile()
    return module


class InDtype(torch.nn.Module):
    """``module`` with its floating parameters and buffers cast (in place) to ``dtype``; floating inputs are cast
    to ``dtype`` on the way in, floating outputs back to fp32 on the way out."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_cast(a, self.dtype) for a in args)
        kwargs = {name: _cast(value, self.dtype) for name, value in kwargs.items()}
        return _cast(self.module(*args, **kwargs), torch.float32)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value

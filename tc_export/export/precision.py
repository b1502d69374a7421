"""Half-precision files (``--dtype fp16|bf16``): the model's weights and compute in that dtype, its inputs and
outputs in fp32, so the file keeps the interface (and the bundles, benchmarks and engines built from it) of the
fp32 export at half the size. The token ops score and select in fp32 inside their functions (ops/tome.py,
ops/topk.py, ops/prumerge.py cast their scores). bf16: the ops ONNX has no bf16 type for (Conv) stay fp32 behind
Casts, and no runtime here runs the file (``NOT_RUNNABLE``: checks/unrunnable.py says what is checked instead)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# ONNX's Conv (the patch embedding) has no bfloat16 type (opset 18; onnx 1.23's checker refuses it): in a bf16 file
# these modules compute in fp32 behind Casts (``InFp32``), the rest in bf16. docs/half-precision.md#bf16
KEPT_FP32: dict[str, tuple[type[torch.nn.Module], ...]] = {
    "bf16": (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
             torch.nn.ConvTranspose3d)}
# Measured with onnxruntime 1.32 (single-node models per op): the CPU provider has bf16 kernels for Cast, Concat,
# Transpose, Clip, Identity and LayerNormalization only, none for Add, Sub, Mul, Div, MatMul, Gemm, Softmax, Erf,
# Sqrt, Log, Neg, ReduceMean, ReduceL2, Equal or Conv: nothing here runs a bf16 file, so it gets no parity check.
NOT_RUNNABLE = {"bf16": "ONNX Runtime's CPU provider has no bf16 kernels for Add, Mul, MatMul, Softmax, Erf and most "
                        "other ops"}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its weights cast to ``dtype`` in place (a module sharing them is cast too), taking and
    giving fp32. A compressed ``GraphModule`` gets the casts in its graph, so its token op sites stay where the
    ONNX functions plan finds them; any other module is wrapped (``InDtype``). The modules ONNX has no ``dtype``
    type for (``KEPT_FP32``) stay fp32 behind Casts."""
    kept = next((KEPT_FP32[name] for name, value in DTYPES.items() if value == dtype and name in KEPT_FP32), ())
    if not isinstance(module, torch.fx.GraphModule):
        return keep_fp32(InDtype(module, dtype), kept)
    keep_fp32(module.to(dtype), kept)
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


def keep_fp32(module: torch.nn.Module, types: tuple[type[torch.nn.Module], ...]) -> torch.nn.Module:
    """Each submodule of one of ``types`` replaced (in place) by itself in fp32 behind Casts (``InFp32``)."""
    if not types:
        return module
    for name, child in list(module.named_modules()):
        if isinstance(child, types) and name:
            parent, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent), attribute, InFp32(child))
    return module


class InFp32(torch.nn.Module):
    """``module`` in fp32: its input cast to fp32, its output back to the input's dtype."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


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

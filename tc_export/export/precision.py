"""Half-precision files (``--dtype fp16|bf16``): the model's weights and compute in that dtype, its inputs and
outputs in fp32, so the file keeps the interface (and the bundles, benchmarks and engines built from it) of the
fp32 export at half the size. The token ops score and select in fp32 inside their functions (ops/tome.py,
ops/topk.py, ops/prumerge.py cast their scores). bf16: the ops ONNX has no bf16 type for (Conv) stay fp32 behind
Casts, and no runtime here runs the file (``NOT_RUNNABLE``: checks/unrunnable.py says what is checked instead)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

KEEP_FP32 = "_keep_fp32"  # a buffer whose name ends so stays fp32 in a half-precision file (rotary frequencies)
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
    fp32_buffers = {name: buffer for name, buffer in module.named_buffers() if name.endswith(KEEP_FP32)}
    keep_fp32(module.to(dtype), kept)
    for name, buffer in fp32_buffers.items():
        owner, attribute = _owner(module, name)
        owner.register_buffer(attribute, buffer)
    graph = module.graph
    _constants_to(module, dtype)
    follow_traced_dtype(graph, dtype)
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        with graph.inserting_after(node):
            cast = graph.call_function(_cast, (node, dtype))
        node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        output.args = torch.fx.node.map_arg(output.args, lambda n: graph.call_function(_cast, (n, torch.float32)))
    module.recompile()
    return module


def _owner(module: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    """The submodule holding the attribute ``dotted`` names (``a.b.c`` -> module ``a.b``, ``"c"``)."""
    path, _, attribute = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), attribute


def _constants_to(module: torch.fx.GraphModule, dtype: torch.dtype) -> None:
    """The graph's fp32 tensor constants (rotary tables, position grids evaluated once) in ``dtype``, as its
    parameters and buffers are: ``module.to`` leaves plain tensor attributes alone."""
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, name = _owner(module, str(node.target))
        value = getattr(owner, name, None)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                and value.dtype == torch.float32 and name not in dict(owner.named_buffers(recurse=False)):
            setattr(owner, name, value.to(dtype))


_FLOAT_CASTS = {torch.ops.aten.to.dtype: 1, torch.ops.aten._to_copy.default: None}
_DTYPE_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default}


def follow_traced_dtype(graph: torch.fx.Graph, dtype: torch.dtype) -> None:
    """The casts a trace in fp32 baked in, moved to ``dtype``. Tracing evaluates ``x.to(orig_dtype)`` (timm's
    position-embedding resampling, rotary tables' ``.to(q.dtype)``) to a cast to float32, and torch.export asserts
    float32 before it: with the weights in ``dtype`` both would stop the graph or promote the rest of it to fp32. A
    cast that was fp32 -> fp32 when traced (it changed nothing then) now casts to ``dtype``; the traced dtype
    assertions on floats go. Casts from integers or booleans to float32 (positions, masks) stay."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DTYPE_ASSERTIONS and node.kwargs.get("dtype") in (torch.float32, torch.float64):
            graph.erase_node(node)
            continue
        if node.target not in _FLOAT_CASTS or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0].meta.get("val")
        if not isinstance(source, torch.Tensor) or source.dtype != torch.float32:
            continue
        position = _FLOAT_CASTS[node.target]
        if position is not None and len(node.args) > position and node.args[position] == torch.float32:
            node.args = (*node.args[:position], dtype, *node.args[position + 1:])
        elif node.kwargs.get("dtype") == torch.float32:
            node.kwargs = {**node.kwargs, "dtype": dtype}


def check_runs_in_dtype(module: torch.nn.Module, inputs: dict[str, torch.Tensor], name: str, model: str) -> None:
    """One forward of the cast model: a graph that still mixes fp32 into the half-precision compute (a cast the
    trace fixed that ``follow_traced_dtype`` does not recognise) is refused in one line, not an internal error."""
    try:
        with torch.no_grad():
            module(**inputs)
    except RuntimeError as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "dtype" not in text and "scalar type" not in text:
            raise
        raise ConfigError(f"--dtype {name}: {model} still mixes fp32 into the {name} compute after the cast "
                          f"({text}); export fp32 and build a {name} engine from it (tc-export build ... "
                          f"--precision {name})") from None


def keep_fp32(module: torch.nn.Module, types: tuple[type[torch.nn.Module], ...]) -> torch.nn.Module:
    """Each submodule of one of ``types`` replaced (in place) by itself in fp32 behind Casts (``InFp32``)."""
    if not types:
        return module
    for name, child in list(module.named_modules()):
        if isinstance(child, types) and name:
            setattr(*_owner(module, name), InFp32(child))
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

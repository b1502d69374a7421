"""TensorRT registration of ``tc_export::ToMeMerge`` and ``tc_export::TopKSelect`` (``tensorrt.plugin``, >= 10.9).

UNTESTED: no machine here has TensorRT or a GPU. Everything this module calls (launch parameters, AOT compile,
the kernels' numerics) is tested in ``tests/test_plugin_kernels.py``; this layer only adapts TensorRT's
descriptors to it. Import it through ``tc_export.export.tensorrt.load_trt_plugins()`` (importing it registers the
plugins; it needs ``tensorrt`` and, to build, Triton and a GPU).

ONNX node contract (attributes other than ``plugin_namespace``/``plugin_version``/``aot`` become plugin fields):
``ToMeMerge(x, size, metric) -> (x', size')`` with int attributes ``r``, ``protected``, ``padded``;
``TopKSelect(x, size, class_attn) -> (x', size')`` with int attributes ``keep``, ``protected``, ``fuse``,
``keep_order``. x (B, N, C), size (B, N, S) (the token state: S = 1, or 1 + P with positions carried), metric
(B, N, d), class_attn (B, N); N, C, S, d static, B may vary.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from ...errors import ConfigError
from ...plugins.aot import CompiledKernel, compile_tome_merge, compile_topk_select
from ...plugins.launch import effective_r, tome_merge_launch, tome_merge_triton, topk_select_launch, topk_select_triton

NAMESPACE = "tc_export"
_DTYPES = {trt.float32: "fp32", trt.float16: "fp16"}
# Index-wise: all five tensors fp32, or all fp16.
_TYPES = "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16"


def _static(desc: trtp.TensorDesc, axis: int, what: str) -> int:
    dim = desc.shape_expr[axis]
    if not dim.is_constant:
        raise ConfigError(f"the {what} of a {NAMESPACE} plugin input must be static (export without a dynamic {what})")
    return int(dim.constant_value())


def _dtype(desc: trtp.TensorDesc) -> str:
    if desc.dtype not in _DTYPES:
        raise ConfigError(f"{NAMESPACE} plugins take fp32 or fp16 tensors, not {desc.dtype}")
    return _DTYPES[desc.dtype]


def _compute_capability() -> int:
    """The build GPU's compute capability (e.g. 87): TensorRT builds the engine on the device that runs it."""
    from triton.runtime import driver

    return int(driver.active.get_current_target().arch)


def _outputs(x: trtp.TensorDesc, size: trtp.TensorDesc, tokens: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    batch = x.shape_expr[0]
    return (
        trtp.from_shape_expr((batch, tokens, x.shape_expr[2]), dtype=x.dtype),
        trtp.from_shape_expr((batch, tokens, size.shape_expr[2]), dtype=size.dtype),
    )


def _aot_result(kernel: CompiledKernel, x: trtp.TensorDesc) -> tuple:
    """(kernel name, PTX, launch params, scalar args): one program per batch item, the batch as the int32 arg."""
    batch = x.shape_expr[0]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = batch
    launch.block_x = kernel.block_x
    launch.shared_mem = kernel.shared_mem
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(batch)])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra_args


def _run_jit(run, inputs, outputs, stream: int, *settings) -> None:  # noqa: ANN001
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tensors = [torch.as_tensor(t, device="cuda") for t in inputs]
        for target, value in zip(outputs, run(*tensors, *settings)):
            torch.as_tensor(target, device="cuda").copy_(value)


# ToMeMerge ------------------------------------------------------------------------------------------------


@trtp.register(f"{NAMESPACE}::ToMeMerge")
def tome_merge_desc(
    x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, r: int, protected: int, padded: int
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    tokens = _static(x, 1, "token count")
    return _outputs(x, size, tokens - effective_r(tokens, r, protected))


@trtp.autotune(f"{NAMESPACE}::ToMeMerge")
def tome_merge_autotune(x, size, metric, outputs) -> List[trtp.AutoTuneCombination]:  # noqa: ANN001
    return [trtp.AutoTuneCombination(_TYPES, "LINEAR")]


@trtp.aot_impl(f"{NAMESPACE}::ToMeMerge")
def tome_merge_aot(
    x: trtp.TensorDesc,
    size: trtp.TensorDesc,
    metric: trtp.TensorDesc,
    r: int,
    protected: int,
    padded: int,
    outputs: Tuple[trtp.TensorDesc],
    tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    params = tome_merge_launch(
        1, _static(x, 1, "token count"), _static(x, 2, "width"), _static(metric, 2, "metric width"), r, protected,
        bool(padded), _static(size, 2, "state width"),
    )
    kernel = compile_tome_merge(params, _compute_capability(), _dtype(x), _dtype(size), _dtype(metric))
    return _aot_result(kernel, x)


@trtp.impl(f"{NAMESPACE}::ToMeMerge")
def tome_merge_impl(x, size, metric, r: int, protected: int, padded: int, outputs, stream: int) -> None:  # noqa: ANN001
    _run_jit(tome_merge_triton, (x, size, metric), outputs, stream, r, protected, bool(padded))


# TopKSelect -----------------------------------------------------------------------------------------------


@trtp.register(f"{NAMESPACE}::TopKSelect")
def topk_select_desc(
    x: trtp.TensorDesc, size: trtp.TensorDesc, class_attn: trtp.TensorDesc, keep: int, protected: int, fuse: int,
    keep_order: int,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return _outputs(x, size, protected + keep + int(bool(fuse)))


@trtp.autotune(f"{NAMESPACE}::TopKSelect")
def topk_select_autotune(x, size, class_attn, outputs) -> List[trtp.AutoTuneCombination]:  # noqa: ANN001
    return [trtp.AutoTuneCombination(_TYPES, "LINEAR")]


@trtp.aot_impl(f"{NAMESPACE}::TopKSelect")
def topk_select_aot(
    x: trtp.TensorDesc,
    size: trtp.TensorDesc,
    class_attn: trtp.TensorDesc,
    keep: int,
    protected: int,
    fuse: int,
    keep_order: int,
    outputs: Tuple[trtp.TensorDesc],
    tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    params = topk_select_launch(
        1, _static(x, 1, "token count"), _static(x, 2, "width"), keep, protected, bool(fuse), bool(keep_order),
        _static(size, 2, "state width"),
    )
    kernel = compile_topk_select(params, _compute_capability(), _dtype(x), _dtype(size), _dtype(class_attn))
    return _aot_result(kernel, x)


@trtp.impl(f"{NAMESPACE}::TopKSelect")
def topk_select_impl(
    x, size, class_attn, keep: int, protected: int, fuse: int, keep_order: int, outputs, stream: int  # noqa: ANN001
) -> None:
    _run_jit(topk_select_triton, (x, size, class_attn), outputs, stream, keep, protected, bool(fuse), bool(keep_order))

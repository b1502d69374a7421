"""What can be checked of a file no runtime here can run (``--dtype bf16``: ONNX Runtime's CPU provider has no bf16
kernels for most ops, TensorRT is not installed), in place of parity:

- the ONNX checker (full check: types included, so an op without a bf16 type fails here);
- the TensorRT lint (``tensorrt/lint.py``) for the TensorRT the target ships (10.3 without one);
- PyTorch in that dtype against PyTorch in fp32 with the decisions pinned (each token op's decisions in the low
  precision run imposed on the fp32 run, ``pinned.pinned_run``): what the rounding changes apart from the near-ties
  it flips, and the flips' margins. Both runs are PyTorch: this is fidelity, not parity; nothing checks that the
  file computes what PyTorch computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from ...ops.base import TokenOp
from ...ops.pinning import Tape, pinned_ops
from .compare import compare_elementwise
from .decisions import SiteCall, _sizes
from .pinned import FLIP_MARGINS, PinnedReport, pinned_run, result_arrays


@dataclass
class UnrunnableReport:
    """The checks of a file no runtime here runs: checker and lint passed (else an error was raised), and per
    input the low-precision PyTorch run against fp32 with its decisions pinned."""

    dtype: str
    why: str  # why no runtime here runs it
    lint: str
    fidelity: list[PinnedReport]

    def lines(self) -> list[str]:
        return [f"parity not checked: {self.why}, and TensorRT is not installed here; what can be checked:",
                "  ONNX checker (full check, types included): passed", f"  {self.lint}",
                f"  PyTorch {self.dtype} vs PyTorch fp32 with the {self.dtype} run's decisions pinned (fidelity of the "
                f"{self.dtype} rounding, not parity):", *(f"    {report.summary()}" for report in self.fidelity)]


def check_unrunnable(fp32_module: torch.nn.Module, module: torch.nn.Module, onnx_path: Path,
                     make_inputs: Callable[[int], Mapping[str, torch.Tensor]], output_names: Sequence[str],
                     dtype: str, why: str, seed: int, samples: int, atol: float, rtol: float,
                     trt_version: str) -> UnrunnableReport:
    """Checker, lint, and the pinned fp32 comparison (see the module doc); a checker or lint error raises."""
    import onnx

    from ..tensorrt.lint import lint_model

    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ConfigError(f"the {dtype} ONNX fails the ONNX checker: {str(error).splitlines()[0][:200]}") from None
    lint = lint_model(onnx_path, trt_version)
    if not lint.ok:
        first = lint.errors[0]
        raise ConfigError(f"the {dtype} ONNX fails the TensorRT {trt_version} lint ({len(lint.errors)} error(s)), "
                          f"first: {first.op_type} {first.node!r}: {first.message}")
    fidelity = []
    for i in range(samples):
        report = pinned_fidelity(fp32_module, module, make_inputs(seed + i), output_names, dtype, atol, rtol)
        report.seed = seed + i
        fidelity.append(report)
    return UnrunnableReport(dtype, why, lint.summary(), fidelity)


def pinned_fidelity(fp32_module: torch.nn.Module, module: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                    output_names: Sequence[str], dtype: str, atol: float, rtol: float) -> PinnedReport:
    """``module`` (low precision) recorded, then ``fp32_module`` (the same model in fp32) run with its decisions."""
    report = PinnedReport(FLIP_MARGINS[dtype], atol, rtol)
    tapes: list[Tape | None] = []
    calls: list[SiteCall] = []
    names = {m: name for name, m in module.named_modules()}

    def tape_for(index: int, op: TokenOp) -> Tape:
        tapes.append(Tape())
        return tapes[-1]

    def seen(index: int, op: TokenOp, args: tuple, output: object, tape: Tape | None) -> None:
        tokens = output[0] if isinstance(output, tuple) else output
        sizes = _sizes(output)  # an op that leaves the sizes None is compared all the same
        calls.append(SiteCall(names.get(op, type(op).__name__), op,
                              tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args),
                              sizes if sizes.size else np.ones(1), tokens.float()))

    with pinned_ops(module, tape_for, seen), torch.no_grad():
        low = module(**inputs)
    result, report.sites = pinned_run(fp32_module, inputs, tapes, calls, report.margin)
    with torch.no_grad():
        unpinned = fp32_module(**inputs)
    for name, ref, pinned, own in zip(output_names, result_arrays(result), result_arrays(low), result_arrays(unpinned)):
        check = compare_elementwise(ref, pinned, atol, rtol)
        report.pinned[name] = (check.max_abs, check.max_rel, check.passed and bool(np.isfinite(pinned).all()))
        report.unpinned[name] = float(np.abs(own.astype(np.float64) - pinned).max())
    return report

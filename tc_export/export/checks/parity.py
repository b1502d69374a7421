"""Parity: Polygraphy's Comparator runs the PyTorch module and ONNX Runtime on the same seeded inputs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from .compare import compare_elementwise, element_errors
from .decisions import DecisionReport, check_decisions
from .pinned import FLIP_MARGINS, PinnedReport, pinned_parity


@dataclass(frozen=True)
class ParityConfig:
    """Tolerances (an element fails only if it breaks both, as in Polygraphy), seed and number of inputs."""

    atol: float = 1e-4
    rtol: float = 1e-3
    seed: int = 0
    samples: int = 2
    dtype: str = "fp32"  # the file's; in half precision differing decisions are pinned (export/checks/pinned.py)

    @classmethod
    def for_dtype(cls, dtype: str, atol: float | None = None, rtol: float | None = None, **kwargs) -> ParityConfig:
        """The tolerances of a file in ``dtype`` (``DTYPE_TOLERANCES``) where ``atol``/``rtol`` are not given."""
        default_atol, default_rtol = DTYPE_TOLERANCES.get(dtype, DTYPE_TOLERANCES["fp32"])
        return cls(atol=default_atol if atol is None else atol, rtol=default_rtol if rtol is None else rtol,
                   dtype=dtype, **kwargs)

    @property
    def pins_decisions(self) -> bool:
        """Differing decisions are replayed pinned (half precision), not reported as a failure (fp32)."""
        return self.dtype != "fp32"

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError(f"--atol and --rtol must be >= 0, got {self.atol} and {self.rtol}")
        if self.samples < 1:
            raise ConfigError(f"parity needs at least one input sample, got {self.samples}")


# Parity (PyTorch in the file's dtype vs ONNX Runtime) per --dtype: fp32's defaults; half precision rounds each op
# to 11 (fp16) or 8 (bf16) significant bits, and the two runtimes round at different places.
DTYPE_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "bf16": (1e-1, 5e-2)}

RUNTIME_NAMES = ("PyTorch", "ONNX Runtime")  # reference, candidate


@dataclass(frozen=True)
class NonFinite:
    """How many NaN and Inf values one runtime produced for one output (over all samples)."""

    runtime: str
    nan: int
    inf: int
    total: int

    def describe(self) -> str:
        return f"{self.runtime} {self.nan} NaN, {self.inf} Inf of {self.total}"


@dataclass(frozen=True)
class OutputError:
    """One output's errors over the finite elements; ``nonfinite`` lists each runtime that produced NaN/Inf."""

    name: str
    max_abs: float
    max_rel: float
    passed: bool
    nonfinite: tuple[NonFinite, ...] = ()

    def describe(self) -> str:
        if self.nonfinite:
            return f"{self.name} NON-FINITE ({'; '.join(n.describe() for n in self.nonfinite)})"
        return f"{self.name} max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}"


@dataclass
class ParityReport:
    reference: str
    candidate: str
    outputs: list[OutputError] = field(default_factory=list)
    passed: bool = True
    decisions: DecisionReport | None = None  # on a failure: did the token ops decide alike (a flipped tie)?
    pinned: list[PinnedReport] = field(default_factory=list)  # half precision: each input replayed pinned

    def __bool__(self) -> bool:
        return self.passed

    def describe(self) -> str:
        parts = [o.describe() for o in self.outputs]
        if not self.pinned:
            verdict = "passed" if self.passed else "FAILED"
            return f"{verdict} · " + "; ".join(parts)
        verdict = "passed" if self.passed else "FAILED"
        if any(p.needed for p in self.pinned):
            verdict += f" with {self.candidate_name}'s decisions pinned · unpinned:"
        else:
            verdict += " ·"
        return "\n  ".join([f"{verdict} " + "; ".join(parts)] + [p.summary() for p in self.pinned])

    @property
    def candidate_name(self) -> str:
        return RUNTIME_NAMES[1]

    def failures(self) -> list[OutputError]:
        return [o for o in self.outputs if not o.passed]

    def failure_message(self, atol: float, rtol: float) -> str:
        """One line for a failed check: a non-finite output is named as such, never as a (meaningless) error."""
        failed_pin = next((p for p in self.pinned if not p.passed and (p.needed or not p.error)), None)
        if failed_pin is not None:
            on = f" {failed_pin.where()}" if failed_pin.where() else ""
            return f"parity failed with {self.candidate_name}'s decisions pinned{on}: {failed_pin.failure()}"
        worst = self.failures()[0] if self.failures() else self.outputs[0]
        if worst.nonfinite:
            return (f"parity failed: output {worst.name!r} is non-finite ("
                    f"{'; '.join(n.describe() for n in worst.nonfinite)} values); "
                    + ("the model itself produces them (check its weights and inputs)"
                       if any(n.runtime == RUNTIME_NAMES[0] for n in worst.nonfinite)
                       else "only the exported graph produces them"))
        decisions = f"; {self.decisions.describe()}" if self.decisions is not None else ""
        return (f"parity failed: output {worst.name!r} differs by max abs {worst.max_abs:.3e}, max rel "
                f"{worst.max_rel:.3e} (atol {atol:g}, rtol {rtol:g}){decisions}")


def _torch_runner(
    module: torch.nn.Module, torch_names: Mapping[str, str], output_names: Sequence[str], feed: Mapping[str, np.ndarray]
):
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        """Runs a PyTorch module on CPU (Polygraphy's own PytRunner moves inputs to CUDA)."""

        def __init__(self) -> None:
            super().__init__(name="pytorch", prefix="pytorch-runner")

        def activate_impl(self) -> None:
            try:
                module.eval()
            except NotImplementedError:  # graphs from torch.export are fixed in eval mode already
                pass

        def get_input_metadata_impl(self):
            metadata = TensorMetadata()
            for name, value in feed.items():
                metadata.add(name, value.dtype, value.shape)
            return metadata

        def infer_impl(self, feed_dict):
            kwargs = {torch_names[name]: torch.from_numpy(np.ascontiguousarray(v)) for name, v in feed_dict.items()}
            start = time.perf_counter()
            with torch.no_grad():
                result = module(**kwargs)
            self.inference_time = time.perf_counter() - start
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            return OrderedDict((n, np.ascontiguousarray(o.detach().numpy())) for n, o in zip(output_names, outputs))

        def deactivate_impl(self) -> None:
            pass

    return TorchRunner()


def quiet_polygraphy(silent: bool = False) -> None:
    """Polygraphy logs errors only (nothing when ``silent``: the caller reports the failure itself), without
    colours (its warning about the missing ``colored`` module would otherwise reach the user's terminal)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False
    G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1 if silent else G_LOGGER.ERROR


def check_parity(
    module: torch.nn.Module,
    onnx_path: Path,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    onnx_names: Mapping[str, str],
    output_names: Sequence[str],
    config: ParityConfig,
) -> ParityReport:
    """Compare ``module`` (reference) against ONNX Runtime on ``config.samples`` seeded inputs.

    ``make_inputs(seed)`` returns inputs keyed by forward-argument name; ``onnx_names`` maps those to ONNX
    input names. The verdict is Polygraphy's (``CompareFunc.simple``); the errors reported are the maxima
    over all samples.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    quiet_polygraphy(silent=config.pins_decisions)  # a half-precision failure is judged and reported below
    feeds = []
    for i in range(config.samples):
        inputs = make_inputs(config.seed + i)
        feeds.append(OrderedDict((onnx_names[k], v.numpy()) for k, v in inputs.items()))
    torch_names = {onnx: torch_name for torch_name, onnx in onnx_names.items()}
    runners = [_torch_runner(module, torch_names, output_names, feeds[0]), OnnxrtRunner(lambda: ort_session(onnx_path))]
    results = Comparator.run(runners, data_loader=feeds)
    verdict = Comparator.compare_accuracy(
        results, compare_func=CompareFunc.simple(atol=config.atol, rtol=config.rtol, check_error_stat="elemwise")
    )
    per_iteration = next(iter(verdict[0].values()))
    report = _report(results, bool(verdict), per_iteration, output_names)
    failed = [i for i, outputs in enumerate(per_iteration) if not all(bool(v) for v in outputs.values())]
    if config.pins_decisions and not any(o.nonfinite for o in report.outputs):
        for i in range(config.samples):  # every input replayed with ONNX Runtime's decisions, flips reported
            pinned = pinned_parity(module, onnx_path, make_inputs(config.seed + i), feeds[i], output_names,
                                   config.atol, config.rtol, FLIP_MARGINS[config.dtype], _verdict(config))
            pinned.seed, pinned.needed = config.seed + i, i in failed
            report.pinned.append(pinned)
        # every input passes with the decisions pinned, and only near-ties flipped (even where it passes as it is)
        # (an input that cannot be pinned, e.g. a flat export, keeps its verdict as it is)
        report.passed = all(not p.needed if p.error else p.passed for p in report.pinned)
    elif not report.passed:  # tell a flipped near-tie from a numeric bug, on the inputs that failed
        for i in failed or range(config.samples):
            report.decisions = check_decisions(module, onnx_path, make_inputs(config.seed + i), feeds[i])
            report.decisions.seed = config.seed + i
            if report.decisions.differing:
                break
    return report


def _verdict(config: ParityConfig) -> Callable[[np.ndarray, np.ndarray], tuple[float, float, bool]]:
    """Max abs, max rel and Polygraphy's elementwise verdict for one output (non-finite values fail)."""

    def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, bool]:
        check = compare_elementwise(reference, candidate, config.atol, config.rtol)
        finite = count_nonfinite("", [reference, candidate]) is None
        return check.max_abs, check.max_rel, check.passed and finite

    return compare


def pin_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Fix glibc's malloc mmap threshold (at its initial 128 KiB), so freed large blocks go back to the OS.

    glibc raises the threshold to the size of each freed mmap-ed block (up to 32 MiB); after the export has
    freed many blocks of a few MiB, ONNX Runtime's copies of the weights while it builds a session come from the
    heap, and the transient ones stay resident. Measured on ViT-L/14 at 336 px: the session peaked at +2.0 GB
    resident (and 1.2 GB stayed after it was freed); with the threshold fixed, +1.25 GB (nothing stayed).
    A no-op without glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD (malloc.h)


def ort_session(onnx_path: Path):
    """An ONNX Runtime CPU session as Polygraphy's ``SessionFromOnnx`` makes it, without the CPU memory arena.

    Measured on ViT-L/14 at 336 px (1.2 GB of fp32 weights): creating the session with the arena adds 1.9 GB
    resident, without it 1.2 GB. The outputs are bit-identical (unlike disabling prepacking, which changes them).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    options.intra_op_num_threads = options.inter_op_num_threads = threads  # as Polygraphy sets them
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def _report(results, passed: bool, per_iteration, output_names: Sequence[str]) -> ParityReport:
    (ref_name, ref_iters), (cand_name, cand_iters) = list(results.items())
    report = ParityReport(reference=ref_name, candidate=cand_name, passed=passed)
    for name in output_names:
        max_abs = max_rel = 0.0
        for ref_iter, cand_iter in zip(ref_iters, cand_iters):
            error = element_errors(np.asarray(ref_iter[name]), np.asarray(cand_iter[name]))
            max_abs, max_rel = max(max_abs, error[0]), max(max_rel, error[1])
        nonfinite = tuple(
            counts for runtime, iters in zip(RUNTIME_NAMES, (ref_iters, cand_iters))
            if (counts := count_nonfinite(runtime, [np.asarray(it[name]) for it in iters])) is not None
        )
        ok = not nonfinite and all(bool(iteration.get(name, False)) for iteration in per_iteration)
        report.outputs.append(OutputError(name, max_abs, max_rel, ok, nonfinite))
    report.passed = passed and all(o.passed for o in report.outputs)
    return report


def count_nonfinite(runtime: str, arrays: Sequence[np.ndarray]) -> NonFinite | None:
    """NaN and Inf counts over ``arrays`` (one per sample), or None when every value is finite."""
    floats = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
    nan = sum(int(np.isnan(a).sum()) for a in floats)
    inf = sum(int(np.isinf(a).sum()) for a in floats)
    if not nan and not inf:
        return None
    return NonFinite(runtime, nan, inf, sum(a.size for a in floats))

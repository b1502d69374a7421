"""``tc-export verify MODEL --against DIR``: run an ONNX (ONNX Runtime) or an engine (TensorRT) on a bundle's
inputs and compare with its reference outputs under the manifest's tolerances.

The verdict is Polygraphy's elementwise rule: an element fails only if it breaks both atol and rtol (relative
to the reference), so ``polygraphy run model.engine --model-type engine --trt --load-inputs inputs.json
--load-outputs outputs.json --atol A --rtol R`` on the device agrees with this command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import BackendUnavailableError, ConfigError
from ..tensorrt.bundle import INPUTS, OUTPUTS, Bundle
from .parity import element_errors

CANDIDATE_RUNNER = "candidate"


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    failed_elements: int
    passed: bool
    note: str = ""

    def describe(self, atol: float, rtol: float) -> str:
        verdict = "passed" if self.passed else f"FAILED ({self.failed_elements} elements)"
        note = f" ({self.note})" if self.note else ""
        return (f"{self.name}: max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} (atol {atol:g}, "
                f"rtol {rtol:g}): {verdict}{note}")


@dataclass
class VerifyReport:
    model: Path
    runtime: str
    atol: float
    rtol: float
    outputs: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def lines(self) -> list[str]:
        return [o.describe(self.atol, self.rtol) for o in self.outputs]


def compare_elementwise(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Max errors and the number of elements breaking both tolerances (shape mismatch: all fail)."""
    if reference.shape != candidate.shape:
        return OutputCheck("", float("inf"), float("inf"), int(reference.size), False,
                           f"shape {list(candidate.shape)} vs reference {list(reference.shape)}")
    max_abs, max_rel = element_errors(reference, candidate)
    ref = reference.astype(np.float64)
    diff = np.abs(ref - candidate.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    failed = int(np.count_nonzero((diff > atol) & (rel > rtol)) + np.count_nonzero(np.isnan(diff)))
    return OutputCheck("", max_abs, max_rel, failed, failed == 0)


def verify(model: Path, against: Path, atol: float | None = None, rtol: float | None = None) -> VerifyReport:
    """Run ``model`` on the bundle's inputs and compare every manifest output with the reference."""
    bundle = Bundle.load(against)
    if not model.is_file():
        raise ConfigError(f"cannot verify {model}: no such file")
    engine = model.suffix in (".engine", ".plan")
    if not engine and model.suffix != ".onnx":
        raise ConfigError(f"cannot verify {model}: use a .onnx or a .engine (.plan) file")
    tolerances = bundle.manifest["tolerances"]["engine" if engine else "onnxruntime"]
    atol = tolerances["atol"] if atol is None else atol
    rtol = tolerances["rtol"] if rtol is None else rtol
    runtime, runner = _runner(model, engine, against)
    candidate = _run(runner, bundle.feeds)
    reference_iterations = bundle.reference[0][1]
    report = VerifyReport(model, runtime, atol, rtol)
    for output in bundle.manifest["outputs"]:
        name = output["name"]
        worst: OutputCheck | None = None
        for ref_iter, cand_iter in zip(reference_iterations, candidate):
            if name not in cand_iter:
                worst = OutputCheck(name, float("inf"), float("inf"), 0, False, f"{model.name} has no output {name!r}")
                break
            check = compare_elementwise(np.asarray(ref_iter[name]), np.asarray(cand_iter[name]), atol, rtol)
            worst = check if worst is None else OutputCheck(
                name, max(worst.max_abs, check.max_abs), max(worst.max_rel, check.max_rel),
                worst.failed_elements + check.failed_elements, worst.passed and check.passed, worst.note or check.note)
        if worst is not None:
            report.outputs.append(OutputCheck(name, worst.max_abs, worst.max_rel, worst.failed_elements,
                                              worst.passed, worst.note))
    return report


def _runner(model: Path, engine: bool, against: Path):
    if not engine:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        return "ONNX Runtime", OnnxrtRunner(SessionFromOnnx(str(model)), name=CANDIDATE_RUNNER)
    from ..tensorrt.engine import tensorrt_missing_reason

    reason = tensorrt_missing_reason()
    if reason is not None:
        raise BackendUnavailableError(
            f"{reason}; running {model} needs TensorRT and an NVIDIA GPU. On the device: polygraphy run {model} "
            f"--model-type engine --trt --load-inputs {against / INPUTS} --load-outputs {against / OUTPUTS}")
    from polygraphy.backend.common import BytesFromPath  # pragma: no cover - GPU only
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner  # pragma: no cover

    return "TensorRT", TrtRunner(EngineFromBytes(BytesFromPath(str(model))), name=CANDIDATE_RUNNER)  # pragma: no cover


def _run(runner, feeds) -> list:
    from polygraphy.comparator import Comparator

    from .parity import quiet_polygraphy

    quiet_polygraphy(silent=True)  # a failure to run is reported below, in one line
    try:
        results = Comparator.run([runner], data_loader=list(feeds))
    except Exception as error:  # noqa: BLE001 - wrong input names/shapes surface here
        raise ConfigError(f"the model cannot run on the bundle's inputs: {str(error).splitlines()[0][:200]}") from None
    return list(results[0][1])

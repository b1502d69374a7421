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
from ..tensorrt.bundle import (ENGINE_TOLERANCES, INPUTS, MODEL, OUTPUTS, SCRIPT, VERIFY_MODEL, VERIFY_SCRIPT,
                               Bundle)
from .compare import OutputCheck, compare_elementwise
from .parity import DTYPE_TOLERANCES
from .pinned import PinnedReport
from .pinned_verify import onnx_dtype
from .sites import SITES

CANDIDATE_RUNNER = "candidate"


@dataclass
class VerifyReport:
    model: Path
    runtime: str
    atol: float
    rtol: float
    outputs: list[OutputCheck] = field(default_factory=list)
    dtype: str = "fp32"  # the candidate's compute dtype (its weights'; an engine's precision)
    tolerance_note: str = ""  # where the tolerances came from, when not the manifest's
    pinned: list[PinnedReport] = field(default_factory=list)  # the failed check replayed with decisions pinned
    pin_note: str = ""  # why no pinned replay ran after a failure

    @property
    def plain_passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def passed(self) -> bool:
        if self.pinned and not any(p.error for p in self.pinned):  # pinned, and only near-ties flipped
            return bool(self.outputs) and all(p.passed for p in self.pinned)
        return self.plain_passed

    @property
    def by_pinning(self) -> bool:
        return self.passed and not self.plain_passed

    def __bool__(self) -> bool:
        return self.passed

    def lines(self) -> list[str]:
        lines = [o.describe(self.atol, self.rtol) for o in self.outputs]
        if self.tolerance_note:
            lines.insert(0, self.tolerance_note)
        lines += [f"decisions pinned: {p.summary()}" for p in self.pinned]
        if self.pin_note:
            lines.append(self.pin_note)
        return lines

    def failure(self) -> str:
        """Why the pinned replay failed (empty when none ran or it passed)."""
        failed = next((p for p in self.pinned if not p.passed), None)
        return "" if failed is None else f"with the candidate's decisions pinned {failed.where()}: {failed.failure()}"


def verify(model: Path, against: Path, atol: float | None = None, rtol: float | None = None) -> VerifyReport:
    """Run ``model`` on the bundle's inputs and compare every manifest output with the reference."""
    bundle = Bundle.load(against)
    if not model.is_file():
        raise ConfigError(f"cannot verify {model}: no such file")
    engine = model.suffix in (".engine", ".plan")
    if not engine and model.suffix != ".onnx":
        raise ConfigError(f"cannot verify {model}: use a .onnx or a .engine (.plan) file")
    tolerances = bundle.manifest["tolerances"]["engine" if engine else "onnxruntime"]
    dtype = tolerances.get("precision", "fp32") if engine else onnx_dtype(model)
    note = ""
    if not engine and dtype != bundle.manifest.get("dtype", "fp32") and (atol is None or rtol is None):
        looser = DTYPE_TOLERANCES.get(dtype, ENGINE_TOLERANCES.get(dtype, (tolerances["atol"], tolerances["rtol"])))
        tolerances = {"atol": max(tolerances["atol"], looser[0]), "rtol": max(tolerances["rtol"], looser[1])}
        note = (f"{model.name} computes in {dtype}, the bundle's reference in {bundle.manifest.get('dtype', 'fp32')}: "
                f"{dtype} tolerances (atol {tolerances['atol']:g}, rtol {tolerances['rtol']:g})")
    atol = tolerances["atol"] if atol is None else atol
    rtol = tolerances["rtol"] if rtol is None else rtol
    runtime, runner = _runner(model, engine, against)
    candidate = _run(runner, bundle.feeds)
    reference_iterations = bundle.reference[0][1]
    report = VerifyReport(model, runtime, atol, rtol, dtype=dtype, tolerance_note=note)
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
    other_dtype = dtype != bundle.manifest.get("dtype", "fp32")  # flips are reported even when it passes as is
    if (not report.plain_passed or other_dtype) and report.outputs and not any(o.note for o in report.outputs):
        _pin(report, model, engine, bundle, reference_iterations, candidate)
    return report


def _pin(report: VerifyReport, model: Path, engine: bool, bundle: Bundle, references, candidate: list) -> None:
    """Replay the failed check with the candidate's decisions pinned (export/checks/pinned_verify.py), when it can:
    an ONNX is run again exposing its sites; an engine's own outputs must carry them (the verification engine)."""
    from .pinned_verify import has_site_outputs, onnx_candidate, outputs_candidate, pinned_verify
    from .sites import load_sites

    sites = load_sites(bundle.directory)
    if sites is None:
        report.pin_note = (f"decisions not pinned: {bundle.directory} has no {SITES} (a flat export, or a bundle "
                           "from before tc-export wrote it)")
        return
    if engine and not (candidate and has_site_outputs(candidate[0])):
        report.pin_note = (f"decisions not pinned: {model.name} exposes only its outputs; the verification engine "
                           f"built from {VERIFY_MODEL} (python3 {VERIFY_SCRIPT} {MODEL} {VERIFY_MODEL}; ./{SCRIPT} "
                           "does both) carries the token-op sites' values")
        return
    run = outputs_candidate(candidate) if engine else onnx_candidate(model)

    def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, bool]:
        check = compare_elementwise(reference, candidate, report.atol, report.rtol)
        return check.max_abs, check.max_rel, check.passed and bool(np.isfinite(candidate).all())

    names = [output["name"] for output in bundle.manifest["outputs"]]
    report.pinned = pinned_verify(run, model.name, bundle.directory, sites, list(bundle.feeds), list(references),
                                  names, report.atol, report.rtol, report.dtype, compare)


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

"""``verify`` with the candidate's decisions pinned: a half-precision or int8 candidate (an engine on the device, an
fp16 ONNX here) checked against a bundle's fp32 reference apart from the near-ties its rounding flips.

Without the PyTorch model, the reference is the bundle's own ONNX under ONNX Runtime, pinned by feeding each
token-op node the candidate's *signals* (the keys, class attention, queries its decisions read) in place of its
own: the node's function then takes exactly the candidate's decisions while its tokens and sizes stay the
reference's. The reference's own signals on that pinned run are kept as outputs; the op rebuilt from
``sites.json`` replays the candidate's decisions on them, which measures each flip's score margin under the
reference's scores (``pinned.site_pin``), as the PyTorch parity check does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...ops.pinning import PinningError, active
from .compare import compare_elementwise
from .decisions import SiteCall, _value_types, calls_from_outputs, onnx_site_run, site_nodes
from .pinned import FLIP_MARGINS, PinnedReport, candidate_tapes, site_pin
from .site_outputs import site_output
from .sites import placeholder_calls

PINNED_PREFIX = "tc_export_pinned"


def onnx_dtype(path: Path) -> str:
    """The compute dtype of an ONNX file by its weights: ``int8`` when quantized, else the float type holding
    most weight elements (fp32, fp16 or bf16)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable ONNX: running it says so, in one line
        return "fp32"
    counts: dict[int, int] = {}
    for tensor in model.graph.initializer:
        counts[tensor.data_type] = counts.get(tensor.data_type, 0) + int(np.prod(tensor.dims))
    quantized = {"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger"}
    if any(node.op_type in quantized for node in model.graph.node):
        return "int8"
    floats = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    present = {name: counts.get(code, 0) for code, name in floats.items()}
    return max(present, key=present.get) if any(present.values()) else "fp32"


def pinned_reference_run(model_path: Path, feed: Mapping[str, np.ndarray],
                         signals: Sequence[Sequence[np.ndarray | None]]) -> tuple[dict[str, np.ndarray], list]:
    """The bundle's ONNX with each site's signal inputs (from the third on) replaced by ``signals`` (the
    candidate's values, cast to the reference's types); returns its outputs and, per site, the reference's own
    (x, size, *signals) and output tokens on that run."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    nodes = site_nodes(model)
    types = _value_types(model)
    outputs = [o.name for o in model.graph.output]
    exposed: list[str] = []
    pinned_feed = dict(feed)
    per_site = []
    for i, (node, given) in enumerate(zip(nodes, signals)):
        own = list(node.input)
        for j in range(2, len(node.input)):
            value = given[j] if j < len(given) else None
            if not node.input[j] or value is None:
                continue
            name = f"{PINNED_PREFIX}_{i}_{j}"
            elem = types.get(node.input[j], onnx.TensorProto.FLOAT)
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(value.shape)))
            pinned_feed[name] = value.astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            node.input[j] = name
        per_site.append((own, node.output[0]))
        exposed += [n for n in (*own, node.output[0]) if n]
    for name in dict.fromkeys(exposed):
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                name, types.get(name, onnx.TensorProto.FLOAT), None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = list(dict.fromkeys([*outputs, *exposed]))
    values = dict(zip(fetched, session.run(fetched, pinned_feed)))
    sites = [([values[n] if n else None for n in own], values[out]) for own, out in per_site]
    return {name: values[name] for name in outputs}, sites


CandidateRun = Callable[[int, Mapping[str, np.ndarray], list[SiteCall]], tuple[list[SiteCall], Mapping]]


def onnx_candidate(path: Path) -> CandidateRun:
    """A candidate ONNX: ONNX Runtime runs its verification variant (``site_outputs``) on each bundle input."""
    def run(sample: int, feed: Mapping[str, np.ndarray], placeholders: list[SiteCall]):
        return onnx_site_run(path, feed, placeholders, tokens_out=True)

    return run


def outputs_candidate(results: Sequence[Mapping[str, np.ndarray]]) -> CandidateRun:
    """A candidate that exposes only its outputs (a TensorRT engine built from the verification variant): each
    bundle input's outputs, the sites' values and decisions read by their ``site_outputs`` names."""
    def run(sample: int, feed: Mapping[str, np.ndarray], placeholders: list[SiteCall]):
        values = {name: np.asarray(value) for name, value in results[sample].items()}
        return calls_from_outputs(values, placeholders, tokens_out=True), values

    return run


def has_site_outputs(outputs: Mapping[str, Any]) -> bool:
    """The candidate's outputs carry the sites' values (it was built from the verification variant)."""
    return site_output(0, "out", 1) in outputs


def pinned_verify(candidate: CandidateRun, name: str, bundle_dir: Path, sites: dict[str, Any],
                  feeds: Sequence[Mapping], references: Sequence[Mapping], output_names: Sequence[str], atol: float,
                  rtol: float, dtype: str, compare) -> list[PinnedReport]:
    """Per bundle input: the candidate (``name``) against the bundle's model with the candidate's decisions pinned."""
    from ..tensorrt.bundle import MODEL

    margin = FLIP_MARGINS.get(dtype, FLIP_MARGINS["fp16"])
    placeholders = placeholder_calls(sites["sites"])
    reports = []
    for sample, feed in enumerate(feeds):
        report = PinnedReport(margin, atol, rtol, sample=sample)
        try:
            calls, candidate_out = candidate(sample, feed, placeholders)
        except Exception as error:  # noqa: BLE001 - a candidate that cannot expose its values
            report.error = f"the candidate's token-op values cannot be read ({str(error).splitlines()[0][:120]})"
            reports.append(report)
            continue
        found = sum(1 for call in calls if call.sizes.size)
        if found != len(placeholders):
            report.error = (f"{name} has {found} token-op sites, the bundle {len(placeholders)}: not an export of "
                            "the same model")
            reports.append(report)
            continue
        try:
            tapes = candidate_tapes(calls)
        except (PinningError, RuntimeError) as error:
            report.error = str(error)
            reports.append(report)
            continue
        recorded = sites.get("decisions", [])
        report.same_as_recorded = sample < len(recorded) and all(
            tape is not None and want is not None and [t.tolist() for t in tape.indices] == want
            for tape, want in zip(tapes, recorded[sample]))
        if sample < len(references) and not _reproduces(bundle_dir / MODEL, feed, references[sample], output_names):
            report.error = (f"the bundle's {MODEL} does not reproduce its reference outputs on input {sample}: "
                            "the bundle was changed after it was written")
            reports.append(report)
            continue
        signals = [[None, None, *(np.asarray(v.float().numpy()) for v in call.inputs[2:] if v is not None)]
                   for call in calls]
        reference_out, reference_sites = pinned_reference_run(bundle_dir / MODEL, feed, signals)
        for index, (call, tape, (own, tokens_out)) in enumerate(zip(calls, tapes, reference_sites)):
            args = _op_args([None if value is None else torch.from_numpy(np.asarray(value)) for value in own],
                            sites["sites"][index]["present"])
            replay = None if tape is None else tape.replay()
            try:
                with active(replay), torch.no_grad():
                    output = call.op.forward(*args)
            except PinningError as error:
                report.error = f"site {index} ({call.name}): {error}"
                break
            report.sites.append(site_pin(index, call, call.op, args, output, replay))
        for name in output_names:
            if name in reference_out and name in candidate_out:
                a, r, ok = compare(np.asarray(reference_out[name]), np.asarray(candidate_out[name]))
                report.pinned[name] = (a, r, ok)
                if sample < len(references) and name in references[sample]:
                    unpinned = np.asarray(references[sample][name]).astype(np.float64)
                    report.unpinned[name] = float(np.abs(unpinned - np.asarray(candidate_out[name])).max())
        reports.append(report)
    return reports


def _reproduces(model_path: Path, feed: Mapping, reference: Mapping, output_names: Sequence[str]) -> bool:
    """The bundle's ONNX, run here as it is, gives its recorded outputs (fp32 parity tolerances): the pinned
    replay of that ONNX stands for the recorded reference only then."""
    from .parity import ort_session

    session = ort_session(model_path)
    names = [o.name for o in session.get_outputs() if o.name in output_names and o.name in reference]
    got = dict(zip(names, session.run(names, dict(feed))))
    return all(compare_elementwise(np.asarray(reference[n]), np.asarray(got[n]), 1e-4, 1e-3).passed for n in names)


def _op_args(args: Sequence[torch.Tensor | None], present: Sequence[bool]) -> tuple:
    """The node's inputs as the op's arguments: an argument that was None in PyTorch was exported as ones."""
    return tuple(arg if here else None for arg, here in zip(args, list(present) + [True] * len(args)))

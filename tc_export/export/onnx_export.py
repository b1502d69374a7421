"""PyTorch -> ONNX: static token shapes, optional dynamic batch, folded and cleaned, checker-clean."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from ..errors import ConfigError, TCExportError
from ..ops.tokens import lower_custom_ops, plain_ops
from .files import atomic_output
from .functions import plan_functions

MIN_OPSET = 17
MAX_OPSET = 23


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export settings: opset, batch size, whether the batch dimension stays symbolic.

    ``functions``: each token op site is one ``tc_export`` node calling a model-local function
    (``export/functions.py``); False exports the flat graph.
    """

    opset: int = 18
    batch: int = 1
    dynamic_batch: bool = False
    functions: bool = True

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {self.opset}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: Path,
    config: ExportConfig,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] = ("logits",),
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` to ``path`` (atomically) and return the cleaned model.

    ``example_inputs`` are keyed by forward-argument name; ``input_names`` renames them in the ONNX graph.
    With ``dynamic_batch`` the example batch must be >= 2 (torch.export specialises a batch of 1).
    """
    dynamic_shapes = None
    if config.dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = {name: {0: batch} for name in example_inputs}
    plan = plan_functions(module, example_inputs, config.opset, config.dynamic_batch) if config.functions else None
    module = lower_custom_ops(plan.module if plan else module)
    try:
        with _quiet(), plain_ops(), (plan.registered() if plan else contextlib.nullcontext()):
            program = torch.onnx.export(
                module,
                (),
                kwargs=dict(example_inputs),
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names),
                opset_version=config.opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
                verbose=False,
                custom_translation_table=plan.translation_table() if plan else None,
            )
    except Exception as error:
        raise TCExportError(f"ONNX export failed: {_summary(error)}") from error
    model = clean_onnx(program.model_proto)
    if plan:
        plan.attach(model)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise TCExportError(f"the exported ONNX fails the ONNX checker: {_summary(error)}") from error
    with atomic_output(path) as tmp:
        onnx.save_model(model, str(tmp))
    return model


def clean_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and drop dead nodes with onnx-graphsurgeon, then sort topologically."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    with _quiet():
        graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    cleaned.producer_name = "tc-export"
    return cleaned


def _summary(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Error" in line or "error" in line:
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


@contextlib.contextmanager
def _quiet():
    """The exporter and graphsurgeon print progress; keep the CLI output ours."""
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

"""PyTorch -> ONNX: static token shapes, optional dynamic batch, folded and cleaned, checker-clean."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ..errors import ConfigError, TCExportError
from ..ops.tokens import lower_custom_ops, plain_ops
from .exporter_log import quiet as _quiet
from .exporter_log import summary as _summary
from .files import atomic_output, atomic_outputs, data_file_name
from .functions import plan_functions

MIN_OPSET = 17
MAX_OPSET = 23


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export settings: opset, batch size, whether the batch dimension stays symbolic.

    ``functions``: each token op site is one ``tc_export`` node calling a model-local function
    (``export/functions.py``); False exports the flat graph. ``external_data``: the weights go into one data file
    beside the ONNX (``files.data_file_name``), as they always do when the model is over protobuf's 2 GB limit.
    """

    opset: int = 18
    batch: int = 1
    dynamic_batch: bool = False
    functions: bool = True
    external_data: bool = False
    dtype: str = "fp32"  # of the weights and compute (export/precision.py); inputs and outputs stay fp32

    def __post_init__(self) -> None:
        from .precision import torch_dtype

        torch_dtype(self.dtype)  # a one-line error for an unknown dtype
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
    """Export ``module`` to ``path`` (atomically) and return the cleaned model (read back from ``path``).

    ``example_inputs`` are keyed by forward-argument name; ``input_names`` renames them in the ONNX graph.
    With ``dynamic_batch`` the example batch must be >= 2 (torch.export specialises a batch of 1).
    Holding the returned proto costs a copy of every weight: ``write_onnx`` does the same export without it.
    """
    write_onnx(module, example_inputs, path, config, input_names, output_names, metadata)
    return onnx.load(str(path))


def write_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: Path,
    config: ExportConfig,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] = ("logits",),
    metadata: Mapping[str, str] | None = None,
) -> int:
    """``export_onnx`` without returning the model: returns the number of nodes of its main graph.

    Peak memory is about one copy of the weights besides ``module``'s own (see ``_held_weights``).
    """
    dynamic_shapes = None
    if config.dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = {name: {0: batch} for name in example_inputs}
    plan = plan_functions(module, example_inputs, config.opset, config.dynamic_batch) if config.functions else None
    module = lower_custom_ops(plan.module if plan else module)
    try:
        with _quiet(), plain_ops(), (plan.registered() if plan else contextlib.nullcontext()):
            export = functools.partial(
                torch.onnx.export,
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
            program = export()
    except Exception as error:
        raise TCExportError(f"ONNX export failed: {_summary(error)}") from error
    weights = _held_weights(program.model)
    model = clean_onnx(program.model_proto, weights)
    del program
    if plan:
        plan.attach(model)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    if config.external_data or needs_external_data(model, weights):
        with atomic_outputs(path, data_file_name(path)) as (tmp, tmp_data):
            _save_external(model, weights, tmp, tmp_data, data_file_name(path).name)
            try:  # on the path: the checker reads the graph and checks the data file it names, not the weights
                onnx.checker.check_model(str(tmp), full_check=True)
            except Exception as error:
                raise TCExportError(f"the exported ONNX fails the ONNX checker: {_summary(error)}") from error
        return len(model.graph.node)
    try:
        _check_weightless(model)
    except Exception as error:
        raise TCExportError(f"the exported ONNX fails the ONNX checker: {_summary(error)}") from error
    with atomic_output(path) as tmp:
        _save_with_weights(model, weights, tmp)
    return len(model.graph.node)


def needs_external_data(model: onnx.ModelProto, weights: Mapping[str, ir.TensorProtocol]) -> bool:
    """Whether ``model`` with its held ``weights`` is over protobuf's 2 GB limit for one file."""
    return model.ByteSize() + sum(tensor.nbytes for tensor in weights.values()) > onnx.checker.MAXIMUM_PROTOBUF


# Initializers at least this large stay in the exported program (which shares them with the module's parameters)
# until the file is written; smaller ones are serialized with the graph as usual.
HELD_WEIGHT_BYTES = 1 << 16
_HELD_LOCATION = "tc_export-held-weight"  # marks a placeholder (see _check_weightless)


def _held_weights(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Replace the large initializers of ``model`` by weightless placeholders; return the originals by name.

    Why: serializing the program (``model_proto``), cleaning it (graphsurgeon copies every initializer into the
    graph it exports), checking it and saving it (both serialize the whole proto to bytes) each made another full
    copy of the weights, several alive at once. With placeholders, the graph goes through those steps without
    its weights, and ``_save_with_weights`` writes each weight from the original tensor, one at a time.
    The placeholders are external-data references to a location that does not exist.
    """
    held = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < HELD_WEIGHT_BYTES:
            continue
        held[value.name] = tensor
        value.const_value = ir.ExternalTensor(
            _HELD_LOCATION, None, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name
        )
    return held


def _is_held(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == "location" and entry.value == _HELD_LOCATION for entry in tensor.external_data
    )


def _check_weightless(model: onnx.ModelProto) -> None:
    """The ONNX checker (full check) on ``model`` with its held initializers still placeholders.

    Given a proto, the checker serializes it to bytes and parses them again in C++; given a file, it reads and
    parses the whole file: both cost copies of every weight. The placeholders keep each weight's name, type and
    shape, and initializers under ``HELD_WEIGHT_BYTES`` keep their values (the shapes, axes... that shape
    inference reads); the weights are written by the same serializer as before. So the checker reads the
    weightless model from a temporary file, next to an empty file at the placeholders' external-data location
    (it checks that this is a regular file).
    """
    with tempfile.TemporaryDirectory(prefix="tc_export-check-") as folder:
        (Path(folder) / _HELD_LOCATION).touch()
        onnx.save_model(model, str(Path(folder) / "model.onnx"))
        onnx.checker.check_model(str(Path(folder) / "model.onnx"), full_check=True)


def _save_with_weights(model: onnx.ModelProto, weights: Mapping[str, ir.TensorProtocol], path: Path) -> None:
    """Write ``model`` with its held initializers filled in, as one ordinary ONNX file (weights inline).

    A protobuf parser merges repeated occurrences of a message field and appends to repeated fields, so the
    model without initializers followed by one ``ModelProto(graph=GraphProto(initializer=[t]))`` per initializer
    parses to the same model as ``onnx.save_model`` writes, with its initializers in the same order; this way
    only one weight at a time is serialized.
    """
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    del shell.graph.initializer[:]
    with open(path, "wb") as file:
        file.write(shell.SerializeToString())
        del shell
        for tensor in model.graph.initializer:
            if _is_held(tensor):
                filled = onnx.TensorProto()
                ir.serde.serialize_tensor_into(filled, weights[tensor.name])
                filled.name = tensor.name
                tensor = filled
            file.write(onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor])).SerializeToString())


# Offsets in the data file are multiples of this (as onnx's own external-data writer aligns large tensors), so a
# runtime may memory-map each weight.
EXTERNAL_ALIGNMENT = 4096


def _save_external(model: onnx.ModelProto, weights: Mapping[str, ir.TensorProtocol], path: Path, data_path: Path,
                   location: str) -> None:
    """Write ``model`` to ``path`` with its held initializers in ``data_path`` (named ``location`` in the ONNX).

    Each weight is written from its original tensor, one at a time; the ONNX itself holds only the graph and the
    small initializers (under ``HELD_WEIGHT_BYTES``).
    """
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    with open(data_path, "wb") as data:
        for tensor in shell.graph.initializer:
            if not _is_held(tensor):
                continue
            offset = -data.tell() % EXTERNAL_ALIGNMENT
            data.write(b"\0" * offset)
            offset = data.tell()
            data.write(weights[tensor.name].tobytes())
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)),
                               ("length", str(data.tell() - offset))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(shell, str(path))


def clean_onnx(model: onnx.ModelProto, weights: Mapping[str, ir.TensorProtocol] | None = None) -> onnx.ModelProto:
    """Fold constants and drop dead nodes with onnx-graphsurgeon, then sort topologically.

    ``weights``: the values of ``model``'s held (placeholder) initializers, read only if a fold needs them.
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    if weights:
        held_values = _held_values_class()
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, gs.ir.tensor.LazyValues) \
                    and _is_held(tensor._values.tensor):
                tensor._values = held_values(tensor._values.tensor, weights[tensor._values.tensor.name])
    with _quiet():
        graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    cleaned.producer_name = "tc-export"
    return cleaned


@functools.cache
def _held_values_class() -> type:
    from onnx_graphsurgeon.ir.tensor import LazyValues

    class HeldValues(LazyValues):
        """A held initializer in graphsurgeon: exported as its placeholder, loaded from the original tensor."""

        def __init__(self, placeholder: onnx.TensorProto, original: ir.TensorProtocol) -> None:
            super().__init__(placeholder)
            self.original = original

        def load(self):
            return np.array(self.original.numpy())

    return HeldValues

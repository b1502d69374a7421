"""Tracing an ``nn.Module`` into a ``torch.fx.GraphModule`` and recording shapes on it."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import StructureNotFoundError


def _concrete_defaults(module: torch.nn.Module, input_names: list[str]) -> dict[str, object]:
    """Optional forward arguments that are not model inputs, fixed to their defaults (e.g. ``attn_mask=None``)."""
    parameters = inspect.signature(module.forward).parameters
    return {
        name: p.default
        for name, p in parameters.items()
        if name not in input_names
        and p.default is not inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def trace(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Trace with ``torch.fx.symbolic_trace`` (shapes stay symbolic); fall back to ``torch.export``.

    ``symbolic_trace`` keeps ``x.shape`` reads as graph nodes, so a pass that changes the token count mid-graph
    needs no shape rewriting. Models it cannot trace (Hugging Face transformers 5.x) go through
    ``torch.export`` and are unlifted to a GraphModule with ATen ops.
    """
    module = module.eval()
    names = list(example_inputs)
    try:
        return fx.symbolic_trace(module, concrete_args=_concrete_defaults(module, names))
    except Exception as fx_error:  # noqa: BLE001 - any tracer failure means: try the other tracer
        try:
            return _export_any_batch(module, example_inputs)
        except Exception as export_error:
            raise StructureNotFoundError(
                f"could not trace {type(module).__name__}: torch.fx said {str(fx_error).splitlines()[0]!r}; "
                f"torch.export said {str(export_error).splitlines()[0]!r}"
            ) from export_error


def _export_any_batch(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """``torch.export`` with a symbolic batch (traced at batch 2: an example batch of 1 would be specialised)."""
    doubled = {name: torch.cat([value, value]) if value.shape[0] == 1 else value for name, value in example_inputs.items()}
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            module, (), doubled, dynamic_shapes={name: {0: batch} for name in doubled}, strict=False
        )
    return program.module()


def propagate_shapes(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> None:
    """Record each node's output shape in ``node.meta['tensor_meta']`` by running the graph once."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [example_inputs[n.target] if n.target in example_inputs else _default_of(n) for n in placeholders]
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)


def _default_of(placeholder: fx.Node) -> object:
    if placeholder.args:
        return placeholder.args[0]
    return None

"""Pass protocol, results and the pass manager."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import fx

from ..errors import InternalError, TCExportError
from .invariants import ensure_token_ops
from .shapes import retarget_token_dims
from .trace import propagate_shapes


@dataclass(frozen=True)
class LayerTokens:
    """Token counts at one attention site after compression."""

    layer: int
    site: str
    tokens_in: int
    tokens_out: int
    action: str  # e.g. "merge r=16", "-" when the layer keeps every token


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)
    new_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # example values of inputs the pass added


class GraphPass(Protocol):
    """A graph pass: rewrites ``gm`` in place (shapes already propagated) and says whether it changed it."""

    name: str

    def __call__(self, gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> PassResult: ...


def run_passes(
    gm: fx.GraphModule, passes: Sequence[GraphPass], example_inputs: Mapping[str, torch.Tensor]
) -> fx.GraphModule:
    """Run passes in order, then check what they promise (``ensure_token_ops``); a failure names the pass.

    Errors the user can act on (a structure the passes refuse, a bad setting) pass through as they are; anything
    else a pass raises is a bug in the pass and is reported as an internal error, never as the user's fault.
    """
    done: list[str] = []
    example_inputs = dict(example_inputs)
    for graph_pass in passes:
        propagate_shapes(gm, example_inputs)
        after = f" (after {', '.join(done)})" if done else ""
        try:
            result = graph_pass(gm, example_inputs)
            gm = result.graph_module
            example_inputs.update(result.new_inputs)
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        except TCExportError:
            raise
        except Exception as error:
            raise InternalError(f"pass {graph_pass.name}{after} failed: {_first_line(error)}") from error
        try:
            retarget_token_dims(gm, example_inputs)
            propagate_shapes(gm, example_inputs)
        except TCExportError:
            raise
        except Exception as error:
            raise InternalError(
                f"pass {graph_pass.name}{after} produced a graph that does not run: {_first_line(error)}"
            ) from error
        ensure_token_ops(gm, example_inputs)
        done.append(graph_pass.name)
    return gm


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

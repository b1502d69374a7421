"""Pass protocol, results and the pass manager."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import fx

from ..errors import StructureNotFoundError, TCExportError
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


class GraphPass(Protocol):
    """A graph pass: rewrites ``gm`` in place (shapes already propagated) and says whether it changed it."""

    name: str

    def __call__(self, gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> PassResult: ...


def run_passes(
    gm: fx.GraphModule, passes: Sequence[GraphPass], example_inputs: Mapping[str, torch.Tensor]
) -> fx.GraphModule:
    """Run passes in order, re-checking shapes after each; a failure names the pass and those before it."""
    done: list[str] = []
    for graph_pass in passes:
        propagate_shapes(gm, example_inputs)
        try:
            result = graph_pass(gm, example_inputs)
            gm = result.graph_module
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
            retarget_token_dims(gm, example_inputs)
            propagate_shapes(gm, example_inputs)
        except TCExportError:
            raise
        except Exception as error:
            after = f" (after {', '.join(done)})" if done else ""
            raise StructureNotFoundError(
                f"pass {graph_pass.name}{after} produced a graph that does not run: {str(error).splitlines()[0]}"
            ) from error
        done.append(graph_pass.name)
    return gm

"""Merge and selection decisions, compared between PyTorch and ONNX Runtime apart from numeric error.

A near-tie in merge or selection scores can flip between runtimes (or in reduced precision) and move an output
far beyond any tolerance, though nothing is wrong with either. Each token op's output sizes record its decisions
(which tokens merged into which, which survived), so comparing them site by site tells a flipped tie (sizes
differ from some site on) from a numeric bug (all sizes agree, values do not). Needs the token ops as
``tc_export`` local-function nodes in the ONNX (their second output is the sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..ops.base import TokenOp

DOMAIN = "tc_export"


@dataclass
class DecisionReport:
    sites: int
    differing: list[tuple[int, int]] = field(default_factory=list)  # (site index, tokens whose size differs)

    def describe(self) -> str:
        if not self.sites:
            return "decisions not compared (no tc_export function nodes: a flat export)"
        if not self.differing:
            return f"all {self.sites} token-op sites made the same decisions: the difference is numeric"
        first, tokens = self.differing[0]
        return (f"{len(self.differing)} of {self.sites} token-op sites decided differently (first: site {first}, "
                f"{tokens} tokens): near-tied scores flipped, not a numeric bug")


def compare_decisions(reference: list[np.ndarray], candidate: list[np.ndarray]) -> DecisionReport:
    """Sizes per site (B, N, 1), in site order, from two runtimes: the sites whose sizes differ, and by how many
    tokens. Only the first differing site is a decision of its own; later ones may follow from it."""
    pairs = [(i, ref, cand) for i, (ref, cand) in enumerate(zip(reference, candidate)) if ref.size and cand.size]
    report = DecisionReport(len(pairs))  # a site without sizes on one side (pruning, no sizes yet) is not compared
    for index, ref, cand in pairs:
        if ref.shape != cand.shape:
            report.differing.append((index, int(max(ref.size, cand.size))))
            continue
        tokens = int(np.sum(~np.isclose(ref, cand, rtol=0, atol=1e-3)))
        if tokens:
            report.differing.append((index, tokens))
    return report


def torch_site_sizes(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """The sizes each token op returns, in execution order."""
    captured: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(_sizes(out)))
             for m in module.modules() if isinstance(m, TokenOp)]
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _sizes(out: object) -> np.ndarray:
    size = out[1] if isinstance(out, tuple) else None
    return np.empty(0) if size is None else size.detach().float().numpy()


def onnx_site_sizes(path: Path, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The sizes output of every ``tc_export`` node, in graph order (ONNX Runtime on a copy exposing them)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    names = [node.output[1] for node in model.graph.node if node.domain == DOMAIN and len(node.output) > 1]
    if not names:
        return []
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(value) for value in session.run(names, dict(feed))]


def check_decisions(module: torch.nn.Module, path: Path, inputs: Mapping[str, torch.Tensor],
                    feed: Mapping[str, np.ndarray]) -> DecisionReport:
    return compare_decisions(torch_site_sizes(module, inputs), onnx_site_sizes(path, feed))

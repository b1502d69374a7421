"""Merge and selection decisions, order included, compared between PyTorch and ONNX Runtime apart from numeric error.

A near-tie in merge or selection scores can flip between runtimes (or in reduced precision) and move an output
far beyond any tolerance, though nothing is wrong with either. The order of the tokens an op returns is a
decision too: without a class token the published ToMe leaves the unmerged tokens in descending score order,
and that order decides the next layer's A/B split, so one near-tie in that sort moves every later merge.

Each token op is replayed in PyTorch on the inputs each runtime gave it, with the identity matrix in place of the
tokens: row ``i`` of the result says which input tokens (and with which weights) output token ``i`` holds. Equal
results mean equal decisions, order included; the same rows in another order mean only the order flipped. An op
whose output is not that matrix times its tokens (its decisions read the tokens themselves) is compared by its
output sizes. Needs the token ops as ``tc_export`` local-function nodes in the ONNX (their inputs are read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ...ops.base import TokenOp
from ...ops.rows import NORM_FLOOR, tie_cosines, top_k
from ...ops.tome import ToMeMerge, protection_mask
from ...ops.units import UnitOp
from .site_outputs import site_nodes_of as site_nodes  # the tc_export token-op nodes, in graph order

_SAME = 1e-4  # provenance weights are exact up to float rounding; different decisions differ by O(1)


@dataclass(frozen=True)
class SiteCall:
    """One token op as one runtime ran it: the op (the PyTorch module), its inputs and its output sizes."""

    name: str
    op: TokenOp
    inputs: tuple[torch.Tensor | None, ...]  # x, size, *signals
    sizes: np.ndarray
    output: torch.Tensor | None = None  # the output tokens, when asked for
    decisions: tuple[torch.Tensor, ...] | None = None  # the indices the runtime's decision TopKs chose, when read


@dataclass(frozen=True)
class SiteDifference:
    """The first op whose decisions differ, and what differs: which tokens went where (``merge``) or only the
    order of the same tokens (``order``); ``margin``: the score gap of the near-tie that flipped, when known."""

    index: int
    name: str
    kind: Literal["merge", "order"]
    tokens: int
    margin: float | None = None
    hint: str = ""

    def describe(self) -> str:
        margin = f", score margin {self.margin:.1e}" if self.margin is not None else ""
        if self.kind == "order":
            what = (f"the same tokens in another order ({self.tokens} tokens moved{margin}): a near-tie in the "
                    "order of the unmerged tokens flipped, and that order decides the next layer's A/B split")
        else:
            what = f"{self.tokens} tokens{margin}: near-tied scores flipped"
        return f"site {self.index} ({self.name}), {what}"


@dataclass
class DecisionReport:
    sites: int
    differing: list[SiteDifference] = field(default_factory=list)  # in site order; the first is a decision of its own
    seed: int | None = None  # the parity input compared (a failing one)

    def describe(self) -> str:
        if not self.sites:
            return "decisions not compared (no tc_export function nodes: a flat export)"
        if not self.differing:
            on = f" on the input of seed {self.seed}" if self.seed is not None else ""
            return (f"all {self.sites} token-op sites made the same decisions{on}, token order included: the "
                    "difference is numeric")
        first = self.differing[0]
        hint = f"; {first.hint}" if first.hint else ""
        on = f" on the input of seed {self.seed}" if self.seed is not None else ""
        return (f"{len(self.differing)} of {self.sites} token-op sites decided differently{on}, first at "
                f"{first.describe()}; not a numeric bug{hint}")


def compare_sites(reference: list[SiteCall], candidate: list[SiteCall]) -> DecisionReport:
    """Each site's decisions (order included) from two runtimes. Only the first differing site is a decision of its
    own; later ones may follow from it. A site without sizes on one side (no sizes yet) is not compared."""
    pairs = [(i, ref, cand) for i, (ref, cand) in enumerate(zip(reference, candidate))
             if ref.sizes.size and cand.sizes.size]
    report = DecisionReport(len(pairs))
    for index, ref, cand in pairs:
        difference = _site_difference(index, ref, cand)
        if difference is not None:
            report.differing.append(difference)
    return report


def _site_difference(index: int, ref: SiteCall, cand: SiteCall) -> SiteDifference | None:
    ref_rows, cand_rows = provenance(ref), provenance(cand)
    if ref_rows is None or cand_rows is None:  # decisions read the tokens: compare what the sizes record
        return _size_difference(index, ref, cand)
    if ref_rows.shape != cand_rows.shape:
        return SiteDifference(index, ref.name, "merge", int(max(ref_rows.shape[1], cand_rows.shape[1])))
    if torch.allclose(ref_rows, cand_rows, rtol=0, atol=_SAME):
        return None
    kind, tokens = row_changes(ref_rows, cand_rows)
    margin = tome_margin(ref, cand, kind) if isinstance(ref.op, ToMeMerge) else None
    hint = ""
    if kind == "order" and isinstance(ref.op, ToMeMerge) and not _sorts_unmerged(ref.op):
        hint = ("export with --sort-unmerged (unmerged tokens keep their original order, which no tie can flip) to "
                "make the export tie-robust")
    elif kind == "merge":
        hint = ("a tie in the decision itself flips with any rounding; parity on other inputs (--seed) shows whether "
                "it is this input's near-tie")
    return SiteDifference(index, ref.name, kind, tokens, margin, hint)


def _size_difference(index: int, ref: SiteCall, cand: SiteCall) -> SiteDifference | None:
    if ref.sizes.shape != cand.sizes.shape:
        return SiteDifference(index, ref.name, "merge", int(max(ref.sizes.size, cand.sizes.size)))
    tokens = int(np.sum(~np.isclose(ref.sizes, cand.sizes, rtol=0, atol=1e-3)))
    return SiteDifference(index, ref.name, "merge", tokens) if tokens else None


def provenance(call: SiteCall) -> torch.Tensor | None:
    """(B, N_out, N_in): the op replayed on the identity, so row ``i`` holds the weights of the input tokens in
    output token ``i``. None when the op's output is not that matrix times its tokens (or it cannot replay)."""
    x, *rest = call.inputs
    if x is None or x.dim() != 3:
        return None
    batch, tokens, _ = x.shape
    identity = torch.eye(tokens, dtype=x.dtype).expand(batch, tokens, tokens).contiguous()
    try:
        with torch.no_grad():
            rows = call.op(identity, *rest)[0]
            replayed = call.op(x, *rest)[0]
    except (RuntimeError, ValueError, IndexError):
        return None
    if rows.dim() != 3 or not torch.allclose(rows @ x, replayed, rtol=1e-4, atol=1e-4 * float(x.abs().max())):
        return None
    return rows


def row_changes(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[Literal["merge", "order"], int]:
    """``order`` with the number of rows that moved when ``candidate`` holds the rows of ``reference`` in another
    order; else ``merge`` with the number of reference rows the candidate does not hold."""
    distance = torch.cdist(reference.double(), candidate.double(), p=1)  # (B, N, N)
    nearest = distance.min(dim=-1)
    found = nearest.values < _SAME
    permutation = all(len(set(nearest.indices[b][found[b]].tolist())) == int(found[b].sum())
                      for b in range(reference.shape[0]))
    positions = torch.arange(reference.shape[1])
    moved = int((nearest.indices != positions).sum())
    if bool(found.all()) and permutation:
        return "order", moved
    return "merge", int((~found).sum()) or moved


def _sorts_unmerged(op: ToMeMerge) -> bool:
    return op.protected > 0 if op.sort_unmerged is None else bool(op.sort_unmerged)


def tome_margin(ref: SiteCall, cand: SiteCall, kind: str) -> float | None:
    """The reference's score gap behind the first flipped ToMe decision: between the two A tokens whose ranks
    swapped (among the merged ones for ``merge``, the unmerged ones for ``order``), or for a merged token whose
    match changed, between its best and second-best B token. None for padded or windowed merges."""
    op = ref.op
    if not isinstance(op, ToMeMerge) or op.padded or op.window is not None or len(ref.inputs) < 3:
        return None
    ref_best, ref_cols = _best_scores(ref.inputs[2], op.protected)
    cand_best, cand_cols = _best_scores(cand.inputs[2], op.protected)
    r = ref.inputs[0].shape[1] - op.tokens_out(ref.inputs[0].shape[1])
    ref_rank = top_k(ref_best[..., 0], ref_best.shape[1])[1]
    cand_rank = top_k(cand_best[..., 0], cand_best.shape[1])[1]
    ranks = range(r) if kind == "merge" else range(r, ref_rank.shape[1])
    for b in range(ref_rank.shape[0]):
        for p in ranks:
            i, j = int(ref_rank[b, p]), int(cand_rank[b, p])
            if i != j:
                return abs(float(ref_best[b, i, 0] - ref_best[b, j, 0]))
        for i in ref_rank[b, :r].tolist():
            if kind == "merge" and int(ref_cols[b, i, 0]) != int(cand_cols[b, i, 0]):
                return float(ref_best[b, i, 0] - ref_best[b, i, 1])
    return None


def _best_scores(metric: torch.Tensor, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's two best cosine scores over the B tokens and their columns, as ToMe scores them."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    scores = tie_cosines(metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2))
    scores = scores + protection_mask(scores.shape[1], scores.shape[2], protected, scores.dtype, scores.device)
    return top_k(scores, min(2, scores.shape[-1]))


def torch_site_calls(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[SiteCall]:
    """Each token op's inputs and output sizes, in execution order."""
    names = {m: name for name, m in module.named_modules()}
    captured: list[SiteCall] = []

    def hook(op, args, out):
        captured.append(SiteCall(names.get(op, type(op).__name__), op, tuple(args), _sizes(out)))

    # Ops on merge units export flat (no function node to compare): neither they nor the op they wrap are replayed.
    units = [m for m in module.modules() if isinstance(m, UnitOp)]
    flat = {id(m) for unit in units for m in unit.modules()}
    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, TokenOp) and id(m) not in flat]
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def _sizes(out: object) -> np.ndarray:
    size = out[1] if isinstance(out, tuple) else None
    return np.empty(0) if size is None else size.detach().float().numpy()


def onnx_site_calls(path: Path, feed: Mapping[str, np.ndarray], reference: list[SiteCall]) -> list[SiteCall]:
    """The inputs and sizes of every ``tc_export`` node, in graph order (ONNX Runtime on a copy exposing them),
    paired with the PyTorch ops of ``reference`` (same order) that replay them."""
    return onnx_site_run(path, feed, reference)[0]


def onnx_site_run(path: Path, feed: Mapping[str, np.ndarray], reference: list[SiteCall],
                  tokens_out: bool = False) -> tuple[list[SiteCall], dict[str, np.ndarray]]:
    """``onnx_site_calls`` and the graph's own outputs from the same run; ``tokens_out``: each call's ``output``
    holds the node's output tokens too. ONNX Runtime runs the verification variant (``site_outputs``), so each
    call carries the decisions the graph took (``SiteCall.decisions``)."""
    import onnx
    import onnxruntime as ort

    from .site_outputs import add_site_outputs

    model = onnx.load(str(path))
    outputs = [o.name for o in model.graph.output]
    if not site_nodes(model):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [], dict(zip(outputs, session.run(outputs, dict(feed))))
    add_site_outputs(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = [o.name for o in session.get_outputs()]
    values = dict(zip(fetched, session.run(fetched, dict(feed))))
    return calls_from_outputs(values, reference, tokens_out), {name: values[name] for name in outputs}


def calls_from_outputs(values: Mapping[str, np.ndarray], reference: list[SiteCall],
                       tokens_out: bool = False) -> list[SiteCall]:
    """The sites' calls from a run's outputs read by their ``site_outputs`` names (ONNX Runtime on the verification
    variant, or an engine built from it), paired with the PyTorch ops of ``reference`` (same order)."""
    from .site_outputs import site_output, topk_output

    sites = 0
    while site_output(sites, "out", 1) in values:
        sites += 1
    calls = [SiteCall(ref.name, ref.op, (None,), np.empty(0)) for ref in reference]  # flat sites: not compared
    shapes_in = [np.shape(values.get(site_output(i, "in", 0))) for i in range(sites)]
    shapes_out = [np.shape(values[site_output(i, "out", 1)]) for i in range(sites)]
    for site, index in enumerate(pair_nodes(reference, shapes_in, shapes_out)):
        ref = reference[index]
        given = [torch.from_numpy(np.asarray(values[name])) for name in
                 sorted((n for n in values if n.startswith(site_output(site, "in", ""))),
                        key=lambda n: int(n.rsplit("_", 1)[1]))]
        present = [arg is not None for arg in ref.inputs]
        if len(given) == len(present):  # an absent size was exported as ones: the same decisions
            inputs = tuple(given)
        elif len(given) == sum(present):
            rest = iter(given)
            inputs = tuple(next(rest) if here else None for here in present)
        else:  # the function's inputs are not the op's arguments: compared by sizes only
            inputs = (None,)
        output = torch.from_numpy(np.asarray(values[site_output(site, "out", 0)])) if tokens_out else None
        decisions, j = [], 0
        while topk_output(site, j, "indices") in values:  # a TopK over scores is a decision; over int64, a sort
            if np.issubdtype(np.asarray(values[topk_output(site, j, "values")]).dtype, np.floating):
                decisions.append(torch.from_numpy(np.asarray(values[topk_output(site, j, "indices")]).astype(np.int64)))
            j += 1
        calls[index] = SiteCall(ref.name, ref.op, inputs, np.asarray(values[site_output(site, "out", 1)]), output,
                                tuple(decisions) if j else None)
    return calls


def pair_nodes(reference: Sequence[SiteCall], tokens_in: Sequence[tuple], sizes_out: Sequence[tuple]) -> list[int]:
    """For each token-op node (in graph order) the index of its call in ``reference`` (execution order): the next
    call whose tokens in and out have the node's counts. A site the exporter left flat (outside its function's
    traced range) has no node and is skipped; a call without recorded tensors matches the next node."""
    indices, j = [], 0
    for shape_in, shape_out in zip(tokens_in, sizes_out):
        while j < len(reference) and not _matches(reference[j], shape_in, shape_out):
            j += 1
        if j >= len(reference):
            break
        indices.append(j)
        j += 1
    return indices


def _matches(call: SiteCall, shape_in: tuple, shape_out: tuple) -> bool:
    x = call.inputs[0] if call.inputs else None
    if x is None or not x.numel():
        return True
    if tuple(x.shape) != tuple(shape_in):
        return False
    return not call.sizes.size or call.sizes.shape[1] == shape_out[1]


def _value_types(model) -> dict[str, int]:
    """Element types of the graph's values, as far as ONNX shape inference knows them."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types are a help; FLOAT is the fallback
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}


def check_decisions(module: torch.nn.Module, path: Path, inputs: Mapping[str, torch.Tensor],
                    feed: Mapping[str, np.ndarray]) -> DecisionReport:
    reference = torch_site_calls(module, inputs)
    return compare_sites(reference, onnx_site_calls(path, feed, reference))

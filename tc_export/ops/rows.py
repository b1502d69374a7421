"""Row gathers shared by the compressed ops."""

from __future__ import annotations

import torch
from torch import Tensor

# Denominator floor for size- and attention-weighted averages: a token of size 0 (padding) that receives
# nothing stays as it is instead of becoming 0/0.
WEIGHT_FLOOR = 1e-12
# Norm floor for L2-normalised keys (F.normalize's eps): a zero key (e.g. a zero-initialised class or register
# token's) gets similarity 0 instead of NaN, which would sort unpredictably and differently in every runtime.
NORM_FLOOR = 1e-12
# Cosines above this count as equal (they are capped to it): identical keys (a repeated token with no position
# signal, as in T5's first layer, or a repeated frame) score 1 up to their rounding error, which differs between
# runtimes and between keys, so their exact tie would be decided by rounding. Capped, they tie exactly and the
# lower index wins everywhere (``top_k``). 2**-16 is ~20x the fp32 error of a unit vector's cosine with itself.
COSINE_CAP = 1.0 - 2.0**-16


def gather_rows(x: Tensor, rows: Tensor, stride: int = 1, offset: int = 0) -> Tensor:
    """Rows ``stride * rows + offset`` of each batch item of ``x`` (B, N, C), for ``rows`` (B, k).

    One Gather over the flattened (B*N, C) rows: a row copy per index, where ``torch.gather`` with an expanded
    index would export to GatherElements and read an index per element.
    """
    batch, num_tokens, channels = x.shape
    batch_start = torch.arange(batch, device=x.device).unsqueeze(-1) * num_tokens
    flat = rows * stride + (batch_start + offset)
    return x.reshape(batch * num_tokens, channels).index_select(0, flat.reshape(-1)).reshape(batch, -1, channels)


def top_k(values: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (``largest=False``: smallest) entries along the last dimension and their indices, best
    first, exact ties lower index first: in PyTorch and in the exported graph alike.

    ONNX TopK orders exact ties lower index first (its specification; ONNX Runtime does, and so do this package's
    plugin kernels); ``torch.topk`` leaves the order unspecified and its CPU kernel does not keep it, so padding,
    repeated tokens or zero keys (exact ties) were decided one way in PyTorch and another in the graph. Eagerly the
    order comes from a stable sort (first occurrence for ``k == 1``: ``argmax``/``argmin``), which keeps ties in
    index order; ``aten.sort.stable`` has no ONNX translation, so under ``torch.export`` the same selection is
    traced as ``topk``, one TopK(k) node.
    """
    if torch.compiler.is_exporting():
        return values.topk(k, dim=-1, largest=largest)
    if k == 1:
        index = (values.argmax if largest else values.argmin)(dim=-1, keepdim=True)
        return values.gather(-1, index), index
    ordered = values.sort(dim=-1, descending=largest, stable=True)
    return ordered.values[..., :k], ordered.indices[..., :k]


def tie_cosines(scores: Tensor) -> Tensor:
    """Cosine ``scores`` with every value above ``COSINE_CAP`` set to it (one Min node): identical keys tie exactly."""
    return scores.clamp_max(COSINE_CAP)


def sort_indices(rows: Tensor) -> Tensor:
    """Index values sorted ascending, as one TopK over int64 (TensorRT and ONNX Runtime both take it)."""
    return top_k(rows, rows.shape[-1], largest=False)[0]


def one_hot_columns(columns: Tensor, num_columns: int, dtype: torch.dtype) -> Tensor:
    """(B, k) column indices -> (B, num_columns, k) one-hot: entry [b, j, i] = 1 where columns[b, i] == j."""
    positions = torch.arange(num_columns, device=columns.device).unsqueeze(-1)
    return (columns.unsqueeze(1) == positions).to(dtype)


def pad_aware_scores(
    scores: Tensor, pad_first: Tensor, pad_second: Tensor, positions: Tensor | None = None, pairs: int | None = None
) -> Tensor:
    """Cosine scores of token pairs with padding kept out of real tokens' choices (masks broadcast to ``scores``).

    Pad-to-pad pairs score above any cosine (2 to 2.5), so merges use up padding first; pad-to-real pairs score
    below any cosine (-2.5 to -2), so a real token never picks a pad and a pad's content never moves a real
    token's choice. The fraction orders these otherwise equal scores by position (earlier pairs first), so every
    runtime breaks the ties the same way. ``positions`` / ``pairs``: when ``scores`` holds only some of the pairs
    (a band), each entry's row-major index in the full (rows, columns) matrix (float) and that matrix's size;
    default: ``scores`` is the full matrix.
    """
    if positions is None:
        pairs = scores[0].numel()
        positions = torch.arange(pairs, device=scores.device, dtype=scores.dtype).reshape(scores.shape[1:])
    order = 0.5 * (1.0 - positions / pairs)
    return torch.where(pad_first & pad_second, 2.0 + order, torch.where(pad_first | pad_second, -2.0 - order, scores))

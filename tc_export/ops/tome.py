"""ToMe bipartite soft matching and size-weighted merge, in static-shape form.

Behaviour (ToMe, Bolya et al. 2023): the metric (keys averaged over heads) is L2-normalised; tokens alternate
into A (even positions) and B (odd positions) over the whole sequence; each A token finds its most similar B
token; the ``r`` A tokens with the highest similarity are averaged (weighted by size) into their B match.
Protected prefix tokens (class, distillation, registers) never merge.

Output order, as the published code orders it: the protected tokens first, in their original order (with a
distillation token this is the reference's ``[cls, dist, unmerged A..., B...]``); then the unmerged A tokens, in
their original order when there is a protected prefix and in descending order of their best score when there is
none (the reference sorts them only "to keep the class token first"; ``sort_unmerged=True`` sorts them anyway);
then the unprotected B tokens in their original order.

Export form: no scatter, no data-dependent shapes, few nodes (at batch 1 every extra node shows). ``r`` is
resolved against the static token count; TopK ranks the A rows; row Gathers move tokens; the adds into B are one
one-hot matrix product.

``window`` (an option, not the published method, for long 1-D sequences such as audio frames): each A token at
A-index ``i`` is compared only with the B tokens at B-index ``i - window .. i + window`` (clamped to the sequence),
which makes the similarity linear in N instead of quadratic. The band is computed without the (N/2, N/2) matrix:
one Gather of B rows at the indices ``i + offset`` (offset -window..window) gives (B, N/2, 2*window+1, d), one
batched MatMul the band scores; out-of-range positions are masked with -inf and the TopK(1) band index maps back to
the B column by ``i + index - window``. The ranking and the merge are the global method's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CountedMergeOp
from .pinning import choose
from .rows import (
    NORM_FLOOR, WEIGHT_FLOOR, gather_rows, one_hot_columns, pad_aware_scores, sort_indices, tie_cosines,
)
from .state import size_column


def effective_r(num_tokens: int, r: int, protected: int) -> int:
    """The number of merges ToMe performs: ``r`` capped at half the unprotected tokens."""
    return max(0, min(r, (num_tokens - protected) // 2))


def protection_mask(num_a: int, num_b: int, protected: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive (num_a, num_b) mask: -inf on the rows/columns of the first ``protected`` tokens.

    Token ``t`` is A row ``t // 2`` when ``t`` is even and B column ``t // 2`` when odd.
    """
    mask = torch.zeros(num_a, num_b, dtype=dtype, device=device)
    for token in range(protected):
        if token % 2 == 0:
            mask[token // 2, :] = float("-inf")
        else:
            mask[:, token // 2] = float("-inf")
    return mask


def banded_scores(
    metric_a: Tensor, metric_b: Tensor, window: int, protected: int, pad: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scores of each A row against the B columns ``i - window .. i + window``: (B, num_a, 2*window+1) and (num_a, 1).

    The second tensor is the column of band entry 0 of each row (``i - window``): band entry ``k`` of row ``i`` is B
    column ``i - window + k``. Entries outside the sequence, protected A rows and protected B columns are -inf (as
    in the global matrix); ``pad`` (B, N) applies ``pad_aware_scores`` with each pair's index in the global matrix,
    so a band scores exactly the global matrix's entries.
    """
    num_a, num_b = metric_a.shape[1], metric_b.shape[1]
    device = metric_a.device
    rows = torch.arange(num_a, device=device).unsqueeze(-1)
    first = rows - window  # (num_a, 1)
    cols = first + torch.arange(2 * window + 1, device=device)  # (num_a, K)
    blocked = (cols < 0) | (cols >= num_b)
    cols = torch.where(blocked, torch.zeros_like(cols), cols)  # any in-range column; masked below
    flat = cols.reshape(-1)
    band_b = metric_b.index_select(1, flat).reshape(metric_b.shape[0], num_a, -1, metric_b.shape[-1])
    scores = tie_cosines((band_b @ metric_a.unsqueeze(-1)).squeeze(-1))  # (B, num_a, K)
    if pad is not None:
        pad_b = pad[:, 1::2].index_select(1, flat).reshape(scores.shape)
        positions = (rows * num_b + cols).to(scores.dtype)
        scores = pad_aware_scores(scores, pad[:, ::2].unsqueeze(-1), pad_b, positions, num_a * num_b)
    if protected:  # token t is A row t // 2 (even t) or B column t // 2 (odd t)
        blocked = blocked | (rows < (protected + 1) // 2) | (cols < protected // 2)
    return scores.masked_fill(blocked, float("-inf")), first


def bipartite_match(
    metric: Tensor, r: int, protected: int, pad: Tensor | None = None, sort_unmerged: bool | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching on (B, N, d) keys: (merged A rows by score, their B columns, unmerged unprotected A rows).

    One TopK(k=1) gives each A row its best B column and score; one TopK over all A rows ranks them, the first
    ``r`` merge. The unmerged rows keep that rank order, or (``sort_unmerged``, default: when ``protected``) are
    sorted back into their original order by a TopK over their int64 indices; the protected A rows (ranked last,
    their scores are -inf) are left out. ``pad`` (B, N) marks padding: pads pair with pads first and never with
    real tokens (``pad_aware_scores``). ``window``: search only the B columns within ``window`` of each A row's
    index (``banded_scores``; None: all of them, the published method).
    """
    metric = metric.float()  # scores and ranks in fp32 whatever the model's dtype (a no-op in fp32)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)  # a zero key scores 0, not NaN
    metric_a, metric_b = metric[:, ::2], metric[:, 1::2]
    num_a, num_b = metric_a.shape[1], metric_b.shape[1]
    if window is not None:
        scores, first = banded_scores(metric_a, metric_b, window, protected, pad)
        best_score, best_index = choose(scores, 1)
        best_col = best_index + first  # rows whose band is all -inf (protected) never merge: never read
    else:
        scores = tie_cosines(metric_a @ metric_b.transpose(-1, -2))
        if pad is not None:
            scores = pad_aware_scores(scores, pad[:, ::2].unsqueeze(-1), pad[:, 1::2].unsqueeze(-2))
        if protected:
            scores = scores + protection_mask(num_a, num_b, protected, scores.dtype, scores.device)
        best_score, best_col = choose(scores, 1)
    ranked = choose(best_score.squeeze(-1), num_a)[1]
    src_rows = ranked[:, :r]
    dst_cols = best_col.squeeze(-1).gather(-1, src_rows)
    protected_rows = (protected + 1) // 2
    if protected > 0 if sort_unmerged is None else sort_unmerged:
        unm_rows = sort_indices(ranked[:, r:])[:, protected_rows:]
    else:
        unm_rows = ranked[:, r:num_a - protected_rows]
    return src_rows, dst_cols, unm_rows


def tome_merge(
    x: Tensor, metric: Tensor, size: Tensor | None, r: int, protected: int, padded: bool = False,
    sort_unmerged: bool | None = None, window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge ``r`` tokens of ``x`` (B, N, C); returns the merged tokens (B, N - r', C) and their state (B, N - r', K).

    ``size``: the token state (B, N, K) (``ops.state``: the sizes, then positions times sizes when carried).

    ``size`` None means every token has size 1 (the first merge), which saves the size products. ``padded``:
    size-0 tokens are padding, matched only with each other (a model with a padding mask). ``window``: the
    local match search of ``bipartite_match`` (None: the published global search).
    """
    batch, num_tokens, _ = x.shape
    r = effective_r(num_tokens, r, protected)
    if r == 0:
        return x, (x.new_ones(batch, num_tokens, 1) if size is None else size)
    pad = size[..., 0] == 0 if padded and size is not None else None
    src_rows, dst_cols, unm_rows = bipartite_match(metric, r, protected, pad, sort_unmerged, window)
    num_b = num_tokens // 2
    tokens_b = x[:, 1::2]
    to_dst = one_hot_columns(dst_cols, num_b, x.dtype)  # [b, j, i] = 1 where merged row i goes into B column j
    # Size-weighted average written as an update of B: b_j + sum_i s_i (a_i - b_j) / (s_j + sum_i s_i).
    delta = gather_rows(x, src_rows, 2) - gather_rows(tokens_b, dst_cols)
    if size is None:
        size_b = 1.0 + to_dst.sum(-1, keepdim=True)
        size_unm = x.new_ones(batch, unm_rows.shape[1], 1)
    else:  # the whole state (sizes, and positions times sizes when carried) sums into B
        size_src = gather_rows(size, src_rows, 2)
        size_b = size[:, 1::2] + to_dst.to(size.dtype) @ size_src  # the state may be fp32 under fp16 tokens
        size_unm = gather_rows(size, unm_rows, 2)
        delta = size_column(size_src).to(x.dtype) * delta
    # the update in fp32 at least whatever the tokens' dtype (a no-op in fp32): a size-0 (padding) pair's weight is
    # 1 / WEIGHT_FLOOR, inf in fp16, times its zero delta
    exact = torch.promote_types(x.dtype, torch.float32)  # fp32, or the tokens' own dtype when wider (fp64)
    weights = to_dst.to(exact) / size_column(size_b).to(exact).clamp_min(WEIGHT_FLOOR)
    merged_b = tokens_b + (weights @ delta.to(exact)).to(x.dtype)
    unmerged = gather_rows(x, unm_rows, 2)
    # Protected B tokens (odd positions) receive no merges: their -inf columns are never a best match.
    protected_b = protected // 2
    if protected == 0:
        return torch.cat([unmerged, merged_b], dim=1), torch.cat([size_unm, size_b], dim=1)
    size_prefix = x.new_ones(batch, protected, 1) if size is None else size[:, :protected]
    return (
        torch.cat([x[:, :protected], unmerged, merged_b[:, protected_b:]], dim=1),
        torch.cat([size_prefix, size_unm, size_b[:, protected_b:]], dim=1),
    )


class ToMeMerge(CountedMergeOp):
    """One ToMe merge site: ``(x, size, metric) -> (x, size)`` with ``r`` and the protected count fixed.

    ``sort_unmerged``: None follows the published code (sorted only with a protected prefix); True/False forces it.
    ``window``: each A token searches only the B tokens within ``window`` B-indices (an option for long 1-D
    sequences, not the published method); None: the global search.
    """

    signals: tuple[str, ...] = ("metric",)

    def __init__(
        self, r: int, protected: int, padded: bool = False, sort_unmerged: bool | None = None,
        window: int | None = None, metric_is_tokens: bool = False,
    ) -> None:
        super().__init__(r, protected, padded)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a whole number >= 1 or None, got {window!r}")
        self.sort_unmerged = sort_unmerged
        self.window = window
        if metric_is_tokens:  # at a block input no keys exist yet: the tokens are wired in as the metric too, so
            self.signals = ("tokens",)  # the node is the plugin's ToMeMerge(x, size, metric) with metric = x

    def forward(self, x: Tensor, size: Tensor | None, metric: Tensor) -> tuple[Tensor, Tensor]:
        return tome_merge(x, metric, size, self.r, self.protected, self.padded, self.sort_unmerged, self.window)

    def extra_repr(self) -> str:
        return (super().extra_repr() + ("" if self.window is None else f", window={self.window}")
                + (", metric=tokens" if self.signals == ("tokens",) else ""))

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in - effective_r(tokens_in, self.r, self.protected)

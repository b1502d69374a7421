"""ToMe bipartite soft matching and size-weighted merge, in static-shape form.

Behaviour (ToMe, Bolya et al. 2023): the metric (keys averaged over heads) is L2-normalised; tokens alternate
into A (even positions) and B (odd positions); each A token finds its most similar B token; the ``r`` A tokens
with the highest similarity are averaged (weighted by size) into their B match. Protected prefix tokens (class,
distillation) never merge. Output order: unmerged A tokens in their original order, then all B tokens.

Export form: no scatter, no data-dependent shapes. ``r`` is resolved against the static token count; the
merged rows are picked with TopK(k=r); the unmerged rows, in their original order, with a second TopK over
position keys; the adds into B with a one-hot matrix product. Sizes ride along as an extra channel so one set
of gathers moves both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenOp


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


def tome_merge(x: Tensor, metric: Tensor, size: Tensor | None, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """Merge ``r`` tokens of ``x`` (B, N, C); returns the merged tokens (B, N - r', C) and their sizes (B, N - r', 1)."""
    batch, num_tokens, _ = x.shape
    if size is None:
        size = x.new_ones(batch, num_tokens, 1)
    r = effective_r(num_tokens, r, protected)
    if r == 0:
        return x, size

    metric = metric / metric.norm(dim=-1, keepdim=True)
    metric_a, metric_b = metric[:, ::2], metric[:, 1::2]
    num_a, num_b = metric_a.shape[1], metric_b.shape[1]
    scores = metric_a @ metric_b.transpose(-1, -2)
    if protected:
        scores = scores + protection_mask(num_a, num_b, protected, scores.dtype, scores.device)
    best_score, best_b = scores.max(dim=-1)  # (B, num_a)

    src_rows = best_score.topk(r, dim=-1).indices  # the r A tokens that merge
    dst_cols = best_b.gather(-1, src_rows)  # their B partners
    positions = torch.arange(num_a, device=x.device)
    is_src = (src_rows.unsqueeze(-1) == positions).any(dim=1)  # (B, num_a)
    # Unmerged rows in ascending position: the largest keys (num_a - position) among the non-merged rows.
    keep_key = torch.where(is_src, -1, num_a - positions)
    unm_rows = keep_key.topk(num_a - r, dim=-1).indices

    weighted = torch.cat([x * size, size], dim=-1)
    channels = weighted.shape[-1]
    tokens_a, tokens_b = weighted[:, ::2], weighted[:, 1::2]
    unmerged = tokens_a.gather(1, unm_rows.unsqueeze(-1).expand(-1, -1, channels))
    sources = tokens_a.gather(1, src_rows.unsqueeze(-1).expand(-1, -1, channels))
    to_dst = (dst_cols.unsqueeze(1) == torch.arange(num_b, device=x.device).unsqueeze(-1)).to(weighted.dtype)
    merged = torch.cat([unmerged, tokens_b + to_dst @ sources], dim=1)

    new_size = merged[..., -1:]
    return merged[..., :-1] / new_size, new_size


def proportional_bias(size: Tensor) -> Tensor:
    """log(size) of each key token as an additive attention bias, shaped (B, 1, 1, N)."""
    return size.log().flatten(1)[:, None, None, :]


class ToMeMerge(TokenOp):
    """One ToMe merge site: ``(x, metric, size) -> (x, size)`` with ``r`` and the protected count fixed."""

    def __init__(self, r: int, protected: int) -> None:
        super().__init__()
        if r < 0 or protected < 0:
            raise ValueError("r and protected must be >= 0")
        self.r = r
        self.protected = protected

    def forward(self, x: Tensor, metric: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return tome_merge(x, metric, size, self.r, self.protected)

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.protected}"

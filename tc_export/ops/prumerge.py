"""Prune-and-merge with a fixed budget (after LLaVA-PruMerge), in static-shape form.

Behaviour: keep the ``tokens`` unprotected tokens with the highest class attention (in their original order);
every pruned token is merged into its most similar kept token (cosine of the keys averaged over heads). A kept
token becomes the class-attention-weighted average of itself and the tokens merged into it; sizes add up. With
``extra``, one more token at the end holds the class-attention-weighted average of all pruned tokens (its size
is their total size). PruMerge's own budget (the IQR outlier count) is data-dependent; the budget here is fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenOp
from .rows import WEIGHT_FLOOR, gather_rows, one_hot_columns, sort_indices


def prumerge(
    x: Tensor, size: Tensor | None, class_attn: Tensor, metric: Tensor, tokens: int, protected: int, extra: bool
) -> tuple[Tensor, Tensor]:
    """Keep ``tokens`` of the unprotected tokens of ``x`` (B, N, C), merging the rest into them."""
    batch, num_tokens, _ = x.shape
    scores = class_attn[:, protected:]
    ranked = scores.topk(num_tokens - protected, dim=-1).indices
    kept, pruned = sort_indices(ranked[:, :tokens]), ranked[:, tokens:]
    if size is None:
        size = x.new_ones(batch, num_tokens, 1)

    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = gather_rows(metric, pruned, 1, protected) @ gather_rows(metric, kept, 1, protected).transpose(-1, -2)
    target = similarity.topk(1, dim=-1).indices.squeeze(-1)  # (B, M): the kept token each pruned token joins
    into_kept = one_hot_columns(target, tokens, x.dtype)  # (B, K, M)

    weight_kept = scores.gather(-1, kept).unsqueeze(-1)  # (B, K, 1)
    weight_pruned = scores.gather(-1, pruned).unsqueeze(-1)  # (B, M, 1)
    pruned_x = gather_rows(x, pruned, 1, protected)
    total = weight_kept + into_kept @ weight_pruned
    merged = (weight_kept * gather_rows(x, kept, 1, protected) + into_kept @ (weight_pruned * pruned_x))
    merged = merged / total.clamp_min(WEIGHT_FLOOR)
    pruned_size = gather_rows(size, pruned, 1, protected)
    merged_size = gather_rows(size, kept, 1, protected) + into_kept @ pruned_size

    parts, sizes = [x[:, :protected], merged], [size[:, :protected], merged_size]
    if extra:
        share = weight_pruned.transpose(-1, -2)  # (B, 1, M)
        parts.append((share / share.sum(-1, keepdim=True).clamp_min(WEIGHT_FLOOR)) @ pruned_x)
        sizes.append(pruned_size.sum(1, keepdim=True))
    return torch.cat(parts, dim=1), torch.cat(sizes, dim=1)


class PruMerge(TokenOp):
    """One prune-and-merge site: ``(x, size, class_attention, metric) -> (x, size)`` with a fixed budget."""

    signals = ("class_attention", "metric")

    def __init__(self, tokens: int, protected: int, extra: bool = False) -> None:
        super().__init__()
        if tokens < 1 or protected < 0:
            raise ValueError("tokens must be >= 1 and protected >= 0")
        self.tokens, self.protected, self.extra = tokens, protected, extra

    def forward(self, x: Tensor, size: Tensor | None, class_attn: Tensor, metric: Tensor) -> tuple[Tensor, Tensor]:
        return prumerge(x, size, class_attn, metric, self.tokens, self.protected, self.extra)

    def tokens_out(self, tokens_in: int) -> int:
        return self.protected + self.tokens + int(self.extra)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, protected={self.protected}, extra={self.extra}"

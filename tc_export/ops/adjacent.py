"""Adjacent token merging (A-ToMe, fixed-ratio mode) for sequences, in static-shape form.

Behaviour: after the protected prefix, tokens pair up as (0, 1), (2, 3), ...; each pair is scored by the cosine
of its two keys (averaged over heads); the ``r`` most similar pairs each collapse into one token, the
size-weighted average of the two, at the pair's place. Temporal order is preserved and pairs never overlap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CountedMergeOp
from .pinning import choose
from .rows import NORM_FLOOR, WEIGHT_FLOOR, gather_rows, one_hot_columns, pad_aware_scores, tie_cosines, top_k
from .state import size_column


def effective_pairs(num_tokens: int, r: int, protected: int) -> int:
    """Merges performed: ``r`` capped at the number of whole pairs after the prefix."""
    return max(0, min(r, (num_tokens - protected) // 2))


def adjacent_merge(
    x: Tensor, metric: Tensor, size: Tensor | None, r: int, protected: int, padded: bool = False
) -> tuple[Tensor, Tensor]:
    """Merge the ``r`` most similar adjacent pairs of ``x`` (B, N, C); returns (x, size) with N - r' tokens.

    ``padded``: size-0 tokens are padding; pad pairs merge first and a pad never pairs with a real token.
    """
    batch, num_tokens, channels = x.shape
    if size is None:
        size = x.new_ones(batch, num_tokens, 1)
    r = effective_pairs(num_tokens, r, protected)
    if r == 0:
        return x, size
    pairs = (num_tokens - protected) // 2
    body_end = protected + 2 * pairs

    metric = metric[:, protected:body_end]
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)  # a zero key scores 0, not NaN
    similarity = tie_cosines((metric[:, ::2] * metric[:, 1::2]).sum(-1))  # (B, pairs)
    if padded:
        pad = size[:, protected:body_end, 0] == 0
        similarity = pad_aware_scores(similarity, pad[:, ::2], pad[:, 1::2])
    chosen = choose(similarity, r)[1]
    merge = one_hot_columns(chosen, pairs, x.dtype).sum(-1, keepdim=True)  # (B, pairs, 1): 1 where merged

    body, body_size = x[:, protected:body_end], size[:, protected:body_end]
    first, second = body[:, ::2], body[:, 1::2]
    first_size, second_size = body_size[:, ::2], body_size[:, 1::2]
    # A merged pair lives on in its second slot: the size-weighted average of both; its first slot is dropped.
    moved = merge * first_size  # the whole state moves (sizes, and positions times sizes when carried)
    merged_size = second_size + moved
    second = second + size_column(moved) * (first - second) / size_column(merged_size).clamp_min(WEIGHT_FLOOR)
    slots = torch.stack([first, second], dim=2).reshape(batch, 2 * pairs, channels)
    slot_sizes = torch.stack([first_size, merged_size], dim=2).reshape(batch, 2 * pairs, size.shape[-1])

    # Surviving slots in order: the r smallest keys among (position, or 2*pairs + position when dropped).
    position = torch.arange(2 * pairs, device=x.device)
    dropped = torch.stack([merge.squeeze(-1), torch.zeros_like(merge.squeeze(-1))], dim=2).reshape(batch, -1)
    survivors = top_k(position + dropped.to(torch.int64) * 2 * pairs, 2 * pairs - r, largest=False)[1]
    out = [x[:, :protected], gather_rows(slots, survivors), x[:, body_end:]]
    out_size = [size[:, :protected], gather_rows(slot_sizes, survivors), size[:, body_end:]]
    return torch.cat(out, dim=1), torch.cat(out_size, dim=1)


class AdjacentMerge(CountedMergeOp):
    """One adjacent-merging site: ``(x, size, metric) -> (x, size)`` merging ``r`` neighbouring pairs."""

    signals = ("metric",)

    def forward(self, x: Tensor, size: Tensor | None, metric: Tensor) -> tuple[Tensor, Tensor]:
        return adjacent_merge(x, metric, size, self.r, self.protected, self.padded)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in - effective_pairs(tokens_in, self.r, self.protected)

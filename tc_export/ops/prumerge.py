"""LLaVA-PruMerge (``token_prune_merge_advanced``) with a fixed budget, in static-shape form.

Behaviour of the published code, generalised to a protected prefix:
- class attention is one full-width score: softmax(q_cls . k^T * C^-0.5) over all tokens, with q and k the
  attention layer's query and key projections at full width C (heads concatenated, not averaged), read for the
  unprotected tokens;
- the ``tokens`` unprotected tokens with the highest class attention are kept, in that (descending) order;
- each kept token adds to itself the class-attention-weighted *sum* of its ``neighbours`` (32) nearest other
  unprotected tokens by key cosine, kept and pruned alike (candidates in the published order: the other kept
  tokens in rank order, then the pruned ones by position);
- ``extra``: one more token, the class-attention-weighted sum of the pruned tokens.
The protected prefix stays first, unchanged (a classifier needs it), or is dropped (``drop_prefix``) as the
published code drops the class token from what it hands to the projector.
The published budget is the IQR outlier count of the class attention, which is data-dependent: here it is fixed.
Sizes: a kept token keeps its size (the published update adds weighted tokens without a count), the extra
token carries the pruned tokens' total size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenOp
from .pinning import choose
from .rows import NORM_FLOOR, gather_rows, one_hot_columns, sort_indices, tie_cosines, top_k

NEIGHBOURS = 32  # the published cluster size


def full_width_class_attention(query: Tensor, key: Tensor, protected: int) -> Tensor:
    """softmax(q_0 k^T * C^-0.5) for the first token's query over all keys, (B, N - protected) unprotected part."""
    width = key.shape[-1]
    logits = (query[:, :1] @ key.transpose(-1, -2)) * width**-0.5
    return torch.softmax(logits, dim=-1)[:, 0, protected:]


def full_width_received_attention(query: Tensor, key: Tensor, protected: int) -> Tensor:
    """softmax(Q K^T * C^-0.5) over all keys, averaged over all queries: the attention each token receives,
    (B, N - protected) unprotected part, at PruMerge's full width (heads concatenated)."""
    width = key.shape[-1]
    logits = (query @ key.transpose(-1, -2)) * width**-0.5
    return torch.softmax(logits, dim=-1).mean(1)[:, protected:]


def prumerge_scores(query: Tensor, key: Tensor, protected: int, received: bool) -> Tensor:
    """PruMerge's scores of the unprotected tokens: the class token's attention, or the attention each receives,
    in fp32 whatever the model's dtype (a no-op in fp32), as ToMe and Top-K score."""
    return (full_width_received_attention if received else full_width_class_attention)(query.float(), key.float(),
                                                                                         protected)


def prumerge(
    x: Tensor, size: Tensor | None, query: Tensor, key: Tensor, tokens: int, protected: int, extra: bool = True,
    neighbours: int = NEIGHBOURS, drop_prefix: bool = False, received: bool = False,
) -> tuple[Tensor, Tensor]:
    """Keep ``tokens`` of the unprotected tokens of ``x`` (B, N, C); ``query``/``key`` (B, N, C') full width.
    ``drop_prefix``: leave the protected tokens out of the output (``[kept, extra]``, the published output).
    ``received``: score by the attention each token receives instead of the class token's."""
    scores = prumerge_scores(query, key, protected, received)
    return prumerge_scored(x, size, scores, key, tokens, protected, extra, neighbours, drop_prefix)


def prumerge_scored(
    x: Tensor, size: Tensor | None, scores: Tensor, key: Tensor, tokens: int, protected: int, extra: bool = True,
    neighbours: int = NEIGHBOURS, drop_prefix: bool = False,
) -> tuple[Tensor, Tensor]:
    """PruMerge on given ``scores`` (B, N - protected) of the unprotected tokens and ``key`` (B, N, C')."""
    batch, num_tokens, _ = x.shape
    unprotected = num_tokens - protected
    if size is None:
        size = x.new_ones(batch, num_tokens, 1)
    scores, key = scores.float(), key.float()  # ranks and neighbours in fp32 (a no-op in fp32)
    ranked = choose(scores, unprotected)[1]
    order = torch.cat([ranked[:, :tokens], sort_indices(ranked[:, tokens:])], dim=-1)  # kept by rank, then pruned

    keys = gather_rows(key, order, 1, protected)
    keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)  # F.normalize's eps
    similarity = tie_cosines(keys[:, :tokens] @ keys.transpose(-1, -2))  # (B, K, M)
    self_mask = torch.zeros(tokens, unprotected, dtype=similarity.dtype, device=x.device)
    self_mask[:, :tokens] = torch.diag(torch.full((tokens,), float("-inf"), dtype=similarity.dtype, device=x.device))
    count = min(neighbours, unprotected - 1)
    nearest = choose(similarity + self_mask, count)[1]  # (B, K, n)
    chosen = one_hot_columns(nearest.reshape(batch, -1), unprotected, x.dtype)  # (B, M, K*n)
    chosen = chosen.reshape(batch, unprotected, tokens, count).sum(-1).transpose(-1, -2)  # (B, K, M) 0/1

    weights = scores.gather(-1, order).unsqueeze(1).to(x.dtype)  # (B, 1, M)
    rows = gather_rows(x, order, 1, protected)
    updated = rows[:, :tokens] + (chosen * weights) @ rows
    kept = protected if not drop_prefix else 0
    parts = [x[:, :kept], updated]
    sizes = [size[:, :kept], gather_rows(size, order[:, :tokens], 1, protected)]
    if extra:
        parts.append(weights[..., tokens:] @ rows[:, tokens:])
        sizes.append(gather_rows(size, order[:, tokens:], 1, protected).sum(1, keepdim=True))
    return torch.cat(parts, dim=1), torch.cat(sizes, dim=1)


class PruMerge(TokenOp):
    """One PruMerge site: ``(x, size, query, key) -> (x, size)`` with a fixed budget of kept tokens."""

    signals = ("query_full", "key_full")

    def __init__(self, tokens: int, protected: int, extra: bool = True, neighbours: int = NEIGHBOURS,
                 drop_prefix: bool = False, received: bool = False) -> None:
        super().__init__()
        if tokens < 1 or protected < 0 or neighbours < 1:
            raise ValueError("tokens and neighbours must be >= 1 and protected >= 0")
        self.tokens, self.protected, self.extra, self.neighbours = tokens, protected, extra, neighbours
        self.drop_prefix = drop_prefix
        self.received = received

    def forward(self, x: Tensor, size: Tensor | None, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        return prumerge(x, size, query, key, self.tokens, self.protected, self.extra, self.neighbours,
                        self.drop_prefix, self.received)

    def token_scores(self, query: Tensor, key: Tensor, prefix: int) -> Tensor:
        """The scores (B, N - prefix) of the tokens after the ``prefix`` (merge units reduce them per unit)."""
        return prumerge_scores(query, key, prefix, self.received)

    def forward_scored(self, x: Tensor, size: Tensor | None, scores: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """The same on scores computed elsewhere (merge units: its tokens' scores reduced to each unit)."""
        return prumerge_scored(x, size, scores, key, self.tokens, self.protected, self.extra, self.neighbours,
                               self.drop_prefix)

    def prefix_out(self) -> int:
        """Protected tokens left in front of the output."""
        return 0 if self.drop_prefix else self.protected

    def tokens_out(self, tokens_in: int) -> int:
        return self.prefix_out() + self.tokens + int(self.extra)

    def extra_repr(self) -> str:
        drop = ", drop_prefix" if self.drop_prefix else ""
        return f"tokens={self.tokens}, protected={self.protected}, extra={self.extra}, neighbours={self.neighbours}{drop}"

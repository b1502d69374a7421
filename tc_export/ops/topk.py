"""Top-K token pruning by class attention (EViT), with the optional fused token, in static-shape form.

Behaviour (EViT, Liang et al. 2022): the unprotected tokens are scored by the class token's attention averaged
over heads; the ``keep`` highest survive, after the protected prefix (class, distillation). Survivors come in
descending score order (EViT's), or in their original order with ``keep_order``. With ``fuse``, one extra token
is appended at the end: the class-attention-weighted *sum* of the pruned tokens, sum_i a_i x_i, not normalised by
sum_i a_i (the published EViT code; its size is the pruned tokens' total size).

``TopKAtOutput`` is the same selection on the tower's output (``--features N``), scored by layer N + 1's class
attention (its norm and q/k projections on layer N's output, heads averaged), the class/register tokens dropped
from the output unless kept: the placement of PruMerge's scoring, for VisionZip-style dominant-token selection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import TokenOp
from .pinning import choose
from .rows import gather_rows, sort_indices, top_k


def keep_count(num_tokens: int, keep: float, protected: int) -> int:
    """Unprotected tokens kept: ceil(keep * (N - protected))."""
    return math.ceil(keep * (num_tokens - protected) - 1e-9)


def topk_prune(
    x: Tensor, size: Tensor | None, class_attn: Tensor, keep: int, protected: int, fuse: bool, keep_order: bool
) -> tuple[Tensor, Tensor | None]:
    """Keep ``keep`` of the unprotected tokens of ``x`` (B, N, C) by ``class_attn`` (B, N); returns (x, size)."""
    num_tokens = x.shape[1]
    scores = class_attn[:, protected:].float()  # ranks in fp32 whatever the model's dtype (a no-op in fp32)
    ranked = choose(scores, num_tokens - protected if fuse else keep)[1]
    kept = ranked[:, :keep]
    if keep_order:
        kept = sort_indices(kept)
    parts = [x[:, :protected], gather_rows(x, kept, 1, protected)]
    sizes = None if size is None else [size[:, :protected], gather_rows(size, kept, 1, protected)]
    if fuse:
        pruned = ranked[:, keep:]
        weights = scores.gather(-1, pruned).unsqueeze(1).to(x.dtype)  # (B, 1, M)
        pruned_x = gather_rows(x, pruned, 1, protected)
        parts.append(weights @ pruned_x)
        pruned_size = (
            x.new_full((x.shape[0], 1, 1), float(pruned.shape[1]))
            if size is None
            else gather_rows(size, pruned, 1, protected).sum(1, keepdim=True)
        )
        if sizes is None:
            sizes = [x.new_ones(x.shape[0], protected + keep, 1)]
        sizes.append(pruned_size)
    return torch.cat(parts, dim=1), None if sizes is None else torch.cat(sizes, dim=1)


class TopKPrune(TokenOp):
    """One pruning site: ``(x, size, class_attention) -> (x, size)``, keeping ``keep`` unprotected tokens."""

    signals = ("class_attention",)

    def __init__(self, keep: int, protected: int, fuse: bool = False, keep_order: bool = False,
                 received: bool = False) -> None:
        super().__init__()
        if keep < 1 or protected < 0:
            raise ValueError("keep must be >= 1 and protected >= 0")
        self.keep, self.protected, self.fuse, self.keep_order = keep, protected, fuse, keep_order
        self.creates_size = fuse  # the fused token's size is the pruned mass
        if received:  # scored by the attention each token receives: the same op on another signal
            self.signals = ("received_attention",)  # type: ignore[misc]

    def forward(self, x: Tensor, size: Tensor | None, class_attn: Tensor) -> tuple[Tensor, Tensor | None]:
        return topk_prune(x, size, class_attn, self.keep, self.protected, self.fuse, self.keep_order)

    def tokens_out(self, tokens_in: int) -> int:
        return self.protected + self.keep + int(self.fuse)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, protected={self.protected}, fuse={self.fuse}, keep_order={self.keep_order}"


def head_averaged_class_attention(query: Tensor, key: Tensor, heads: int, received: bool = False) -> Tensor:
    """(B, N): softmax(q_0 k^T / sqrt(d)) per head, averaged over heads; ``query``/``key`` (B, N, C) full width.
    ``received``: every query's row, averaged over the queries too (the attention each token receives)."""
    batch, tokens, width = key.shape
    dim = width // heads
    rows = tokens if received else 1
    q = query[:, :rows].reshape(batch, rows, heads, dim).transpose(1, 2)
    k = key.reshape(batch, tokens, heads, dim).transpose(1, 2)
    return torch.softmax((q @ k.transpose(-1, -2)) * dim**-0.5, dim=-1).mean(dim=(1, 2))


class TopKAtOutput(TokenOp):
    """Top-K on the tower's output: ``(x, size, query, key) -> (x, size)``, scored by the next layer's q and k."""

    signals = ("query_full", "key_full")

    def __init__(self, keep: int, protected: int, heads: int, fuse: bool = False, keep_order: bool = False,
                 drop_prefix: bool = True, received: bool = False) -> None:
        super().__init__()
        if keep < 1 or protected < 0 or heads < 1:
            raise ValueError("keep and heads must be >= 1 and protected >= 0")
        self.keep, self.protected, self.heads, self.fuse, self.keep_order = keep, protected, heads, fuse, keep_order
        self.drop_prefix = drop_prefix
        self.received = received
        self.creates_size = fuse

    def forward(self, x: Tensor, size: Tensor | None, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor | None]:
        scores = head_averaged_class_attention(query, key, self.heads, self.received)
        x, size = topk_prune(x, size, scores, self.keep, self.protected, self.fuse, self.keep_order)
        start = self.protected - self.prefix_out()
        return x[:, start:], None if size is None else size[:, start:]

    def token_scores(self, query: Tensor, key: Tensor, prefix: int) -> Tensor:
        """The scores (B, N - prefix) of the tokens after the ``prefix`` (merge units reduce them per unit)."""
        return head_averaged_class_attention(query, key, self.heads, self.received)[:, prefix:]

    def forward_scored(self, x: Tensor, size: Tensor | None, scores: Tensor, key: Tensor
                       ) -> tuple[Tensor, Tensor | None]:
        """The selection on scores computed elsewhere (merge units: its tokens' scores reduced to each unit); only
        for an op without protected tokens (the unit view), so nothing is dropped."""
        return topk_prune(x, size, scores, self.keep, self.protected, self.fuse, self.keep_order)

    def prefix_out(self) -> int:
        return 0 if self.drop_prefix else self.protected

    def tokens_out(self, tokens_in: int) -> int:
        return self.prefix_out() + self.keep + int(self.fuse)

    def extra_repr(self) -> str:
        return (f"keep={self.keep}, protected={self.protected}, heads={self.heads}, fuse={self.fuse}, "
                f"keep_order={self.keep_order}, drop_prefix={self.drop_prefix}")

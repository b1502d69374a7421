"""Top-K token pruning by class attention (EViT), with the optional fused token, in static-shape form.

Behaviour (EViT, Liang et al. 2022): the unprotected tokens are scored by the class token's attention averaged
over heads; the ``keep`` highest survive, after the protected prefix (class, distillation). Survivors come in
descending score order (EViT's), or in their original order with ``keep_order``. With ``fuse``, one extra token
is appended at the end: the class-attention-weighted *sum* of the pruned tokens, sum_i a_i x_i, not normalised by
sum_i a_i (the published EViT code; its size is the pruned tokens' total size).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import TokenOp
from .rows import gather_rows, sort_indices


def keep_count(num_tokens: int, keep: float, protected: int) -> int:
    """Unprotected tokens kept: ceil(keep * (N - protected))."""
    return math.ceil(keep * (num_tokens - protected) - 1e-9)


def topk_prune(
    x: Tensor, size: Tensor | None, class_attn: Tensor, keep: int, protected: int, fuse: bool, keep_order: bool
) -> tuple[Tensor, Tensor | None]:
    """Keep ``keep`` of the unprotected tokens of ``x`` (B, N, C) by ``class_attn`` (B, N); returns (x, size)."""
    num_tokens = x.shape[1]
    scores = class_attn[:, protected:].float()  # ranks in fp32 whatever the model's dtype (a no-op in fp32)
    ranked = scores.topk(num_tokens - protected if fuse else keep, dim=-1).indices
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

    def __init__(self, keep: int, protected: int, fuse: bool = False, keep_order: bool = False) -> None:
        super().__init__()
        if keep < 1 or protected < 0:
            raise ValueError("keep must be >= 1 and protected >= 0")
        self.keep, self.protected, self.fuse, self.keep_order = keep, protected, fuse, keep_order
        self.creates_size = fuse  # the fused token's size is the pruned mass

    def forward(self, x: Tensor, size: Tensor | None, class_attn: Tensor) -> tuple[Tensor, Tensor | None]:
        return topk_prune(x, size, class_attn, self.keep, self.protected, self.fuse, self.keep_order)

    def tokens_out(self, tokens_in: int) -> int:
        return self.protected + self.keep + int(self.fuse)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, protected={self.protected}, fuse={self.fuse}, keep_order={self.keep_order}"

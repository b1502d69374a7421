"""ToMe applied the eager way to a timm VisionTransformer, written from the paper's description (Bolya et al. 2023).

The comparison point for ``tc-export bench --baselines``: what a user gets today by patching the model in PyTorch
instead of exporting it. Each block runs attention (with proportional attention: log(size) added to the logits),
the attention residual add, then bipartite soft matching on the keys averaged over heads (alternate A/B split,
each A token's most similar B token, the r best-matched A tokens averaged into their match, weighted by size),
then the MLP. Token sizes are threaded from block to block explicitly (no shared mutable state).

``input_schedule`` (the ``placement: input`` option, not the published method): merge that many tokens where the
stream enters a block, matched on the incoming tokens themselves (no keys exist before the attention).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


def bipartite_soft_matching(metric: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor, Tensor]:
    """(merged A rows, their B columns, unmerged A rows) for keys ``metric`` (B, N, d); the paper's matching."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    if protected >= 1:
        scores[:, 0, :] = float("-inf")  # class token: A row 0
    if protected >= 2:
        scores[:, :, 0] = float("-inf")  # distillation token: B column 0
    best, best_col = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    if protected:
        unmerged = unmerged.sort(dim=-1).values  # keeps the class token first
    return merged, best_col.gather(1, merged), unmerged


def merge_tokens(x: Tensor, size: Tensor, r: int, metric: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    """Merge ``r`` tokens of ``x`` (B, N, C) with sizes (B, N, 1): size-weighted averages into B."""
    r = min(r, (x.shape[1] - protected) // 2)
    if r <= 0:
        return x, size
    merged, cols, unmerged = bipartite_soft_matching(metric, r, protected)
    weighted = torch.cat([x * size, size], dim=-1)
    a, b = weighted[:, ::2], weighted[:, 1::2]
    width = weighted.shape[-1]
    sources = a.gather(1, merged.unsqueeze(-1).expand(-1, -1, width))
    b = b.scatter_reduce(1, cols.unsqueeze(-1).expand(-1, -1, width), sources, reduce="sum")
    kept = a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, width))
    if protected >= 2:  # [cls, dist, A..., B...]
        out = torch.cat([kept[:, :1], b[:, :1], kept[:, 1:], b[:, 1:]], dim=1)
    else:
        out = torch.cat([kept, b], dim=1)
    total = out[..., -1:]
    return out[..., :-1] / total, total


def _attention(attn: nn.Module, x: Tensor, size: Tensor | None, prop_attn: bool) -> tuple[Tensor, Tensor]:
    """timm Attention forward with log(size) added to the logits; also returns the keys averaged over heads."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log().transpose(1, 2).unsqueeze(1) if (prop_attn and size is not None) else None  # (B, 1, 1, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


class ToMeBlocks(nn.Module):
    """The model's blocks run in order with ToMe after each attention residual add; sizes passed explicitly."""

    def __init__(self, blocks: Sequence[nn.Module], schedule: Sequence[int], protected: int, prop_attn: bool,
                 input_schedule: Sequence[int] = ()) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.schedule = list(schedule)
        self.input_schedule = list(input_schedule) + [0] * (len(self.schedule) - len(input_schedule))
        self.protected = protected
        self.prop_attn = prop_attn

    def forward(self, x: Tensor) -> Tensor:
        size: Tensor | None = None
        for block, r, r_input in zip(self.blocks, self.schedule, self.input_schedule):
            if r_input > 0:
                x, size = merge_tokens(x, size if size is not None else x.new_ones(*x.shape[:2], 1), r_input, x,
                                       self.protected)
            attended, metric = _attention(block.attn, block.norm1(x), size, self.prop_attn)
            x = x + block.drop_path1(block.ls1(attended))
            if r > 0:
                x, size = merge_tokens(x, size if size is not None else x.new_ones(*x.shape[:2], 1), r, metric,
                                       self.protected)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x


def apply_reference_tome(model: nn.Module, schedule: Sequence[int], prop_attn: bool = True,
                         input_schedule: Sequence[int] = ()) -> nn.Module:
    """A copy of timm VisionTransformer ``model`` with ToMe merging ``schedule[i]`` tokens in block i (and
    ``input_schedule[i]`` where the stream enters block i, before its attention)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
        raise ConfigError("the reference eager ToMe patches timm VisionTransformer blocks; this model has none")
    for name, values in (("r", schedule), ("input r", input_schedule)):
        if len(values) > len(blocks):
            raise ConfigError(f"the {name} schedule has {len(values)} entries but the model has {len(blocks)} blocks")
    patched = copy.deepcopy(model).eval()
    protected = int(getattr(patched, "num_prefix_tokens", 1))
    full = list(schedule) + [0] * (len(blocks) - len(schedule))
    patched.blocks = ToMeBlocks(list(patched.blocks), full, protected, prop_attn, input_schedule)
    return patched

"""An independent, straightforward ToMe written from the paper's description, one sample at a time.

Nothing here imports tc_export: it is the yardstick the library's static-shape graph rewrite is held to.
"""

from __future__ import annotations

import torch


def reference_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, protected: int):
    """ToMe bipartite soft matching on one sample: x (N, C), metric (N, d), size (N, 1)."""
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, size
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    scores = m[a_pos] @ m[b_pos].T
    for token in range(protected):
        if token % 2 == 0:
            scores[token // 2, :] = float("-inf")
        else:
            scores[:, token // 2] = float("-inf")
    best, partner = scores.max(dim=-1)
    order = torch.argsort(best, descending=True, stable=True).tolist()
    merged, kept = order[:r], sorted(order[r:])
    dst_x = [x[p] * size[p] for p in b_pos]
    dst_s = [size[p].clone() for p in b_pos]
    for i in merged:
        j = int(partner[i])
        dst_x[j] = dst_x[j] + x[a_pos[i]] * size[a_pos[i]]
        dst_s[j] = dst_s[j] + size[a_pos[i]]
    out_x = [x[a_pos[i]] * size[a_pos[i]] for i in kept] + dst_x
    out_s = [size[a_pos[i]] for i in kept] + dst_s
    new_size = torch.stack(out_s)
    return torch.stack(out_x) / new_size, new_size


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, prop_attn: bool) -> torch.Tensor:
    """q, k, v: (H, N, d) for one sample; proportional attention adds log(size) of each key."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if prop_attn:
        logits = logits + size[:, 0].log()[None, None, :]
    return logits.softmax(dim=-1) @ v


@torch.no_grad()
def reference_tome_timm_vit(model, images: torch.Tensor, schedule: list[int], prop_attn: bool = True):
    """ToMe on a timm VisionTransformer (class token, token pooling), using only its weights."""
    outputs, counts = [], []
    for image in images:
        x = model.patch_embed(image[None])[0]
        x = torch.cat([model.cls_token[0], x]) + model.pos_embed[0]
        size = torch.ones(x.shape[0], 1)
        counts = []
        for block, r in zip(model.blocks, schedule):
            n, c = x.shape
            heads = block.attn.num_heads
            counts.append(n)
            q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, c // heads).permute(1, 2, 0, 3)
            mixed = attention(q, k, v, size, prop_attn).transpose(0, 1).reshape(n, c)
            x = x + block.attn.proj(mixed)
            x, size = reference_merge(x, k.mean(dim=0), size, r, protected=1)
            x = x + block.mlp(block.norm2(x))
        counts.append(x.shape[0])
        outputs.append(model.head(model.norm(x)[0]))
    return torch.stack(outputs), counts

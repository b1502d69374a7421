"""An independent, straightforward ToMe written from the paper's description, one sample at a time.

Nothing here imports tc_export: it is the yardstick the library's static-shape graph rewrite is held to.
"""

from __future__ import annotations

import torch


def pair_score(cosine: float, first_is_pad: bool, second_is_pad: bool, index: int, count: int) -> float:
    """The padding rule for merge scores: pads pair with pads first (above any cosine), never with real tokens
    (below any cosine); ties among those go to the earlier pair (``index`` of ``count`` pairs, row-major)."""
    order = 0.5 * (1.0 - index / count)
    if first_is_pad and second_is_pad:
        return 2.0 + order
    if first_is_pad or second_is_pad:
        return -2.0 - order
    return cosine


def reference_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, protected: int,
                    padded: bool = False):
    """ToMe bipartite soft matching on one sample: x (N, C), metric (N, d), size (N, 1); size 0 = padding."""
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, size
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    scores = m[a_pos] @ m[b_pos].T
    if padded:
        pad = [float(size[p]) == 0 for p in range(n)]
        for i, a in enumerate(a_pos):
            for j, b in enumerate(b_pos):
                index, count = i * len(b_pos) + j, len(a_pos) * len(b_pos)
                scores[i, j] = pair_score(float(scores[i, j]), pad[a], pad[b], index, count)
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
    # A token of total size 0 (padding that took in only padding) keeps its own value.
    dst_x = [d / s if float(s) > 0 else x[p] for d, s, p in zip(dst_x, dst_s, b_pos)]
    out_x = [x[a_pos[i]] for i in kept] + dst_x
    out_s = [size[a_pos[i]] for i in kept] + dst_s
    return torch.stack(out_x), torch.stack(out_s)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, prop_attn: bool) -> torch.Tensor:
    """q, k, v: (H, N, d) for one sample; proportional attention adds log(size) of each key."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if prop_attn:
        logits = logits + size[:, 0].log()[None, None, :]
    return logits.softmax(dim=-1) @ v


def reference_tome_timm_vit(model, images: torch.Tensor, schedule: list[int], prop_attn: bool = True):
    """ToMe on a timm VisionTransformer (class token, token pooling), using only its weights."""

    def merge(layer, x, size, keys, probs):
        return reference_merge(x, keys.mean(dim=0), size, schedule[layer], protected=1)

    return reference_compressed_timm_vit(model, images, merge, prop_attn)


def reference_keep_count(num_tokens: int, keep: float, protected: int) -> int:
    """ceil(keep * (N - protected)) in exact decimal arithmetic (0.7 * 10 is 7, not 7.000000000000001)."""
    import math
    from fractions import Fraction

    return math.ceil(Fraction(str(keep)) * (num_tokens - protected))


def _ranked(scores: torch.Tensor) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -float(scores[i]))


def _weighted_average(rows: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    total = sum(weights)
    return sum(w * r for w, r in zip(weights, rows)) / total if float(total) > 0 else rows[0] * 0


def reference_topk(x, size, cls_attn, keep: float, protected: int, fuse: bool, keep_order: bool):
    """EViT on one sample: x (N, C), size (N, 1), cls_attn (N,)."""
    n = x.shape[0]
    count = reference_keep_count(n, keep, protected)
    order = _ranked(cls_attn[protected:])
    kept = sorted(order[:count]) if keep_order else order[:count]
    rows = [x[i] for i in range(protected)] + [x[protected + i] for i in kept]
    sizes = [size[i] for i in range(protected)] + [size[protected + i] for i in kept]
    if fuse:
        pruned = order[count:]
        rows.append(_weighted_average([x[protected + i] for i in pruned], [cls_attn[protected + i] for i in pruned]))
        sizes.append(sum(size[protected + i] for i in pruned))
    return torch.stack(rows), torch.stack(sizes)


def reference_prumerge(x, size, cls_attn, metric, tokens: int, protected: int, extra: bool):
    """Fixed-budget PruMerge on one sample: keep ``tokens`` by class attention, merge the rest by key cosine."""
    order = _ranked(cls_attn[protected:])
    kept, pruned = sorted(order[:tokens]), order[tokens:]
    m = metric / metric.norm(dim=-1, keepdim=True)
    members = {j: [protected + j] for j in kept}
    for i in pruned:
        sims = [float(m[protected + i] @ m[protected + j]) for j in kept]
        members[kept[sims.index(max(sims))]].append(protected + i)
    rows = [x[i] for i in range(protected)]
    sizes = [size[i] for i in range(protected)]
    for j in kept:
        rows.append(_weighted_average([x[t] for t in members[j]], [cls_attn[t] for t in members[j]]))
        sizes.append(sum(size[t] for t in members[j]))
    if extra:
        rows.append(_weighted_average([x[protected + i] for i in pruned], [cls_attn[protected + i] for i in pruned]))
        sizes.append(sum(size[protected + i] for i in pruned))
    return torch.stack(rows), torch.stack(sizes)


def reference_adjacent(x, metric, size, r: int, protected: int, padded: bool = False):
    """A-ToMe fixed ratio on one sample: pairs (p, p+1), (p+2, p+3), ...; the r most similar pairs merge."""
    n = x.shape[0]
    pairs = (n - protected) // 2
    r = min(r, pairs)
    m = metric / metric.norm(dim=-1, keepdim=True)
    starts = [protected + 2 * i for i in range(pairs)]
    pad = [float(size[t]) == 0 for t in range(n)]
    sims = torch.tensor([pair_score(float(m[s] @ m[s + 1]), padded and pad[s], padded and pad[s + 1], i, pairs)
                         for i, s in enumerate(starts)])
    chosen = set(_ranked(sims)[:r])
    rows, sizes = [x[i] for i in range(protected)], [size[i] for i in range(protected)]
    for i, s in enumerate(starts):
        if i in chosen:
            total = size[s] + size[s + 1]
            rows.append(_weighted_average([x[s], x[s + 1]], [size[s], size[s + 1]]) if float(total) > 0 else x[s + 1])
            sizes.append(total)
        else:
            rows += [x[s], x[s + 1]]
            sizes += [size[s], size[s + 1]]
    for t in range(protected + 2 * pairs, n):
        rows.append(x[t])
        sizes.append(size[t])
    return torch.stack(rows), torch.stack(sizes)


@torch.no_grad()
def reference_compressed_timm_vit(model, images: torch.Tensor, step, prop_attn: bool):
    """A timm ViT run one sample at a time; after each attention residual add, ``step`` may compress.

    ``step(layer, x, size, keys (H, N, d), probs (H, N, N)) -> (x, size)``. Returns outputs and token counts.
    """
    outputs, counts = [], []
    for image in images:
        x = model.patch_embed(image[None])[0]
        x = torch.cat([model.cls_token[0], x]) + model.pos_embed[0]
        size = torch.ones(x.shape[0], 1)
        counts = []
        for index, block in enumerate(model.blocks):
            n, c = x.shape
            heads = block.attn.num_heads
            counts.append(n)
            q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, c // heads).permute(1, 2, 0, 3)
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if prop_attn:
                logits = logits + size[:, 0].log()[None, None, :]
            probs = logits.softmax(dim=-1)
            x = x + block.attn.proj((probs @ v).transpose(0, 1).reshape(n, c))
            x, size = step(index, x, size, k, probs)
            x = x + block.mlp(block.norm2(x))
        counts.append(x.shape[0])
        outputs.append(model.head(model.norm(x)[0]))
    return torch.stack(outputs), counts

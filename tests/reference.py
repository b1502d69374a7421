"""An independent, straightforward ToMe written from the paper's description, one sample at a time.

Nothing here imports tc_export: it is the yardstick the library's static-shape graph rewrite is held to.
"""

from __future__ import annotations

import torch


# Cosines within 2**-16 of 1 are equal (capped): identical keys tie exactly, whatever their rounding error.
COSINE_CAP = 1.0 - 2.0**-16


def tied(cosine):
    """``cosine`` (a float or a tensor of them) with every value above ``COSINE_CAP`` set to it."""
    return min(cosine, COSINE_CAP) if isinstance(cosine, float) else cosine.clamp(max=COSINE_CAP)


def first_best(values: list[float]) -> tuple[float, int]:
    """The largest of ``values`` and the index of its first occurrence (exact ties: the lower index wins)."""
    best = max(values)
    return best, values.index(best)


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
                    padded: bool = False, sort_unmerged: bool | None = None, window: int | None = None):
    """ToMe bipartite soft matching on one sample: x (N, C), metric (N, d), size (N, 1); size 0 = padding.

    Output order as the published code gives it: protected tokens first in their order (class, distillation,
    registers), then the unmerged A tokens (in position order when anything is protected, else in descending
    score order), then the remaining B tokens in position order.

    ``window`` (tc_export's local-search option, not the paper's): A token i searches only B tokens i-window ..
    i+window, one A token at a time; the rest is unchanged.
    """
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, size
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero key scores 0 (F.normalize's eps)
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    scores = tied(m[a_pos] @ m[b_pos].T)
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
    if window is None:
        firsts = [first_best(row) for row in scores.tolist()]
        best, partner = torch.tensor([b for b, _ in firsts]), torch.tensor([j for _, j in firsts])
    else:
        best, partner = torch.full((len(a_pos),), float("-inf")), torch.zeros(len(a_pos), dtype=torch.long)
        for i in range(len(a_pos)):
            for j in range(max(0, i - window), min(len(b_pos), i + window + 1)):
                if float(scores[i, j]) > float(best[i]):
                    best[i], partner[i] = scores[i, j], j
    order = torch.argsort(best, descending=True, stable=True).tolist()
    do_sort = protected > 0 if sort_unmerged is None else sort_unmerged
    merged, kept = order[:r], (sorted(order[r:]) if do_sort else order[r:])
    dst_x = [x[p] * size[p] for p in b_pos]
    dst_s = [size[p].clone() for p in b_pos]
    for i in merged:
        j = int(partner[i])
        dst_x[j] = dst_x[j] + x[a_pos[i]] * size[a_pos[i]]
        dst_s[j] = dst_s[j] + size[a_pos[i]]
    # A token of total size 0 (padding that took in only padding) keeps its own value.
    dst_x = [d / s if float(s) > 0 else x[p] for d, s, p in zip(dst_x, dst_s, b_pos)]
    rows = [(a_pos[i], x[a_pos[i]], size[a_pos[i]]) for i in kept]
    rows += [(p, v, s) for p, v, s in zip(b_pos, dst_x, dst_s)]
    front = sorted((row for row in rows if row[0] < protected), key=lambda row: row[0])
    rest = [row for row in rows if row[0] >= protected]
    ordered = front + rest
    return torch.stack([row[1] for row in ordered]), torch.stack([row[2] for row in ordered])


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

    return reference_timm_blocks(model, images, merge, prop_attn)


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
    if fuse:  # EViT's fused token: sum of a_i * x_i over the pruned tokens, not normalised
        pruned = order[count:]
        rows.append(sum(cls_attn[protected + i] * x[protected + i] for i in pruned))
        sizes.append(sum(size[protected + i] for i in pruned))
    return torch.stack(rows), torch.stack(sizes)


def prumerge_plan(query, key, tokens: int, protected: int, received: bool = False):
    """PruMerge's scores of the unprotected tokens (the class token's attention, or with ``received`` the attention
    each token receives averaged over all queries), the kept ones in descending score (ties: lower index), and the
    pruned ones in index order. query/key (N, C') full width: softmax(q k^T C'^-1/2)."""
    n, width = key.shape
    attn = torch.softmax((query @ key.T) * width ** -0.5, dim=-1)
    scores = attn.mean(0)[protected:] if received else attn[0, protected:]
    idx = [i for i, _ in sorted(enumerate(scores.tolist()), key=lambda t: -t[1])][:tokens]
    compl = sorted(set(range(len(scores))) - set(idx))
    return scores, idx, compl


def reference_prumerge(x, size, query, key, tokens: int, protected: int, extra: bool, neighbours: int = 32,
                       received: bool = False):
    """LLaVA-PruMerge's ``token_prune_merge_advanced`` on one sample, with a fixed budget, as the published loop.

    x (N, C) tokens, query/key (N, C') the attention layer's full-width projections. The protected prefix stays
    first (the published code has only a class token, at index 0, and drops it from its output). ``received``:
    scored by the attention each token receives (the option for towers without a class token).
    """
    cls_attn, idx, compl = prumerge_plan(query, key, tokens, protected, received)
    feats, keys = x[protected:], key[protected:]
    keys_norm = keys / keys.norm(dim=-1, keepdim=True)
    rows, sizes = [x[i] for i in range(protected)], [size[i] for i in range(protected)]
    for i, token in enumerate(idx):
        rest = idx[:i] + idx[i + 1:] + compl
        sims = [tied(float(keys_norm[token] @ keys_norm[j])) for j in rest]
        count = min(neighbours, len(rest))
        cluster = [rest[k] for k, _ in sorted(enumerate(sims), key=lambda t: -t[1])[:count]]
        rows.append(feats[token] + sum(cls_attn[j] * feats[j] for j in cluster))
        sizes.append(size[protected + token])
    if extra:
        rows.append(sum(cls_attn[j] * feats[j] for j in compl))
        sizes.append(sum(size[protected + j] for j in compl))
    return torch.stack(rows), torch.stack(sizes)


def reference_adjacent(x, metric, size, r: int, protected: int, padded: bool = False):
    """A-ToMe fixed ratio on one sample: pairs (p, p+1), (p+2, p+3), ...; the r most similar pairs merge."""
    n = x.shape[0]
    pairs = (n - protected) // 2
    r = min(r, pairs)
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero key scores 0 (F.normalize's eps)
    starts = [protected + 2 * i for i in range(pairs)]
    pad = [float(size[t]) == 0 for t in range(n)]
    sims = torch.tensor([pair_score(tied(float(m[s] @ m[s + 1])), padded and pad[s], padded and pad[s + 1], i, pairs)
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


def reference_timm_blocks(model, images: torch.Tensor, step, prop_attn: bool):
    """Any plain timm ViT (class/distillation/register tokens; token, average, distilled or attention-pooling
    heads), one sample at a time, with ``step(layer, x, size, keys (H, N, d), probs (H, N, N)) -> (x, size)`` after
    each attention residual add (``tests/reference_encoders.py``). Returns outputs and token counts."""
    from .reference_encoders import Hooks, run, timm_vit

    return run(timm_vit(model), {"x": images}, Hooks(after_attention=step, prop_attn=prop_attn))

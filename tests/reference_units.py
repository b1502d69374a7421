"""Merge units, one sample at a time, written from the rules (docs/merge-units.md); nothing here imports tc_export.

A unit is an s x s window of the patch grid. The tower keeps its tokens in raster order until the first unit op;
the reference never permutes anything by formula: it tracks, for each unit, the rows of ``x`` holding its s^2
tokens in the window's (di, dj) row-major order, found from the grid coordinates. A unit op rebuilds ``x`` as the
protected rows followed by each surviving unit's tokens. Every unit carries its size (original units it stands
for) and its position mass (size x (row, column) on the unit grid). Rules:
- Top-K: each unit scored by the mean (or sum, max) of its tokens' scores (class attention, heads averaged, or the
  attention each token receives, averaged over queries and heads); the K = ceil(keep * U) best kept, best first,
  exact ties to the lower unit index.
- ToMe: units alternate A (even unit index) / B (odd); unit metric = mean (or concatenation) of its tokens'
  head-averaged keys, cosine similarity; each A unit's best B unit (ties: lower index); the r best A units merge
  into their B unit slot by slot, size-weighted; output: unmerged A units in order, then the B units in order.
- PruMerge (``unit_prumerge``) and adjacent merging (``unit_adjacent``): as written there.
- Window projectors: each unit in turn is one window -> one output token at the unit's position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .reference_encoders import Encoder, Hooks, run, timm_vit
from .reference_projectors import gelu, layer_norm, linear


@dataclass
class Unit:
    rows: list[int]  # rows of the current x holding the unit's s^2 tokens, in (di, dj) row-major order
    size: float
    mass: Tensor  # size x (row, column) on the unit grid


@dataclass
class Layout:
    prefix: int
    units: list[Unit] = field(default_factory=list)


def raster_layout(grid: tuple[int, int], unit: int, prefix: int) -> Layout:
    """Units of the raster-ordered patch rows: unit (i, j) holds patches (s*i + di, s*j + dj)."""
    h, w = grid
    units = []
    for i in range(h // unit):
        for j in range(w // unit):
            rows = [prefix + (unit * i + di) * w + unit * j + dj for di in range(unit) for dj in range(unit)]
            units.append(Unit(rows, 1.0, torch.tensor([float(i), float(j)])))
    return Layout(prefix, units)


def rebuild(x: Tensor, layout: Layout, units: list[tuple[Tensor, float, Tensor]]) -> tuple[Tensor, Tensor, Layout]:
    """New (x, per-token sizes, layout) from the protected rows and ``units`` = [(tokens (s^2, C), size, mass)]."""
    prefix = layout.prefix
    rows, sizes, new = [x[:prefix]], [torch.ones(prefix, 1)], Layout(prefix)
    start = prefix
    for tokens, size, mass in units:
        rows.append(tokens)
        sizes.append(torch.full((tokens.shape[0], 1), size))
        new.units.append(Unit(list(range(start, start + tokens.shape[0])), size, mass))
        start += tokens.shape[0]
    return torch.cat(rows), torch.cat(sizes), new


def reduce(values: list[float], how: str) -> float:
    return {"mean": sum(values) / len(values), "sum": sum(values), "max": max(values)}[how]


def unit_topk(x: Tensor, layout: Layout, scores: Tensor, keep: float, how: str = "mean", fuse: bool = False):
    """Keep ceil(keep * U) units by their tokens' scores (N,), best first, ties to the lower index. ``fuse``: one
    more unit, EViT's fused token slot by slot: the score-weighted sum of the pruned units (not normalised), of
    their total size and mass."""
    unit_scores = [reduce([float(scores[r]) for r in u.rows], how) for u in layout.units]
    count = math.ceil(keep * len(layout.units) - 1e-9)
    ranked = sorted(range(len(unit_scores)), key=lambda u: (-unit_scores[u], u))
    out = [(x[layout.units[u].rows], layout.units[u].size, layout.units[u].mass) for u in ranked[:count]]
    if fuse:
        pruned = [layout.units[u] for u in ranked[count:]]
        weights = [unit_scores[u] for u in ranked[count:]]
        out.append((sum(w * x[u.rows] for w, u in zip(weights, pruned)), sum(u.size for u in pruned),
                    sum(u.mass for u in pruned)))
    return rebuild(x, layout, out)


def unit_tome(x: Tensor, layout: Layout, keys: Tensor, r: int, metric: str = "mean"):
    """ToMe over units: keys (H, N, d) of this layer."""
    token_keys = keys.mean(0)
    feats = [token_keys[u.rows].mean(0) if metric == "mean" else token_keys[u.rows].reshape(-1) for u in layout.units]
    feats = [f / f.norm().clamp_min(1e-12) for f in feats]
    a_idx = list(range(0, len(feats), 2))
    b_idx = list(range(1, len(feats), 2))
    r = min(r, len(feats) // 2)
    best = []
    for a in a_idx:
        sims = [float(feats[a] @ feats[b]) for b in b_idx]
        j = max(range(len(sims)), key=lambda t: (sims[t], -t))
        best.append((sims[j], j))
    order = sorted(range(len(a_idx)), key=lambda i: (-best[i][0], i))
    merged, unmerged = order[:r], sorted(order[r:])
    into: dict[int, list[int]] = {}
    for i in merged:
        into.setdefault(best[i][1], []).append(a_idx[i])
    out = [(x[layout.units[a_idx[i]].rows], layout.units[a_idx[i]].size, layout.units[a_idx[i]].mass)
           for i in unmerged]
    for j, b in enumerate(b_idx):
        members = [b] + into.get(j, [])
        size = sum(layout.units[m].size for m in members)
        tokens = sum(layout.units[m].size * x[layout.units[m].rows] for m in members) / size  # slot by slot
        out.append((tokens, size, sum(layout.units[m].mass for m in members)))
    return rebuild(x, layout, out)


def unit_prumerge(x: Tensor, layout: Layout, query: Tensor, key: Tensor, budget: int, received: bool = False,
                  neighbours: int = 32, extra: bool = True, how: str = "mean"):
    """LLaVA-PruMerge over units: full-width q, k (N, C) of the tokens entering the layer; every token scored by the
    class token's attention (or the attention it receives), units by the mean of their tokens' scores; the
    ``budget`` best units kept (best first), each adding the score-weighted sum of its nearest units (cosine of
    the mean keys; candidates: the other kept units by rank, then the pruned ones by index), slot by slot; the
    extra unit is the score-weighted sum of the pruned units."""
    probs = torch.softmax((query @ key.T) * key.shape[-1] ** -0.5, dim=-1)
    token_scores = probs.mean(0) if received else probs[0]
    units = layout.units
    scores = [reduce([float(token_scores[r]) for r in u.rows], how) for u in units]
    order = sorted(range(len(units)), key=lambda u: (-scores[u], u))
    kept, pruned = order[:budget], sorted(order[budget:])
    keys = [key[u.rows].mean(0) for u in units]
    keys = [k / k.norm().clamp_min(1e-12) for k in keys]
    out = []
    for i, unit in enumerate(kept):
        rest = kept[:i] + kept[i + 1:] + pruned
        sims = [float(keys[unit] @ keys[j]) for j in rest]
        count = min(neighbours, len(rest))
        cluster = [rest[t] for t in sorted(range(len(rest)), key=lambda t: (-sims[t], t))[:count]]
        tokens = x[units[unit].rows] + sum(scores[j] * x[units[j].rows] for j in cluster)
        out.append((tokens, units[unit].size, units[unit].mass))
    if extra:
        out.append((sum(scores[j] * x[units[j].rows] for j in pruned), sum(units[j].size for j in pruned),
                    sum(units[j].mass for j in pruned)))
    return rebuild(x, layout, out)


def unit_adjacent(x: Tensor, layout: Layout, keys: Tensor, r: int):
    """Adjacent merging over units: pairs (0, 1), (2, 3), ... of units in sequence order, scored by the cosine of
    their mean keys; the r most similar pairs (ties: the earlier pair) become one unit, slot by slot size-weighted,
    at the pair's place."""
    token_keys = keys.mean(0)
    units = layout.units
    feats = [token_keys[u.rows].mean(0) for u in units]
    feats = [f / f.norm().clamp_min(1e-12) for f in feats]
    pairs = len(units) // 2
    sims = [float(feats[2 * p] @ feats[2 * p + 1]) for p in range(pairs)]
    chosen = set(sorted(range(pairs), key=lambda p: (-sims[p], p))[:min(r, pairs)])
    out = []
    for p in range(pairs):
        a, b = units[2 * p], units[2 * p + 1]
        if p in chosen:
            size = a.size + b.size
            out.append(((a.size * x[a.rows] + b.size * x[b.rows]) / size, size, a.mass + b.mass))
        else:
            out += [(x[a.rows], a.size, a.mass), (x[b.rows], b.size, b.mass)]
    out += [(x[u.rows], u.size, u.mass) for u in units[2 * pairs:]]
    return rebuild(x, layout, out)


def received_attention(probs: Tensor) -> Tensor:
    """(N,) the attention each token receives, averaged over the queries and the heads."""
    return probs.mean(dim=(0, 1))


def class_attention(probs: Tensor) -> Tensor:
    return probs[:, 0, :].mean(0)


Op = Callable[[Tensor, Layout, Tensor, Tensor], tuple[Tensor, Tensor, Layout]]


def run_units(model, images: Tensor, grid: tuple[int, int], unit: int, ops: dict[int, Op],
              prop_attn: bool, before: dict[int, Op] | None = None) -> list[tuple[Tensor, Layout]]:
    """A timm ViT per sample with unit ops after the attention residual add of the layers in ``ops``
    (``op(x, layout, keys (H,N,d), probs (H,N,N)) -> (x, sizes, layout)``) and where the stream enters the layers
    in ``before`` (``op(x, layout, q (N,C), k (N,C))``, full width); returns per sample the final normed tokens and
    their layout."""
    before = before or {}
    encoder = timm_vit(model)
    prefix = model.num_prefix_tokens
    results: list[tuple[Tensor, Layout]] = []
    state: dict = {}

    def embed(sample):
        state["layout"] = raster_layout(grid, unit, prefix)
        return encoder.embed(sample)

    def step(layer, x, size, keys, probs):
        if layer not in ops:
            return x, size
        x, size, state["layout"] = ops[layer](x, state["layout"], keys, probs)
        return x, size

    def enter(layer, x, size, query, key):
        if layer not in before:
            return x, size
        x, size, state["layout"] = before[layer](x, state["layout"], query, key)
        return x, size

    def head(x, size, prop):
        normed = model.norm(x)
        results.append((normed, state["layout"]))
        return normed[:1]

    run(Encoder(embed, encoder.layers, head), {"x": images}, Hooks(after_attention=step, before_layer=enter,
                                                                            prop_attn=prop_attn))
    return results


def unshuffle_window(window: Tensor, sd: dict) -> Tensor:
    """InternVL's mlp1 on one window's tokens (s^2, C) concatenated in (di, dj) row-major order."""
    wide = window.reshape(-1)
    normed = layer_norm(wide, sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    return linear(gelu(linear(normed, sd, "mlp1.1")), sd, "mlp1.3")


def patchmerger_window(window: Tensor, sd: dict) -> Tensor:
    """Qwen2-VL's PatchMerger on one window: ln_q per token, concatenated, mlp.0 -> GELU -> mlp.2."""
    normed = layer_norm(window, sd["ln_q.weight"], sd["ln_q.bias"], 1e-6).reshape(-1)
    return linear(gelu(linear(normed, sd, "mlp.0")), sd, "mlp.2")


def pool_window(mode: str) -> Callable[[Tensor, dict], Tensor]:
    return lambda window, sd: window.mean(0) if mode == "avg" else window.max(0).values


def project_units(tokens: Tensor, layout: Layout, window_fn: Callable[[Tensor, dict], Tensor], sd: dict,
                  unit: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each unit in turn -> one output token; returns (tokens (U, D), positions (U, 2), sizes (U, 1) in patches)."""
    out = torch.stack([window_fn(tokens[u.rows], sd) for u in layout.units])
    positions = torch.stack([u.mass / u.size for u in layout.units])
    sizes = torch.tensor([[u.size * unit * unit] for u in layout.units])
    return out, positions, sizes

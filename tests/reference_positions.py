"""Per-sample references for the positions that travel with the tokens; nothing here imports tc_export.

Positions are defined by what each output token stands for: a pruned (kept) token keeps its own original position;
a merged token is the size-weighted mean of its members' positions; a token that absorbs others (EViT's fused
token, PruMerge's extra token) the size-weighted mean of what it absorbed. The merge references of
``tests/reference.py`` average the rows of their input weighted by size, so a merge's positions are read from the
same reference run on the tokens with their positions appended as extra features (the decisions come from the
metric alone). Pruning references pick rows by index and are rewritten here to return positions.
"""

from __future__ import annotations

import torch

from .reference import _ranked, reference_adjacent, reference_keep_count, reference_merge


def grid_positions(prefix: int, grid: tuple[int, int], suffix: int = 0) -> torch.Tensor:
    """(prefix + H*W + suffix, 2): -1 on the protected rows, (row, column) of each patch in row-major order."""
    rows = [[-1.0, -1.0]] * prefix
    rows += [[float(i // grid[1]), float(i % grid[1])] for i in range(grid[0] * grid[1])]
    rows += [[-1.0, -1.0]] * suffix
    return torch.tensor(rows)


def _absorbed(size: torch.Tensor, pos: torch.Tensor, members: list[int]) -> torch.Tensor:
    total = sum(float(size[i]) for i in members)
    return sum(float(size[i]) * pos[i] for i in members) / total


def tome_positions(x, metric, size, pos, r: int, protected: int, sort_unmerged=None, window=None):
    """ToMe on one sample with positions (N, P): (positions, sizes) of the output tokens."""
    rows, sizes = reference_merge(torch.cat([x, pos], -1), metric, size, r, protected,
                                  sort_unmerged=sort_unmerged, window=window)
    return rows[:, x.shape[1]:], sizes


def adjacent_positions(x, metric, size, pos, r: int, protected: int):
    rows, sizes = reference_adjacent(torch.cat([x, pos], -1), metric, size, r, protected)
    return rows[:, x.shape[1]:], sizes


def topk_positions(size, pos, cls_attn, keep: float, protected: int, fuse: bool, keep_order: bool):
    """EViT on one sample: kept tokens keep their positions; the fused token takes the pruned tokens' mean."""
    count = reference_keep_count(pos.shape[0], keep, protected)
    order = _ranked(cls_attn[protected:])
    kept = sorted(order[:count]) if keep_order else order[:count]
    out = [pos[i] for i in range(protected)] + [pos[protected + i] for i in kept]
    sizes = [size[i] for i in range(protected)] + [size[protected + i] for i in kept]
    if fuse:
        pruned = [protected + i for i in order[count:]]
        out.append(_absorbed(size, pos, pruned))
        sizes.append(sum(size[i] for i in pruned))
    return torch.stack(out), torch.stack(sizes)


def prumerge_positions(size, pos, query, key, tokens: int, protected: int, extra: bool):
    """PruMerge on one sample: a kept token keeps its position (it keeps its size: the published update adds
    weighted neighbours without a count); the extra token takes the pruned tokens' size-weighted mean."""
    attn = torch.softmax((query @ key.T) * key.shape[1] ** -0.5, dim=-1)[0, protected:]
    order = _ranked(attn)
    kept, pruned = order[:tokens], sorted(order[tokens:])
    out = [pos[i] for i in range(protected)] + [pos[protected + i] for i in kept]
    sizes = [size[i] for i in range(protected)] + [size[protected + i] for i in kept]
    if extra:
        out.append(_absorbed(size, pos, [protected + i for i in pruned]))
        sizes.append(sum(size[protected + i] for i in pruned))
    return torch.stack(out), torch.stack(sizes)


class CarriedPositions:
    """A ``tests/reference_encoders.Hooks`` step that also carries each sample's positions: ``step(layer, x, size,
    pos) -> (x, size, pos)`` is applied after each attention residual add; ``start`` gives a sample's initial
    positions (layer 0 starts a new sample). ``final`` holds the last positions of every sample in turn."""

    def __init__(self, step, start: torch.Tensor) -> None:
        self.step, self.start = step, start
        self.final: list[torch.Tensor] = []
        self.sizes: list[torch.Tensor] = []

    def __call__(self, layer: int, x, size, keys, probs):
        if layer == 0:
            self.final.append(self.start.clone())
            self.sizes.append(size)
        x, size, pos = self.step(layer, x, size, self.final[-1], keys, probs)
        self.final[-1], self.sizes[-1] = pos, size
        return x, size

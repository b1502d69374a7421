"""Per-sample references for video token reduction; nothing here imports tc_export.

``reference_evs`` follows vLLM's ``compute_retention_mask`` and ``compute_mrope_for_media`` as published (the rule
is restated in ../shared/reference/methods.md "Video"): one clip's merged tokens (T, H', W', D), dissimilarity
1 - F.cosine_similarity to the previous frame at the same place, frame 0 scored 255, a stable descending argsort
of the flattened scores, the first max(H'W', int(T H'W' (1 - q))) marked in a boolean mask, tokens and positions
selected by the mask (so in (t, h, w) order). ``dtype`` scores in another precision, as serving does in bf16.

``reference_temporal_tower`` runs a per-frame tower on the tokens a temporal pruning rule keeps: each frame's kept
tokens (in index order, the frame's protected tokens first) through the blocks on their own, one frame at a time.

``reference_temporal_unit_keep`` is the rule at merge units, written from the raster tokens: the s x s window of
patches (s i + di, s j + dj) is unit (i, j) (raster order of the unit grid); its change score is the mean of its
tokens' 1 - cosine to the same patch one frame back; later frames keep whole units by that score (ties to the earlier
(frame, unit)). ``unit_members`` lists a unit's raster patches in (di, dj) order, the order a window projector reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def reference_evs_mask(embeds: torch.Tensor, frames: int, rows: int, cols: int, q: float,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The retention mask (T H' W',) of one clip's merged tokens ``embeds`` (T H' W', D)."""
    video = embeds.to(dtype).reshape(frames, rows, cols, embeds.shape[-1])
    dissimilarity = 1 - F.cosine_similarity(video[1:], video[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(video[:1, :, :, 0]), dissimilarity], dim=0)
    flat = dissimilarity.reshape(-1)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    per_frame = rows * cols
    retained = max(per_frame, int(per_frame * frames * (1 - q)))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:retained]] = True
    return mask


def reference_mrope(frames: int, rows: int, cols: int, tokens_per_second: float = 1.0,
                    seconds_per_grid: float = 1.0) -> torch.Tensor:
    """(T H' W', 3) positions (t, h, w) of the merged tokens, media at the start of the sequence."""
    t = torch.arange(frames).view(-1, 1).expand(-1, rows * cols).mul(tokens_per_second * seconds_per_grid)
    t = t.long().flatten()
    h = torch.arange(rows).view(1, -1, 1).expand(frames, -1, cols).flatten()
    w = torch.arange(cols).view(1, 1, -1).expand(frames, rows, -1).flatten()
    return torch.stack([t, h, w], dim=1)


def reference_evs(embeds: torch.Tensor, frames: int, rows: int, cols: int, q: float,
                  tokens_per_second: float = 1.0, seconds_per_grid: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept tokens (K, D), their positions (K, 3) int64, kept indices (K,)) of one clip."""
    mask = reference_evs_mask(embeds, frames, rows, cols, q, dtype)
    positions = reference_mrope(frames, rows, cols, tokens_per_second, seconds_per_grid)
    return embeds[mask], positions[mask], mask.nonzero().flatten()


def reference_temporal_keep(embeds: torch.Tensor, frames: int, prefix: int, per_frame: int | None,
                            total: int | None) -> list[list[int]]:
    """Kept grid-token indices per frame (each ascending) of one clip's tokens ``embeds`` (T, prefix + M, D).

    Score: 1 - cosine to the same token of the previous frame (frame 0: all kept). ``per_frame``: each later frame
    keeps its ``per_frame`` highest; ``total``: the clip keeps ``total`` grid tokens, frame 0 whole and the rest
    the highest over all later frames. Ties to the earlier (frame, index).
    """
    grid = embeds[:, prefix:].float()
    tokens = grid.shape[1]
    dissimilarity = 1 - F.cosine_similarity(grid[1:], grid[:-1], dim=-1)  # (T - 1, M)
    kept = [list(range(tokens))]
    if per_frame is not None:
        for t in range(frames - 1):
            order = torch.argsort(dissimilarity[t], descending=True, stable=True)[:per_frame]
            kept.append(sorted(order.tolist()))
        return kept
    assert total is not None
    order = torch.argsort(dissimilarity.reshape(-1), descending=True, stable=True)[:total - tokens].tolist()
    for t in range(frames - 1):
        kept.append(sorted(i - t * tokens for i in order if t * tokens <= i < (t + 1) * tokens))
    return kept


def reference_temporal_tower(embeds: torch.Tensor, kept: list[list[int]], prefix: int,
                             blocks: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """Each frame's protected tokens and kept grid tokens (1, prefix + k_t, D) through ``blocks`` on their own."""
    outputs = []
    for t, members in enumerate(kept):
        rows = list(range(prefix)) + [prefix + i for i in members]
        outputs.append(blocks(embeds[t, rows].unsqueeze(0))[0])
    return outputs


def unit_members(grid: tuple[int, int], unit: int, index: int) -> list[int]:
    """Raster indices of unit ``index``'s patches (raster order of the unit grid), (di, dj) row-major."""
    cols = grid[1] // unit
    i, j = divmod(index, cols)
    return [(unit * i + di) * grid[1] + unit * j + dj for di in range(unit) for dj in range(unit)]


def reference_temporal_unit_keep(embeds: torch.Tensor, prefix: int, grid: tuple[int, int], unit: int,
                                 per_frame: int | None, total: int | None) -> list[list[int]]:
    """Kept unit indices per frame (each ascending; frame 0: every unit) of one clip's raster tokens ``embeds``
    (T, prefix + H W, D). ``per_frame``: each later frame keeps its ``per_frame`` highest units; ``total``: the
    later frames together keep ``total`` units, the highest over the clip. Ties to the earlier (frame, unit)."""
    frames = embeds.shape[0]
    patches = embeds[:, prefix:].float()
    per_token = 1 - F.cosine_similarity(patches[1:], patches[:-1], dim=-1)  # (T - 1, H W)
    count = (grid[0] // unit) * (grid[1] // unit)
    scores = torch.stack([per_token[:, unit_members(grid, unit, u)].mean(-1) for u in range(count)], dim=1)
    kept = [list(range(count))]
    if per_frame is not None:
        for t in range(frames - 1):
            kept.append(sorted(torch.argsort(scores[t], descending=True, stable=True)[:per_frame].tolist()))
        return kept
    assert total is not None
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True)[:total].tolist()
    for t in range(frames - 1):
        kept.append(sorted(i - t * count for i in order if t * count <= i < (t + 1) * count))
    return kept

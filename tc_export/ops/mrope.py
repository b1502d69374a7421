"""Positions in a Qwen-VL language model's coordinates: the (t, h, w) that ``get_rope_index`` gives a merged token.

``get_rope_index`` (Qwen2-VL, Qwen2.5-VL) gives the merged token at cell (h, w) of the merged grid of frame group t
the 3-D position (start + t', start + h, start + w), start being the text position where the image begins and
t' = int(t x time interval) (0 for an image; Qwen2.5-VL's video: tokens_per_second x temporal_patch_size / fps).
The text after the image resumes at start + max(H', W') (the uncompressed merged grid's, whatever was pruned).

The token state carries each token's (row, column) in patch units; a merge unit of s x s patches carries the mean
of its patches', s x cell + (s - 1) / 2. So ``lm_positions`` is exact for every unit kept whole (its own cell, as
vLLM's EVS keeps each kept token's original (t, h, w)), and a unit that absorbed others (ToMe) reads the
size-weighted mean of its members' cells: fractional, which the language model's rotary table takes as it is
(``position_ids[..., None].float() * inv_freq``); a consumer that needs integers rounds it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lm_positions(positions: Tensor, merge: int, time_interval: float = 1.0) -> Tensor:
    """(B, N, 2) row, column in patch units (or (B, N, 3) frame, row, column) -> (B, N, 3) (t, h, w) relative to the
    image's start, as ``get_rope_index`` assigns the merged token there."""
    cells = (positions[..., -2:] - (merge - 1) / 2) / merge
    if positions.shape[-1] == 3:
        time = torch.floor(positions[..., :1] * time_interval)
    else:
        time = torch.zeros_like(cells[..., :1])
    return torch.cat([time, cells], dim=-1)

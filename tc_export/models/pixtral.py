"""Pixtral's vision encoder (``PixtralVisionModel``, the tower of Mistral 3 and LLaVA-Pixtral) as a fixed-size
image model.

The tower takes padded images with ``image_sizes``, crops each image's patch map to its size, concatenates every
image into one sequence and blocks attention per image (``generate_block_attention_mask``); its 2-D rotary
positions come from each image's patch grid. At one fixed size with every image filling it, ``image_sizes`` is a
constant, each image's sequence is its own batch row (the block mask, one block per image, is then no mask), and
the rotary table is a constant of the grid: the adapter evaluates it once with the tower's own position ids and
rotary module, and runs the tower's own ``patch_conv``, ``ln_pre`` and transformer batch first. The tower has no
class token, no absolute position embedding and no final norm.

Outputs: ``tokens`` (default: the tower's last hidden state, what the Mistral 3 / LLaVA projector reads) or
``mean``; ToMe and adjacent merging compress it, the rotary table recomputed from the carried (row, column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapted import build_adapted, fixed_size
from .base import LoadedModel
from .registry import ModelOptions

POOLINGS = {"tokens": "the last hidden state (what the projector reads)",
            "mean": "the mean of the last hidden state (size-weighted after merging)"}


def grid_position_ids(rows: int, cols: int) -> torch.Tensor:
    """The tower's position ids of one image's (rows x cols) patch grid, as its forward builds them."""
    h, w = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([h.flatten(), w.flatten()], dim=-1)


class PixtralVisionAdapter(nn.Module):
    """pixel_values (B, C, H, W), each image filling the fixed size -> the tower's last hidden state (or its mean)."""

    def __init__(self, tower: nn.Module, image_size: int, pooling: str = "tokens") -> None:
        super().__init__()
        self.tower, self.pooling = tower, pooling
        side = image_size // tower.patch_size
        ids = grid_position_ids(side, side)
        probe = torch.zeros(1, side * side, tower.config.hidden_size, dtype=tower.patch_conv.weight.dtype)
        with torch.no_grad():
            cos, sin = tower.patch_positional_embedding(probe, ids)
        self.register_buffer("cos", cos.detach().clone(), persistent=False)
        self.register_buffer("sin", sin.detach().clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        x = tower.patch_conv(pixel_values.to(tower.patch_conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = tower.ln_pre(x)
        out = tower.transformer(x, attention_mask=None, position_embeddings=(self.cos, self.sin))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden.mean(dim=1) if self.pooling == "mean" else hidden


def build_pixtral(name: str, choice: Any, folder: Path | None, options: ModelOptions) -> LoadedModel:
    """``hf:DIR`` holding a Pixtral vision config (or a Mistral 3 / LLaVA config with one): the adapter around it."""
    config = choice.config
    size = fixed_size(config, options, name, "Pixtral's patch_size")
    if size > config.image_size:
        from ..errors import ConfigError

        raise ConfigError(f"{name}: --img-size {size} is larger than Pixtral's image_size {config.image_size} "
                          "(its rotary table covers image_size / patch_size positions per side)")
    return build_adapted(name, choice, folder, options, POOLINGS, "tokens", PixtralVisionAdapter, size,
                         "Pixtral's vision encoder")

"""Idefics3's vision transformer (Idefics3, and SmolVLM's copy of it) as a fixed-size image model.

The tower takes ``patch_attention_mask`` (which p x p blocks of each image hold pixels) and places each image's
patches on its learned N x N position table by bucketing their fractional coordinates. The image processor cuts
images into tiles of exactly ``image_size``, so for a tile the mask is all true: the position ids are a constant
of the grid and the encoder gets no mask. The adapter evaluates those ids once with the tower's own embedding code
(an all-true mask at the fixed size, the ids read where the tower looks up its table) and runs the tower's own
patch embedding, position table, encoder and ``post_layernorm`` batch first. No class token.

Outputs: ``tokens`` (default: the last hidden state, what the Idefics3 connector's pixel shuffle reads) or ``mean``;
ToMe and adjacent merging compress it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapted import build_adapted, config_size
from .base import LoadedModel
from .registry import ModelOptions

POOLINGS = {"tokens": "the last hidden state (what the connector reads)",
            "mean": "the mean of the last hidden state (size-weighted after merging)"}


def tile_position_ids(embeddings: nn.Module, image_size: int, channels: int) -> torch.Tensor:
    """The ids (1, N^2) the tower's own embedding code looks up for a full tile (an all-true patch mask)."""
    seen: list[torch.Tensor] = []
    hook = embeddings.position_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    side = image_size // embeddings.patch_size
    try:
        with torch.no_grad():
            embeddings(torch.zeros(1, channels, image_size, image_size, dtype=embeddings.patch_embedding.weight.dtype),
                       patch_attention_mask=torch.ones(1, side, side, dtype=torch.bool))
    finally:
        hook.remove()
    return seen[0].detach().clone()


class Idefics3VisionAdapter(nn.Module):
    """pixel_values (B, C, H, W), one full tile each -> the tower's last hidden state (or its mean)."""

    def __init__(self, tower: nn.Module, image_size: int, pooling: str = "tokens") -> None:
        super().__init__()
        self.tower, self.pooling = tower, pooling
        channels = tower.config.num_channels
        self.register_buffer("position_ids", tile_position_ids(tower.embeddings, image_size, channels),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        x = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2) + embeddings.position_embedding(self.position_ids)
        hidden = self.tower.post_layernorm(self.tower.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state)
        return hidden.mean(dim=1) if self.pooling == "mean" else hidden


def build_idefics3(name: str, choice: Any, folder: Path | None, options: ModelOptions) -> LoadedModel:
    """``hf:DIR`` holding an Idefics3 / SmolVLM config (or its vision config): the adapter around its tower."""
    size = config_size(choice.config, options, name, "Idefics3's image processor cuts images into tiles of image_size")
    return build_adapted(name, choice, folder, options, POOLINGS, "tokens", Idefics3VisionAdapter, size,
                         "Idefics3's vision transformer")

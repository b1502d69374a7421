"""SigLIP2's NaFlex vision tower (``Siglip2VisionModel``) at one fixed image size.

NaFlex takes each image as flattened patches (``max_num_patches`` x p*p*C, in (row, column, channel) order), a
``pixel_attention_mask`` of the real patches and each image's ``spatial_shapes``, and resizes its learned position
table to each image's grid at run time. At one fixed size every image has the same grid: the mask is all ones (no
mask, in the encoder and in the attention-pooling head), the spatial shape is a constant, and the resized table is
a constant, evaluated once by the tower's own ``resize_positional_embeddings``. The adapter takes (B, C, H, W)
pixels at that size and runs the tower's own modules: its Linear patch embedding written as the convolution with
the same weight over the (row, column, channel) patch layout the image processor flattens (so the passes see the
patch grid), the resized table, the encoder, ``post_layernorm`` and the head.

Outputs: ``pooler`` (default, the attention-pooling head's output, the tower's ``pooler_output``), ``tokens`` or
``mean``; ToMe and adjacent merging compress the encoder (the head attends over the merged tokens with their sizes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .adapted import build_adapted, fixed_size
from .base import LoadedModel
from .registry import ModelOptions

POOLINGS = {"pooler": "the attention-pooling head (the tower's pooler_output)",
            "tokens": "the last hidden state", "mean": "the mean of the last hidden state"}


class Siglip2VisionAdapter(nn.Module):
    """pixel_values (B, C, H, W) at the fixed size -> the tower's pooler output, last hidden state or its mean."""

    def __init__(self, tower: nn.Module, image_size: int, pooling: str = "pooler") -> None:
        super().__init__()
        self.tower, self.pooling = tower, pooling
        embeddings = tower.embeddings
        self.patch = tower.config.patch_size
        side = image_size // self.patch
        table = embeddings.position_embedding.weight.reshape(
            embeddings.position_embedding_size, embeddings.position_embedding_size, -1)
        with torch.no_grad():
            resized = embeddings.resize_positional_embeddings(table, torch.tensor([[side, side]]), side * side)
        self.register_buffer("position_table", resized.detach().clone(), persistent=False)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The Linear patch embedding on (row, column, channel)-flattened patches, as a convolution."""
        linear = self.tower.embeddings.patch_embedding
        weight = linear.weight.view(linear.out_features, self.patch, self.patch, -1).permute(0, 3, 1, 2)
        cells = nn.functional.conv2d(pixel_values.to(weight.dtype), weight, linear.bias, stride=self.patch)
        return cells.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        x = self.embed(pixel_values) + self.position_table
        hidden = tower.post_layernorm(tower.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state)
        if self.pooling == "pooler":
            return tower.head(hidden)
        return hidden.mean(dim=1) if self.pooling == "mean" else hidden


def build_siglip2(name: str, choice: Any, folder: Path | None, options: ModelOptions) -> LoadedModel:
    """``hf:DIR`` holding a SigLIP2 config (or its vision config): the adapter at one fixed size (``--img-size``,
    else the grid of the learned position table)."""
    config = choice.config
    side = math.isqrt(config.num_patches)
    config.image_size = side * config.patch_size  # the default size: the table's own grid, resized to itself
    size = fixed_size(config, options, name, "SigLIP2's patch_size")
    default = "pooler" if config.vision_use_head else "tokens"
    if options.pooling == "pooler" and not config.vision_use_head:
        raise ConfigError(f"{name}: --pooling pooler: this SigLIP2 tower has no attention-pooling head "
                          "(vision_use_head is false)")
    return build_adapted(name, choice, folder, options, POOLINGS, default, Siglip2VisionAdapter, size,
                         "SigLIP2's NaFlex tower")

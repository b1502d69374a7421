"""Qwen2-VL's vision tower (``Qwen2VisionTransformerPretrainedModel``) as a fixed-size image model.

The tower takes flattened patches in 2x2 merge-window order plus ``grid_thw`` and attends within each image
through ``cu_seqlens``; its PatchMerger then concatenates every 4 consecutive tokens (one 2x2 window). The adapter
gives the token passes an ordinary model instead, built from the tower's own modules:

* pixel_values (B, 3, H, W) at a fixed size (a multiple of patch_size * spatial_merge_size): the frame repeated
  ``temporal_patch_size`` times, as the image processor does, and the tower's own Conv3d patch embedding run on it
  as one volume (B, 3, T, H, W) -> (B, C, 1, H/p, W/p). Each output cell reads exactly the patch the processor
  flattens, so the tokens come out in raster order, with their grid visible to the passes.
* the tower's own blocks, batch first, full attention within each image (what ``cu_seqlens`` does with one image
  per sequence), its own rotary module evaluated at its own position ids (``get_vision_position_ids``) permuted
  from window order to raster order: a table the rotary finder fits as affine in (row, column).
* ``pooler`` (default): the tokens permuted back to window order and the tower's own PatchMerger (``ln_q``, then
  each 4 consecutive tokens concatenated, ``mlp``): equal to the tower's ``pooler_output`` on the processor's
  patches. ``tokens``: the last block's tokens in raster order (the tower's ``last_hidden_state`` reordered).

Compression: the PatchMerger reads 2x2 windows of consecutive tokens, which merged or pruned tokens no longer
form, so its first layer is marked (``tc_export_refuses_compression``) and the token pass refuses it with that cause; ToMe and
adjacent merging run on the blocks with ``--pooling tokens`` (the last block's tokens, with ``--emit-positions``
their (row, column) positions in patch units, the coordinates of the tower's own position ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..passes.opaque import REFUSAL_ATTRIBUTE, TOKEN_GRID_ATTRIBUTE
from .base import InputSpec, LoadedModel
from .registry import ModelOptions

MERGER_REFUSAL = ("Qwen2-VL's PatchMerger concatenates each 2x2 window of 4 consecutive tokens, and merged or pruned "
                  "tokens no longer form those windows (whole-window ToMe is not built)")
POOLINGS = {"pooler": "pooler_output", "tokens": "last_hidden_state"}
DEFAULT_GRID_UNITS = 8  # default image side: 8 merge windows (224 px for patch 14, merge 2)


def window_positions(tower: nn.Module, rows: int, cols: int) -> torch.Tensor:
    """The tower's own (h, w) position ids (N, 2) of one image, in its 2x2 merge-window token order."""
    from transformers.vision_utils import get_vision_position_ids

    return get_vision_position_ids(torch.tensor([[1, rows, cols]]), tower.spatial_merge_size).long()


class WindowMerger(nn.Module):
    """The tower's PatchMerger on (B, N, C) raster-order tokens: back to window order, then the merger's own
    ``ln_q`` and ``mlp`` on each 4 consecutive tokens (its ``view(-1, 4C)`` per image)."""

    def __init__(self, merger: nn.Module, to_window: torch.Tensor, merged_grid: tuple[int, int]) -> None:
        super().__init__()
        self.merger = merger
        # The traced graph keeps leaf modules themselves (not this wrapper): the merger's first layer carries the mark.
        setattr(merger.ln_q, REFUSAL_ATTRIBUTE, MERGER_REFUSAL)
        # Its output: one token per 2x2 window, windows in raster order of the merged grid (what EVS reads).
        setattr(merger.mlp[-1], TOKEN_GRID_ATTRIBUTE, merged_grid)
        self.register_buffer("to_window", to_window, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windowed = x[:, self.to_window]
        normed = self.merger.ln_q(windowed)
        return self.merger.mlp(normed.reshape(x.shape[0], -1, self.merger.hidden_size))


class Qwen2VLVisionAdapter(nn.Module):
    """pixel_values (B, 3, H, W) -> the tower's merger output (``pooling="pooler"``) or last block's tokens."""

    def __init__(self, tower: nn.Module, image_size: int, pooling: str = "pooler") -> None:
        super().__init__()
        config = tower.config
        self.tower, self.pooling = tower, pooling
        self.grouped_input = False  # True: inputs are (B, temporal, 3, H, W) groups of video frames
        self.patch_size, self.temporal = config.patch_size, config.temporal_patch_size
        self.rows = self.cols = image_size // config.patch_size
        self.heads = config.num_heads
        ids = window_positions(tower, self.rows, self.cols)
        to_raster = torch.argsort(ids[:, 0] * self.cols + ids[:, 1])  # raster token i is window token to_raster[i]
        self.register_buffer("position_ids", ids[to_raster], persistent=False)
        merged = (self.rows // config.spatial_merge_size, self.cols // config.spatial_merge_size)
        self.window_merger = WindowMerger(tower.merger, torch.argsort(to_raster), merged) if pooling == "pooler" \
            else None
        from transformers.models.qwen2_vl import modeling_qwen2_vl

        self.rotate_half = modeling_qwen2_vl.rotate_half

    @property
    def frames_per_step(self) -> int:
        """Frames of a video the tower embeds together (its temporal patch): ``--frames T`` runs T / this steps."""
        return self.temporal

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's Conv3d on one temporal patch: an image (B, 3, H, W) repeated over it, as the image processor
        does, or with ``grouped_input`` a video's ``temporal_patch_size`` consecutive frames (B, t, 3, H, W).
        (B, N, C) in raster order."""
        if self.grouped_input:  # video: the frames of one temporal patch, in order (set by ``video.FrameTower``)
            volume = pixel_values.transpose(1, 2)
        else:
            volume = pixel_values.unsqueeze(2).expand(-1, -1, self.temporal, -1, -1)
        cells = self.tower.patch_embed.proj(volume.to(self.tower.patch_embed.proj.weight.dtype))
        return cells.flatten(2).transpose(1, 2)

    def attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The tower's VisionAttention batch first: its qkv, its rotation of q and k, softmax attention over the
        image's tokens (scale head_dim^-0.5, the tower's), its proj."""
        batch, tokens, channels = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return attn.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixel_values)
        cos, sin = self.tower.rotary_pos_emb(self.position_ids, self.position_ids)
        for block in self.tower.blocks:
            x = x + self.attention(block.attn, block.norm1(x), cos, sin)
            x = x + block.mlp(block.norm2(x))
        if self.window_merger is not None:
            return self.window_merger(x)
        return x


def image_size(config: Any, options: ModelOptions, name: str) -> int:
    unit = config.patch_size * config.spatial_merge_size
    size = options.img_size if options.img_size is not None else DEFAULT_GRID_UNITS * unit
    if size % unit:
        raise ConfigError(f"{name}: --img-size {size} is not a multiple of patch_size x spatial_merge_size = {unit} "
                          f"({config.patch_size} x {config.spatial_merge_size}), which Qwen2-VL's 2x2 merge windows "
                          "need")
    return size


def build_qwen2_vl_tower(name: str, choice: Any, folder: Path | None, options: ModelOptions) -> LoadedModel:
    """``hf:DIR`` holding a Qwen2-VL config (or its vision config): the adapter around its vision tower."""
    from .hf_auto import instantiate, load_given_weights, refuse_pretrained

    config = choice.config
    pooling = options.pooling or "pooler"
    if pooling not in POOLINGS:
        raise ConfigError(f"{name}: --pooling {pooling} does not apply to Qwen2-VL's vision tower (it gives pooler: "
                          "the PatchMerger's output, or tokens: the last block's tokens)")
    size = image_size(config, options, name)
    if config.rope_parameters.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{name}: Qwen2-VL's vision rope type {config.rope_parameters['rope_type']!r} is not the "
                          "axial rope the adapter reads")
    refuse_pretrained(options, name)
    tower, random_init = instantiate(choice, folder, name)
    if load_given_weights(tower, options, name):
        random_init = False
    adapter = Qwen2VLVisionAdapter(tower, size, pooling).eval()
    spec = InputSpec("pixel_values", (config.in_channels, size, size))
    return LoadedModel(name, adapter, [spec], [POOLINGS[pooling]], random_init)

"""Llama 4's vision encoder (``Llama4VisionModel``) as a fixed-size image model.

The tower unfolds the image into patches (a Linear on each), appends the class token LAST, adds its learned
position table (N^2 + 1 rows), ``layernorm_pre``, runs its layers with a complex-valued rotary table ``freqs_ci``
(``[N^2 + 1, 1, head_dim / 2]``: angle (x + 1) f on the first half of the channel pairs, (y + 1) f on the second,
the class row the identity), ``layernorm_post``, drops the class token and runs its pixel-shuffle adapter.

The adapter runs the tower's own modules batch first (the unfold + Linear patch embedding as the convolution with
the same weight, which shows the passes the patch grid); the rotary is the same rotation of interleaved channel pairs
written with real tables (cos and sin of the tower's own ``freqs_ci``, each repeated over its pair), so the rotary
finder sees ``x * cos + rotate(x) * sin`` and the class token is a protected suffix: the table's last row stays the
class token's.

Outputs: ``pooler`` (default) the tower's own output (the pixel shuffle and its MLP), which reads the whole grid:
its first layer is marked and compression before it is refused; ``tokens``: ``layernorm_post``'s tokens without
the class token (what the pixel shuffle reads), compressible with ToMe and adjacent merging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..passes.opaque import REFUSAL_ATTRIBUTE
from .adapted import build_adapted, config_size
from .base import LoadedModel
from .registry import ModelOptions

SHUFFLE_REFUSAL = ("Llama 4's pixel shuffle regroups each 2x2 block of the full token grid into one token, and merged "
                   "or pruned tokens no longer form that grid")
POOLINGS = {"pooler": "the pixel shuffle and its MLP (the tower's output)",
            "tokens": "layernorm_post's tokens without the class token"}


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (-x1, x0) on each interleaved channel pair: multiplication by i of the complex view."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


class Llama4VisionAdapter(nn.Module):
    """pixel_values (B, C, H, W) -> the tower's output (``pooler``) or the tokens before its pixel shuffle."""

    def __init__(self, tower: nn.Module, pooling: str = "pooler") -> None:
        super().__init__()
        self.tower, self.pooling = tower, pooling
        freqs = tower.rotary_embedding.freqs_ci  # (N^2 + 1, 1, head_dim / 2) complex
        self.register_buffer("cos", freqs.real.repeat_interleave(2, dim=-1).float(), persistent=False)
        self.register_buffer("sin", freqs.imag.repeat_interleave(2, dim=-1).float(), persistent=False)
        if pooling == "pooler":
            setattr(tower.vision_adapter.mlp.fc1.weight, REFUSAL_ATTRIBUTE, SHUFFLE_REFUSAL)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's unfold + Linear patch embedding as the convolution it equals (the Linear's weight over the
        unfolded (channel, row, column) layout), so the passes see the patch grid: (B, N^2, D) row-major."""
        linear = self.tower.patch_embedding.linear
        patch = self.tower.patch_size
        weight = linear.weight.view(linear.out_features, -1, patch, patch)
        cells = nn.functional.conv2d(pixel_values.to(weight.dtype), weight, stride=patch)
        return cells.flatten(2).transpose(1, 2)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's complex rotation of (B, N, H, d) queries or keys, in fp32 as the tower computes it."""
        x = x.float()
        return x * self.cos + rotate_pairs(x) * self.sin

    def attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        shape = (batch, tokens, -1, attn.head_dim)
        q = self.rotate(attn.q_proj(x).view(shape)).type_as(x).transpose(1, 2)
        k = self.rotate(attn.k_proj(x).view(shape)).type_as(x).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.head_dim ** -0.5)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        x = self.embed(pixel_values)
        cls = tower.class_embedding.expand(x.shape[0], 1, x.shape[-1])
        x = tower.layernorm_pre(torch.cat([x, cls], dim=1) + tower.positional_embedding_vlm)
        for layer in tower.model.layers:
            x = x + self.attention(layer.self_attn, layer.input_layernorm(x))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = tower.layernorm_post(x)[:, :-1]
        return tower.vision_adapter(x) if self.pooling == "pooler" else x


def build_llama4_vision(name: str, choice: Any, folder: Path | None, options: ModelOptions) -> LoadedModel:
    """``hf:DIR`` holding a Llama 4 config (or its vision config): the adapter around its vision encoder."""
    size = config_size(choice.config, options, name, "Llama 4's vision encoder has a learned position table and a "
                       "rotary table for its image_size")
    return build_adapted(name, choice, folder, options, POOLINGS, "pooler",
                         lambda tower, _size, pooling: Llama4VisionAdapter(tower, pooling), size,
                         "Llama 4's vision encoder")

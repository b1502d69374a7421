"""The projectors of Idefics3 / SmolVLM, Llama 4 and Gemma 3, as their published code computes them.

* ``idefics3`` (``Idefics3Connector``): pixel shuffle with scale factor s (each s x s window of the grid -> one
  token of s*s*C channels, ``(s*di + dj)*C + c``, windows row-major: InternVL's v2 layout, ``unshuffle``'s), then
  ``modality_projection.proj``: one Linear(s*s*C -> D) without bias; no norm, no activation.
* ``llama4`` (``Llama4VisionPixelShuffleMLP`` + ``Llama4MultiModalProjector``): the same pixel shuffle (ratio 0.5),
  ``vision_adapter.mlp``: fc1 Linear(4C -> A) -> GELU -> fc2 Linear(A -> A) -> GELU (no biases), then
  ``multi_modal_projector.linear_1``: Linear(A -> D) without bias (what the language model reads).
* ``gemma3`` (``Gemma3MultiModalProjector``): AvgPool2d(kernel = stride = k) on the grid (64 x 64 -> 16 x 16 at
  k = 4), ``mm_soft_emb_norm`` (RMSNorm in float32 scaled by 1 + w, eps 1e-6) and a matmul with
  ``mm_input_projection_weight`` (C x D, a raw matrix).

State-dict names are the published modules' (``modality_projection.proj.weight``; ``vision_adapter.mlp.fc1.weight``,
``vision_adapter.mlp.fc2.weight``, ``multi_modal_projector.linear_1.weight``; ``mm_soft_emb_norm.weight``,
``mm_input_projection_weight``), so ``projector_weights`` takes the checkpoint's tensors under those names.
Initialisation: ``nn.Linear`` defaults; Gemma 3 constructs its matrix as zeros (every output 0), so here it is
drawn from N(0, 1/C) instead, and its norm weight is 0 (a scale of 1) as constructed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Grid, out_channels_or
from .pool import PoolProjector
from .unshuffle import UnshuffleProjector


class Idefics3Projector(UnshuffleProjector):
    """``idefics3``: (B, prefix + H*W, C) -> (B, (H/s)*(W/s), D), pixel shuffle then one Linear without bias."""

    name = "idefics3"

    def __init__(self, channels: int, grid: tuple[int, int] | tuple[int], prefix: int, *, scale: float = 0.5,
                 out_channels: int | None = None) -> None:
        super().__init__(channels, grid, prefix, scale=scale, ps_version="v2", out_channels=out_channels)

    def build_projector(self, wide: int) -> None:
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(wide, self.out_channels, bias=False)

    def reset_parameters(self) -> None:
        self.modality_projection.proj.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.modality_projection.proj(self.unshuffle(x))


class Llama4Projector(UnshuffleProjector):
    """``llama4``: (B, H*W, C) -> (B, (H/2)*(W/2), D): pixel shuffle, the adapter MLP (GELU after each layer),
    the multimodal projector's Linear."""

    name = "llama4"

    def __init__(self, channels: int, grid: tuple[int, int] | tuple[int], prefix: int, *, scale: float = 0.5,
                 adapter_channels: int | None = None, out_channels: int | None = None) -> None:
        self.adapter_channels = out_channels_or(adapter_channels, channels, "llama4", "adapter_channels")
        super().__init__(channels, grid, prefix, scale=scale, ps_version="v2", out_channels=out_channels)

    def build_projector(self, wide: int) -> None:
        a = self.adapter_channels
        self.vision_adapter = nn.Module()
        self.vision_adapter.mlp = nn.Module()
        self.vision_adapter.mlp.fc1 = nn.Linear(wide, a, bias=False)
        self.vision_adapter.mlp.fc2 = nn.Linear(a, a, bias=False)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(a, self.out_channels, bias=False)

    def reset_parameters(self) -> None:
        for layer in (self.vision_adapter.mlp.fc1, self.vision_adapter.mlp.fc2, self.multi_modal_projector.linear_1):
            layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        mlp = self.vision_adapter.mlp
        gelu = nn.functional.gelu
        hidden = gelu(mlp.fc2(gelu(mlp.fc1(self.unshuffle(x)))))
        return self.multi_modal_projector.linear_1(hidden)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter_channels={self.adapter_channels}"


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: float32, scaled by (1 + weight)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Gemma3Projector(PoolProjector):
    """``gemma3``: (B, prefix + H*W, C) -> (B, (H/k)*(W/k), D): average pool, soft-embedding RMSNorm, matrix."""

    name = "gemma3"

    def __init__(self, channels: int, grid: tuple[int, int] | tuple[int], prefix: int, *, stride: int = 4,
                 out_channels: int | None = None) -> None:
        super().__init__(channels, grid, prefix, stride=stride, mode="avg", prefix_mode="drop")
        self.require_2d()
        self.out_channels = out_channels_or(out_channels, channels, self.name)
        self.mm_soft_emb_norm = GemmaRMSNorm(channels)
        self.mm_input_projection_weight = nn.Parameter(torch.empty(channels, self.out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mm_soft_emb_norm.weight)
        nn.init.normal_(self.mm_input_projection_weight, std=self.channels ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        pooled = super().forward(x)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)

    def channels_out(self) -> int:
        return self.out_channels

    def output_grid(self) -> Grid | None:
        return self.out_grid

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_channels={self.out_channels}"

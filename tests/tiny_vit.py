"""A small ViT written for the tests: no timm, its own attribute names, attention as matmul-softmax-matmul."""

from __future__ import annotations

import math

import torch
from torch import nn

from .reference import attention, reference_merge


class Layer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_a = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.ln_b = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        y = self.ln_a(h)
        q, k, v = self.split(self.to_q(y)), self.split(self.to_k(y)), self.split(self.to_v(y))
        w = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        w = w.softmax(dim=-1)
        z = torch.matmul(w, v).transpose(1, 2).reshape(b, n, c)
        h = h + self.out(z)
        return h + self.ff(self.ln_b(h))


class TinyViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, width: int = 48, depth: int = 4, heads: int = 3,
                 classes: int = 10, class_token: bool = True) -> None:
        super().__init__()
        self.embedder = nn.Conv2d(3, width, patch, patch)
        tokens = (image // patch) ** 2 + int(class_token)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width)) if class_token else None
        self.positions = nn.Parameter(torch.randn(1, tokens, width) * 0.1)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(depth))
        self.final_ln = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.embedder(images).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            h = torch.cat([self.class_embedding.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.positions
        for layer in self.layers:
            h = layer(h)
        h = self.final_ln(h)
        pooled = h[:, 0] if self.class_embedding is not None else h.mean(dim=1)
        return self.classifier(pooled)


@torch.no_grad()
def reference_tome_tiny_vit(model: TinyViT, images: torch.Tensor, schedule: list[int], prop_attn: bool = True):
    protected = int(model.class_embedding is not None)
    outputs = []
    for image in images:
        h = model.embedder(image[None]).flatten(2).transpose(1, 2)[0]
        if protected:
            h = torch.cat([model.class_embedding[0], h])
        h = h + model.positions[0]
        size = torch.ones(h.shape[0], 1)
        for layer, r in zip(model.layers, schedule):
            n, c = h.shape
            y = layer.ln_a(h)
            q, k, v = (t.view(n, layer.heads, c // layer.heads).transpose(0, 1) for t in (layer.to_q(y), layer.to_k(y), layer.to_v(y)))
            h = h + layer.out(attention(q, k, v, size, prop_attn).transpose(0, 1).reshape(n, c))
            h, size = reference_merge(h, k.mean(dim=0), size, r, protected)
            h = h + layer.ff(layer.ln_b(h))
        h = model.final_ln(h)
        # Global average pooling after ToMe is size-weighted, as the published code pools its MAE models.
        outputs.append(model.classifier(h[0] if protected else (h * size).sum(dim=0) / size.sum(dim=0)))
    return torch.stack(outputs)

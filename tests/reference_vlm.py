"""Vision-language models' tower + projector as their published code runs them, one image (or frame) at a time.

Nothing here imports tc_export. The tower is the transformers vision model itself, read the way each model's code
reads it (``hidden_states[layer]``: the stream after that block, before any post-norm); the projectors are the
plain references of ``reference_projectors``, fed the state dict of the module under test:

- LLaVA-1.5 (``clip_encoder.py`` ``feature_select``, ``builder.py``): hidden_states[-2], class token dropped
  (``patch``), mlp2x_gelu;
- LLaVA-PruMerge (``token_prune_merge_advanced``): the same hidden_states[-2]; the last layer's ``layer_norm1``
  then ``q_proj`` / ``k_proj`` on it score the tokens (one full-width class attention); the class token is not in
  the output: [K kept tokens in rank order, the extra token]; then mlp2x_gelu;
- LLaVA-NeXT-Video (transformers ``get_video_features``): per frame hidden_states[-2], class token dropped, 2x2
  average pool, then the projector;
- LLaVA-OneVision video (transformers ``get_video_features`` + ``apply_pooling``): per frame hidden_states[-1] of
  the tower without its last layer (= hidden_states[-2] of the full tower), every token, the projector, then
  bilinear pooling to ceil(H/2);
- InternVL (``extract_feature``): hidden_states[-1] (``last_hidden_state``, no post-norm), class token dropped,
  pixel shuffle v2, ``mlp1``;
- Honeybee (``c-abs.yaml``: ``feature_layer_index: -1``): hidden_states[-1], the C-Abstractor (which drops the class
  token itself).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference_projectors as ref
from .reference import reference_prumerge


def vision_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers vision transformer inside an exported tower wrapper (``wrapper.model.vision_model``)."""
    model = module.model
    return getattr(model, "vision_model", model)


def hidden_states(tower: torch.nn.Module, pixels: Tensor) -> tuple[Tensor, ...]:
    """transformers' ``hidden_states``: the embeddings, then the stream after every block (no post-norm)."""
    with torch.no_grad():
        return tower(pixel_values=pixels, output_hidden_states=True).hidden_states


def llava15(tower: torch.nn.Module, pixels: Tensor, mlp: dict) -> Tensor:
    features = hidden_states(tower, pixels)[-2][:, 1:]
    return ref.mlp2x_gelu(features, mlp, "net.0", "net.2")


def llava_prumerge(tower: torch.nn.Module, pixels: Tensor, tokens: int, mlp: dict) -> Tensor:
    """One sample at a time: [kept (rank order), extra] of hidden_states[-2], scored by the last layer's q and k."""
    layer = tower.encoder.layers[-1]
    outs = []
    with torch.no_grad():
        for x in hidden_states(tower, pixels)[-2]:
            normed = layer.layer_norm1(x)
            query, key = layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)
            rows, _ = reference_prumerge(x, torch.ones(x.shape[0], 1), query, key, tokens, protected=1, extra=True)
            outs.append(rows[1:])  # the published output has no class token
    return ref.mlp2x_gelu(torch.stack(outs), mlp, "net.0", "net.2")


def _grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    assert side * side == tokens
    return side, side


def llava_next_video(tower: torch.nn.Module, video: Tensor, mlp: dict) -> Tensor:
    """(B, T, 3, H, W) -> (B, T * H/2 * W/2, D): per frame, drop the class token, average-pool 2x2, project."""
    frames = []
    for t in range(video.shape[1]):
        features = hidden_states(tower, video[:, t])[-2][:, 1:]
        pooled = ref.reference_pool(features, _grid(features.shape[1]), 0, 2, "avg", keep_prefix=False)
        frames.append(ref.mlp2x_gelu(pooled, mlp, "net.0", "net.2"))
    return torch.cat(frames, dim=1)


def llava_onevision_video(tower: torch.nn.Module, video: Tensor, mlp: dict) -> Tensor:
    """(B, T, 3, H, W) -> (B, T * ceil(H/2) * ceil(W/2), D): per frame, project every token, then bilinear pool."""
    frames = []
    for t in range(video.shape[1]):
        features = hidden_states(tower, video[:, t])[-2]  # the last layer of the tower OneVision keeps
        projected = ref.mlp2x_gelu(features, mlp, "net.0", "net.2")
        frames.append(ref.reference_pool(projected, _grid(features.shape[1]), 0, 2, "bilinear", keep_prefix=False))
    return torch.cat(frames, dim=1)


def internvl(tower: torch.nn.Module, pixels: Tensor, mlp1: dict) -> Tensor:
    features = hidden_states(tower, pixels)[-1]
    return ref.reference_unshuffle_projector(features, mlp1, _grid(features.shape[1] - 1), 1, 2)


def honeybee(tower: torch.nn.Module, pixels: Tensor, abstractor: dict, hidden: int, out: int, tokens: int) -> Tensor:
    features = hidden_states(tower, pixels)[-1]
    channels, grid = features.shape[-1], _grid(features.shape[1] - 1)
    module = ref.HoneybeeCAbstractor(channels, hidden, out, math.isqrt(tokens), features.shape[1])
    state = dict(abstractor)
    state["pos_emb"] = torch.cat([torch.zeros(1, 1, channels), state["pos_emb"]], dim=1)  # its class-token row
    module.load_state_dict(state, strict=True)
    with torch.no_grad():
        return module(features, grid)

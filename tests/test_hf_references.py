"""Compressed transformers CLIP and DINOv2 towers against an independent per-sample ToMe / Top-K written here from
the models' weights (not against their own ONNX)."""

import pytest
import torch

from tc_export import compress
from tc_export.passes import ToMeConfig, TopKConfig

from .reference import reference_merge, reference_topk
from .test_hf_models import tiny


@torch.no_grad()
def reference_hf_vision(encoder, images, step, prop_attn: bool):
    """CLIP vision or DINOv2 (transformers) one image at a time; ``step`` after each attention residual add."""
    encoder = getattr(encoder, "vision_model", encoder)  # CLIPVisionModel or its CLIPVisionTransformer
    clip = hasattr(encoder, "pre_layrnorm")
    outputs = []
    for image in images:
        if clip:
            model = encoder
            h = model.pre_layrnorm(model.embeddings(image[None]))[0]
            layers = model.encoder.layers
        else:
            h = encoder.embeddings(image[None])[0]
            layers = encoder.encoder.layer
        size = torch.ones(h.shape[0], 1)
        for index, layer in enumerate(layers):
            attn = layer.self_attn if clip else layer.attention
            y = (layer.layer_norm1 if clip else layer.norm1)(h)
            n, c = y.shape
            heads = c // attn.head_dim
            q, k, v = (proj(y).view(n, heads, -1).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5
            if prop_attn:
                logits = logits + size[:, 0].log()[None, None, :]
            probs = logits.softmax(-1)
            out = (probs @ v).transpose(0, 1).reshape(n, -1)
            out = attn.out_proj(out) if clip else layer.layer_scale1(attn.o_proj(out))
            h = h + out
            h, size = step(index, h, size, k, probs)
            h = h + (layer.mlp(layer.layer_norm2(h)) if clip else layer.layer_scale2(layer.mlp(layer.norm2(h))))
        outputs.append(model.post_layernorm(h[0]) if clip else encoder.layernorm(h)[0])
    return torch.stack(outputs)


CASES = {
    "clip-tome": ("clip", ToMeConfig(r=3), True, lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, 3, 1)),
    "dinov2-tome": ("dinov2", ToMeConfig(r=2), True, lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, 2, 1)),
    "clip-topk": ("clip", TopKConfig(keep=0.5, layers=(1,), fuse=True), False,
                  lambda i, x, s, k, p: reference_topk(x, s, p[:, 0].mean(0), 0.5, 1, True, False) if i == 1 else (x, s)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_tower_matches_independent_reference(name):
    kind, config, prop_attn, step = CASES[name]
    loaded = tiny(kind)
    inputs = loaded.example_inputs(batch=2)
    compressed = compress(loaded, config, inputs)
    encoder = loaded.module.model
    want = reference_hf_vision(encoder, inputs["pixel_values"], step, prop_attn)
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)

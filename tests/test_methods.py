"""Top-K pruning, PruMerge and adjacent merging: each op and each pass against the independent reference."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.errors import ConfigError
from tc_export.ops.adjacent import adjacent_merge
from tc_export.ops.prumerge import prumerge
from tc_export.ops.topk import keep_count, topk_prune
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from .conftest import tiny_timm_vit
from .reference import (
    reference_adjacent,
    reference_timm_blocks,
    reference_keep_count,
    reference_merge,
    reference_prumerge,
    reference_topk,
)
from .tiny_vit import TinyViT


def _inputs(batch=3, tokens=21, channels=8, seed=0, padded=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g)
    metric = torch.randn(batch, tokens, 5, generator=g)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=g).float()
    if padded:
        size[:, -padded:] = 0.0  # padding: no weight anywhere
    cls_attn = torch.randn(batch, tokens, generator=g).softmax(-1)
    return x, metric, size, cls_attn


def _per_sample(reference, batch, *tensors):
    results = [reference(*(t[b] for t in tensors)) for b in range(batch)]
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


@pytest.mark.parametrize("tokens", [7, 10, 16, 21])
@pytest.mark.parametrize("keep", [0.7, 0.5, 0.25])
def test_keep_count_is_exact(tokens, keep):
    assert keep_count(tokens, keep, 1) == reference_keep_count(tokens, keep, 1)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep_order", [False, True])
@pytest.mark.parametrize("protected", [1, 2])
def test_topk_op_matches_reference(fuse, keep_order, protected):
    x, _, size, cls_attn = _inputs(padded=3)
    keep = reference_keep_count(21, 0.6, protected)
    got_x, got_size = topk_prune(x, size, cls_attn, keep, protected, fuse, keep_order)
    want_x, want_size = _per_sample(
        lambda a, s, c: reference_topk(a, s, c, 0.6, protected, fuse, keep_order), 3, x, size, cls_attn
    )
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_size, want_size)
    assert got_x.shape[1] == protected + keep + int(fuse)


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("protected,neighbours", [(1, 32), (1, 4), (2, 32), (3, 7)])
def test_prumerge_op_matches_reference(extra, protected, neighbours):
    x, _, size, _ = _inputs(tokens=40, seed=1 + protected)
    g = torch.Generator().manual_seed(11)
    query, key = torch.randn(3, 40, 12, generator=g), torch.randn(3, 40, 12, generator=g)
    got_x, got_size = prumerge(x, size, query, key, 6, protected, extra, neighbours)
    want_x, want_size = _per_sample(
        lambda a, s, q, k: reference_prumerge(a, s, q, k, 6, protected, extra, neighbours), 3, x, size, query, key
    )
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_size, want_size)
    assert got_x.shape[1] == protected + 6 + int(extra)


@pytest.mark.parametrize("tokens,r,protected", [(21, 4, 1), (20, 10, 0), (21, 3, 0), (9, 99, 2)])
def test_adjacent_op_matches_reference(tokens, r, protected):
    x, metric, size, _ = _inputs(tokens=tokens, seed=2, padded=2)
    got_x, got_size = adjacent_merge(x, metric, size, r, protected)
    want_x, want_size = _per_sample(lambda a, m, s: reference_adjacent(a, m, s, r, protected), 3, x, metric, size)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_size, want_size)
    assert not got_x.isnan().any()


def _scattered_pads(size, seed):
    """Padding at random places (not only at the end), as size 0."""
    g = torch.Generator().manual_seed(seed)
    size = size.clone()
    size[torch.rand(size.shape, generator=g) < 0.35] = 0.0
    return size


@pytest.mark.parametrize("r", [3, 8, 10])
def test_tome_op_padding_rule(r):
    from tc_export.ops.tome import tome_merge

    x, metric, size, _ = _inputs(seed=3)
    size = _scattered_pads(size, seed=r)
    got_x, got_size = tome_merge(x, metric, size, r, 1, padded=True)
    assert not got_x.isnan().any()
    for b in range(3):
        want_x, want_size = reference_merge(x[b], metric[b], size[b], r, 1, padded=True)
        torch.testing.assert_close(got_x[b], want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_size[b], want_size)


@pytest.mark.parametrize("r", [2, 6])
def test_adjacent_op_padding_rule(r):
    x, metric, size, _ = _inputs(tokens=20, seed=7)
    size = _scattered_pads(size, seed=r)
    got_x, got_size = adjacent_merge(x, metric, size, r, 0, padded=True)
    want_x, want_size = _per_sample(lambda a, m, s: reference_adjacent(a, m, s, r, 0, padded=True), 3, x, metric, size)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_size, want_size)


def test_pad_contents_never_reach_real_tokens():
    """Whatever the padded positions hold, real tokens come out the same (merges are forced among them too)."""
    from tc_export.ops.tome import tome_merge

    x, metric, size, _ = _inputs(seed=8, padded=6)
    noisy_x, noisy_metric = x.clone(), metric.clone()
    noisy_x[:, -6:] = torch.randn(3, 6, x.shape[2]) * 100
    noisy_metric[:, -6:] = torch.randn(3, 6, metric.shape[2])
    for merge in (lambda a, m: tome_merge(a, m, size, 9, 1, padded=True),
                  lambda a, m: adjacent_merge(a, m, size, 9, 1, padded=True)):
        clean, clean_size = merge(x, metric)
        noisy, noisy_size = merge(noisy_x, noisy_metric)
        real = clean_size[..., 0] > 0
        torch.testing.assert_close(noisy_size, clean_size)
        torch.testing.assert_close(noisy[real], clean[real])


def test_adjacent_keeps_temporal_order():
    x = torch.arange(8.0).reshape(1, 8, 1)
    metric = torch.tensor([[1, 0], [1, 0.01], [0, 1], [1, 0], [0, 1], [0, 1.01], [1, 0], [-1, 0]]).float()[None]
    out, size = adjacent_merge(x, metric, None, 2, 0)
    assert out.flatten().tolist() == [0.5, 2.0, 3.0, 4.5, 6.0, 7.0]
    assert size.flatten().tolist() == [2, 1, 1, 2, 1, 1]


def _images(batch=2, size=96, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cls(probs):
    return probs[:, 0, :].mean(dim=0)


STEPS = {
    "topk": (TopKConfig(keep=0.6, layers=(1, 2)), False,
             lambda i, x, s, k, p: reference_topk(x, s, _cls(p), 0.6, 1, False, False) if i in (1, 2) else (x, s)),
    "topk-fuse-order": (TopKConfig(keep=0.5, layers=(0, 2), fuse=True, keep_order=True), False,
                        lambda i, x, s, k, p: reference_topk(x, s, _cls(p), 0.5, 1, True, True) if i in (0, 2) else (x, s)),
    "adjacent": (AdjacentConfig(r=5), True, lambda i, x, s, k, p: reference_adjacent(x, k.mean(0), s, 5, 1)),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_pass_on_timm_vit_matches_reference(name):
    config, prop_attn, step = STEPS[name]
    model = tiny_timm_vit()
    images = _images()
    compressed = compress(model, config, {"x": images[:1]})
    want, counts = reference_timm_blocks(model, images, step, prop_attn)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts


@torch.no_grad()
def reference_prumerge_timm_vit(model, images, layer: int, tokens: int, extra: bool):
    """PruMerge as LLaVA runs it, on a timm ViT one sample at a time: the tokens entering block ``layer`` are
    scored and merged with that block's full-width queries and keys; the block and the rest run on the result."""
    outputs, counts = [], []
    for image in images:
        x = model.patch_embed(image[None])[0]
        x = torch.cat([model.cls_token[0], x]) + model.pos_embed[0]
        counts = []
        for index, block in enumerate(model.blocks):
            if index == layer:
                n, c = x.shape
                q, k, _ = block.attn.qkv(block.norm1(x)).reshape(n, 3, c).unbind(1)
                x, _ = reference_prumerge(x, torch.ones(n, 1), q, k, tokens, 1, extra)
            counts.append(x.shape[0])
            x = block(x[None])[0]
        counts.append(x.shape[0])
        outputs.append(model.head(model.norm(x)[0]))
    return torch.stack(outputs), counts


@pytest.mark.parametrize("layer,extra", [(1, True), (3, False)])
def test_prumerge_pass_on_timm_vit_matches_published(layer, extra):
    model = tiny_timm_vit()
    images = _images(seed=3)
    compressed = compress(model, PruMergeConfig(tokens=12, layers=(layer,), extra=extra), {"x": images[:1]})
    want, counts = reference_prumerge_timm_vit(model, images, layer, 12, extra)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts


def test_two_stage_recipe_matches_reference():
    model = tiny_timm_vit()
    images = _images(seed=4)
    stages = [ToMeConfig(r=6, layers=(0, 1)), TopKConfig(keep=0.7, layers=(2,), fuse=True)]
    compressed = compress(model, stages, {"x": images[:1]})

    def step(i, x, s, k, p):
        if i in (0, 1):
            return reference_merge(x, k.mean(0), s, 6, 1)
        if i == 2:
            return reference_topk(x, s, _cls(p), 0.7, 1, True, False)
        return x, s

    want, counts = reference_timm_blocks(model, images, step, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts == [37, 31, 25, 19, 19]  # ceil(0.7 * 24) + class + fused


def test_class_attention_from_explicit_softmax():
    """The own ViT (matmul-softmax-matmul): Top-K reads the class row of the softmax the model computes."""
    torch.manual_seed(5)
    model = TinyViT(depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    compressed = compress(model, TopKConfig(keep=0.5, layers=(0,), keep_order=True), {"images": images[:1]})
    assert compressed.token_counts() == [65, 33, 33]
    with torch.no_grad():
        got = compressed(images)
        outputs = []
        for image in images:
            h = model.embedder(image[None]).flatten(2).transpose(1, 2)[0]
            h = torch.cat([model.class_embedding[0], h]) + model.positions[0]
            for index, layer in enumerate(model.layers):
                n, c = h.shape
                y = layer.ln_a(h)
                q, k, v = (t.view(n, layer.heads, c // layer.heads).transpose(0, 1)
                           for t in (layer.to_q(y), layer.to_k(y), layer.to_v(y)))
                probs = ((q @ k.transpose(-1, -2)) * (c // layer.heads) ** -0.5).softmax(-1)
                h = h + layer.out((probs @ v).transpose(0, 1).reshape(n, c))
                if index == 0:
                    h, _ = reference_topk(h, torch.ones(n, 1), _cls(probs), 0.5, 1, False, True)
                h = h + layer.ff(layer.ln_b(h))
            outputs.append(model.classifier(model.final_ln(h)[0]))
    torch.testing.assert_close(got, torch.stack(outputs), rtol=1e-4, atol=2e-5)


EXPORTED = {**{name: step[0] for name, step in STEPS.items()}, "prumerge": PruMergeConfig(tokens=12, layers=(1,))}


@pytest.mark.parametrize("name", list(EXPORTED))
def test_methods_export_to_static_onnx(name, tmp_path):
    config = EXPORTED[name]
    model = tiny_timm_vit(depth=3)
    images = _images(batch=2, seed=6)
    compressed = compress(model, config, {"x": images})
    path = tmp_path / "m.onnx"
    proto = export_onnx(compressed.module, {"x": images}, path, ExportConfig(batch=2), input_names=["pixel_values"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, compressed(images).numpy(), rtol=1e-4, atol=5e-5)
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & {"ScatterElements", "ScatterND", "NonZero", "Loop", "If"}


def test_class_token_methods_refuse_models_without_one():
    model = TinyViT(class_token=False).eval()
    for config in (TopKConfig(keep=0.5), PruMergeConfig(tokens=8)):
        with pytest.raises(ConfigError, match="no class token"):
            compress(model, config, {"images": torch.randn(1, 3, 32, 32)})


@pytest.mark.parametrize("configs,message", [
    ([TopKConfig(keep=0.5, layers=(4,))], "layer 4 is out of range.*0-3"),
    ([PruMergeConfig(tokens=36)], "at most 35"),
    ([ToMeConfig(r=2, layers=(0, 1)), TopKConfig(layers=(1,))], "layer 1 is claimed by both tome and topk"),
    ([AdjacentConfig(r=19)], "at most 18 adjacent pairs"),
])
def test_bad_plans_are_named(configs, message):
    with pytest.raises(ConfigError, match=message):
        compress(tiny_timm_vit(), configs, {"x": _images(1)})


@pytest.mark.parametrize("make,message", [
    (lambda: TopKConfig(keep=0.0), "keep must be a fraction"),
    (lambda: TopKConfig(keep=1.5), "keep must be a fraction"),
    (lambda: TopKConfig(layers=(-1,)), "layers must be whole numbers"),
    (lambda: PruMergeConfig(tokens=0), "tokens must be"),
    (lambda: AdjacentConfig(r=-2), "r must be"),
])
def test_bad_configs_fail_at_construction(make, message):
    with pytest.raises(ConfigError, match=message):
        make()

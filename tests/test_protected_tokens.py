"""Protected tokens, pooling and the published ToMe order across timm ViT families, against the independent
per-sample reference (tests/reference.py), not against the export."""

import pytest
import timm
import torch

from tc_export import ToMeConfig, compress
from tc_export.passes import TopKConfig

from .reference import reference_merge, reference_timm_blocks, reference_topk

FAMILIES = {
    # arch: (overrides, protected tokens the graph holds)
    "deit_tiny_distilled_patch16_224": ({"img_size": 64}, 2),  # class + distillation, two heads
    "vit_little_patch16_reg4_gap_256": ({"img_size": 64, "embed_dim": 64, "num_heads": 2}, 4),  # registers, GAP
    "vit_base_patch16_gap_224": ({"img_size": 64, "embed_dim": 64, "num_heads": 2}, 0),  # no class token, GAP
    "vit_tiny_patch16_224": ({"img_size": 64}, 1),
    "vit_small_patch14_reg4_dinov2": ({"img_size": 56, "embed_dim": 64, "num_heads": 2}, 5),  # class + 4 registers
}


def _model(arch):
    torch.manual_seed(0)
    overrides, _ = FAMILIES[arch]
    return timm.create_model(arch, depth=3, **overrides).eval()


def _images(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_tome_matches_published_order_and_pooling(arch):
    model = _model(arch)
    protected = FAMILIES[arch][1]
    images = _images(size=FAMILIES[arch][0]["img_size"])
    compressed = compress(model, ToMeConfig(r=3), {"x": images[:1]})
    assert compressed.protected == protected

    def step(i, x, s, k, p):
        return reference_merge(x, k.mean(0), s, 3, protected)

    want, counts = reference_timm_blocks(model, images, step, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts


def test_distillation_token_stays_at_index_1():
    """The published order with a distillation token: [cls, dist, unmerged A..., B...]."""
    model = _model("deit_tiny_distilled_patch16_224")
    compressed = compress(model, ToMeConfig(r=3), {"x": _images(1)})
    merges = [m for m in compressed.module.modules() if type(m).__name__ == "ToMeMerge"]
    assert merges and all(m.protected == 2 for m in merges)
    x = torch.randn(2, 17, 8)
    metric = torch.randn(2, 17, 4)
    out, _ = merges[0](x, None, metric)
    torch.testing.assert_close(out[:, :2], x[:, :2])


def test_sorted_unmerged_option_differs_without_class_token():
    """Without a class token the published code leaves unmerged tokens in score order; the option sorts them."""
    model = _model("vit_base_patch16_gap_224")
    images = _images()
    published = compress(model, ToMeConfig(r=3), {"x": images[:1]})
    sorted_ = compress(model, ToMeConfig(r=3, sort_unmerged=True), {"x": images[:1]})

    def step(i, x, s, k, p):
        return reference_merge(x, k.mean(0), s, 3, 0, sort_unmerged=True)

    want, _ = reference_timm_blocks(model, images, step, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(sorted_(images), want, rtol=1e-4, atol=2e-5)
        assert not torch.allclose(published(images), want, rtol=1e-4, atol=2e-5)


def test_protected_override_is_used():
    model = _model("vit_tiny_patch16_224")
    images = _images()
    compressed = compress(model, ToMeConfig(r=3, protected=3), {"x": images[:1]})
    assert compressed.protected == 3 and compressed.report.protected_source == "given with --protected"

    def step(i, x, s, k, p):
        return reference_merge(x, k.mean(0), s, 3, 3)

    want, _ = reference_timm_blocks(model, images, step, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)


def test_evit_fused_token_on_registers():
    """Top-K with registers: all five prefix tokens stay first; the fused token is the weighted sum."""
    model = _model("vit_small_patch14_reg4_dinov2")
    images = _images(seed=2, size=56)
    compressed = compress(model, TopKConfig(keep=0.5, layers=(1,), fuse=True), {"x": images[:1]})

    def step(i, x, s, k, p):
        return reference_topk(x, s, p[:, 0, :].mean(0), 0.5, 5, True, False) if i == 1 else (x, s)

    want, counts = reference_timm_blocks(model, images, step, prop_attn=False)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts

"""The ToMe graph pass on timm's ViT and on a ViT written here, against the independent reference."""

import pytest
import torch
from torch import nn

from tc_export import compress
from tc_export.errors import ConfigError, StructureNotFoundError
from tc_export.ops.tome import ToMeMerge
from tc_export.passes import ToMeConfig

from .conftest import tiny_timm_vit
from .reference import reference_tome_timm_vit
from .tiny_vit import TinyViT, reference_tome_tiny_vit


def _images(batch=3, size=96, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [ToMeConfig(r=4), ToMeConfig(r=6, inflection=0.5), ToMeConfig(r=(8, 0, 3, 2)),
                                    ToMeConfig(r=5, prop_attn=False)])
def test_timm_vit_matches_reference(config):
    model = tiny_timm_vit()
    images = _images()
    compressed = compress(model, config, {"x": images[:1]})
    want, counts = reference_tome_timm_vit(model, images, config.schedule(4), prop_attn=config.prop_attn)
    with torch.no_grad():
        got = compressed(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == counts


def test_token_counts_follow_the_cap():
    model = tiny_timm_vit(depth=6)  # 36 patches + class token
    compressed = compress(model, ToMeConfig(r=8), {"x": _images(1)})
    # 37 -> 29 -> 21 -> 13 -> 7 (cap (13-1)//2 = 6) -> 4 (cap 3) -> 3 (cap 1)
    assert compressed.token_counts() == [37, 29, 21, 13, 7, 4, 3]


def test_own_vit_with_explicit_attention_matches_reference():
    torch.manual_seed(1)
    model = TinyViT().eval()
    images = torch.randn(2, 3, 32, 32)
    compressed = compress(model, ToMeConfig(r=8), {"images": images[:1]})
    want = reference_tome_tiny_vit(model, images, [8] * 4)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == [65, 57, 49, 41, 33]
    merges = [m for m in compressed.module.modules() if isinstance(m, ToMeMerge)]
    assert [m.protected for m in merges] == [1] * 4  # the class token was found from the graph


def test_own_vit_without_class_token_protects_nothing():
    torch.manual_seed(2)
    model = TinyViT(class_token=False).eval()
    images = torch.randn(2, 3, 32, 32)
    compressed = compress(model, ToMeConfig(r=10), {"images": images[:1]})
    want = reference_tome_tiny_vit(model, images, [10] * 4)
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)
    assert compressed.token_counts() == [64, 54, 44, 34, 24]


def test_distillation_token_is_detected():
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2).eval()
    compressed = compress(model, ToMeConfig(r=3), {"x": _images(1, 64)})
    merges = [m for m in compressed.module.modules() if isinstance(m, ToMeMerge)]
    assert [m.protected for m in merges] == [2, 2]
    assert compressed.token_counts() == [18, 15, 12]


def test_r_too_large_names_the_maximum():
    with pytest.raises(ConfigError, match="at most 18"):
        compress(tiny_timm_vit(), ToMeConfig(r=19), {"x": _images(1)})


def test_model_without_attention_says_what_is_missing():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(StructureNotFoundError, match="no attention found"):
        compress(cnn, ToMeConfig(r=2), {"input": _images(1, 16)})


def test_attention_without_residual_is_reported():
    class NoResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    with pytest.raises(StructureNotFoundError, match="no residual add"):
        compress(NoResidual(), ToMeConfig(r=2), {"x": torch.randn(1, 10, 8)})

"""Methods acting on the tower's output (``--features N``): PruMerge (and Top-K) scored by layer N + 1's norm and q/k
projections, as LLaVA-PruMerge runs it, with the class token dropped and projectors following; checked per sample
against the published behaviour (``tests/reference.py``) on a small timm ViT."""

import pytest
import timm
import torch

from tc_export import compress
from tc_export.errors import ConfigError
from tc_export.passes.projectors import MLPConfig
from tc_export.passes.prumerge import PruMergeConfig
from tc_export.passes.topk import TopKConfig

from .reference import reference_prumerge, reference_topk


def _vit(depth=3):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=depth).eval()  # 4 x 4 grid + class token


def _images(batch=2, seed=0):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _scored(model, images, layer):
    """Layer ``layer``'s output and the next block's full-width q and k on it (its norm1, then qkv)."""
    width = model.embed_dim
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[: layer + 1]:
            x = block(x)
        scorer = model.blocks[layer + 1]
        qkv = scorer.attn.qkv(scorer.norm1(x))
    return x, qkv[..., :width], qkv[..., width : 2 * width]


def _reference(model, images, layer, tokens, keep_prefix=False):
    """[kept, extra] per sample, as LLaVA-PruMerge hands them to the projector."""
    outs = []
    for sample, q, k in zip(*_scored(model, images, layer)):
        rows, _ = reference_prumerge(sample, torch.ones(sample.shape[0], 1), q, k, tokens, 1, extra=True)
        outs.append(rows if keep_prefix else rows[1:])
    return torch.stack(outs)


def _reference_topk(model, images, layer, keep, keep_order):
    """Class attention of the next layer, per head then averaged; EViT's selection; class token dropped."""
    heads = model.blocks[layer + 1].attn.num_heads
    outs = []
    for sample, q, k in zip(*_scored(model, images, layer)):
        d = q.shape[-1] // heads
        per_head = [torch.softmax(q[0, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T * d ** -0.5, dim=-1)
                    for h in range(heads)]
        rows, _ = reference_topk(sample, torch.ones(sample.shape[0], 1), sum(per_head) / heads, keep, 1, False,
                                 keep_order)
        outs.append(rows[1:])
    return torch.stack(outs)


def test_prumerge_at_the_tower_output_is_llava_prumerge():
    model, images = _vit(), _images()
    compressed = compress(model, PruMergeConfig(tokens=6), {"x": images[:1]}, features=-2)
    assert compressed.token_counts() == [17, 17, 7]  # 6 kept + the extra token, no class token
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), _reference(model, images, 1, 6))
    kept = compress(model, PruMergeConfig(tokens=6, prefix_mode="keep"), {"x": images[:1]}, features=-2)
    with torch.no_grad():
        torch.testing.assert_close(kept(images), _reference(model, images, 1, 6, keep_prefix=True))


def test_prumerge_at_the_tower_output_then_the_projector():
    model, images = _vit(depth=4), _images(seed=1)
    compressed = compress(model, [PruMergeConfig(tokens=5, layers=(2,)), MLPConfig(out_channels=24)],
                          {"x": images[:1]}, features=1)
    mlp = compressed.module.mlpprojector_encoder
    assert mlp.prefix == 0 and compressed.token_counts()[-1] == 6
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), mlp.net(_reference(model, images, 1, 5)))


def test_prumerge_scoring_layer_must_follow_the_cut():
    model, images = _vit(depth=4), _images()
    with pytest.raises(ConfigError, match="layer 3 comes after the --features layer 1, .*: --layers 2"):
        compress(model, PruMergeConfig(tokens=5), {"x": images[:1]}, features=1)
    with pytest.raises(ConfigError, match="would drop the 1 class/register tokens the later blocks read"):
        compress(model, PruMergeConfig(tokens=5, prefix_mode="drop"), {"x": images[:1]})


@pytest.mark.parametrize("keep_order", [False, True])
def test_topk_at_the_tower_output_scores_with_the_next_layer(keep_order):
    model, images = _vit(), _images(seed=2)
    compressed = compress(model, TopKConfig(keep=0.5, layers=(2,), keep_order=keep_order), {"x": images[:1]},
                          features=-2)
    assert compressed.token_counts() == [17, 17, 8]
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), _reference_topk(model, images, 1, 0.5, keep_order))


def test_one_method_at_the_tower_output():
    with pytest.raises(ConfigError, match="prumerge and topk both act on the tower output"):
        compress(_vit(), [PruMergeConfig(tokens=5), TopKConfig(layers=(2,))], {"x": _images()[:1]}, features=-2)

"""Rotary encoders compressed with their rotary tables recomputed from the carried positions, against the
per-sample forwards of tests/reference_rotary.py (the models' own rope at each token's kept or merged position)."""

import pytest
import torch

from tc_export import compress
from tc_export.errors import TCExportError
from tc_export.passes import ToMeConfig, TopKConfig

from . import reference_rotary as rotary
from .reference import reference_merge, reference_topk

# arch -> extra timm kwargs; all small: depth 3, width 64, 2 heads, a 6x6 grid
TIMM_ROTARY = {
    "vit_base_patch16_rope_224": {"global_pool": "token"},  # axial
    "vit_base_patch16_rope_mixed_224": {"global_pool": "token"},  # learned per-head frequencies
    "vit_base_patch16_rope_reg1_gap_256": {},  # 1 register, average pooling
    "eva02_base_patch14_224": {"global_pool": "token"},
    "vit_base_patch16_dinov3": {"global_pool": "token"},  # class + 4 registers, coordinates in [-1, 1]
    "vit_pe_core_base_patch16_224": {},  # MAP head over every token
}


def small_rotary(arch: str, qk_std: float = 0.5) -> torch.nn.Module:
    """A small random model whose queries and keys are large enough that the rotary angles matter."""
    import timm

    torch.manual_seed(0)
    size = 84 if "patch14" in arch else 96
    model = timm.create_model(arch, num_classes=0, depth=3, embed_dim=64, num_heads=2, img_size=size,
                              **TIMM_ROTARY[arch]).eval()
    for name, parameter in model.named_parameters():
        if parameter.dim() == 2 and any(part in name for part in ("attn.qkv", "attn.q_proj", "attn.k_proj")):
            parameter.data.normal_(0, qk_std)
    return model


def _images(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    size = model.patch_embed.img_size
    return {"x": torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))}


def _tome(r: int, prefix: int, carry: bool = True):
    def step(i, x, size, pos, keys, probs):
        x, size, new = rotary.with_positions(lambda t, s: reference_merge(t, keys.mean(0), s, r, prefix), x, size, pos)
        return x, size, new if carry else pos[: x.shape[0]]  # not carried: the table's first rows

    return step


def _topk(keep: float, layers: tuple[int, ...], prefix: int, carry: bool = True):
    def step(i, x, size, pos, keys, probs):
        if i not in layers:
            return x, size, pos
        x, size, new = rotary.with_positions(
            lambda t, s: reference_topk(t, s, probs[:, 0].mean(0), keep, prefix, False, False), x, size, pos)
        return x, size, new if carry else pos[: x.shape[0]]

    return step


def _case(arch: str, method: str):
    model = small_rotary(arch)
    prefix = model.num_prefix_tokens
    if method == "tome":
        return model, ToMeConfig(r=4), (lambda carry=True: _tome(4, prefix, carry)), True
    return model, TopKConfig(keep=0.5, layers=(0, 1)), (lambda carry=True: _topk(0.5, (0, 1), prefix, carry)), False


CASES = [(arch, "tome") for arch in TIMM_ROTARY] + [
    (arch, "topk") for arch in TIMM_ROTARY if TIMM_ROTARY[arch].get("global_pool") == "token"]


@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_timm_rotary_matches_reference(arch, method):
    model, config, step, prop_attn = _case(arch, method)
    inputs = _images(model)
    want, counts = rotary.run_timm_eva(model, inputs["x"], step(), prop_attn)
    compressed = compress(model, config, inputs)
    assert counts == compressed.token_counts()
    with torch.no_grad():
        got = compressed(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["eva02_base_patch14_224", "vit_base_patch16_rope_mixed_224",
                                  "vit_base_patch16_dinov3"])
def test_positions_not_carried_fail_the_reference(arch):
    """Mutation: the same reference with each layer's table read by row (the positions not carried) is told apart
    from the compressed model."""
    model, config, step, prop_attn = _case(arch, "tome")
    inputs = _images(model)
    stale, _ = rotary.run_timm_eva(model, inputs["x"], step(carry=False), prop_attn)
    with torch.no_grad():
        got = compress(model, config, inputs)(**inputs)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, stale, rtol=1e-4, atol=1e-5)


def test_uncompressed_layers_keep_the_fixed_table():
    """A table at a site before the first op stays the model's own (rewiring starts where the tokens change)."""
    model = small_rotary("eva02_base_patch14_224")
    inputs = _images(model)
    compressed = compress(model, ToMeConfig(r=4, layers=(2,)), inputs)
    prefix = model.num_prefix_tokens
    want, _ = rotary.run_timm_eva(model, inputs["x"], lambda i, x, s, p, k, a: _tome(4, prefix)(i, x, s, p, k, a)
                                  if i == 2 else (x, s, p), True)
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=1e-5)


def test_aliased_table_is_refused():
    """A rotary table whose angle steps near half a turn per patch cannot be extended to fractional positions:
    it stays refused, naming the rotary embedding."""
    model = small_rotary("vit_base_patch16_rope_224")
    rope = model.rope
    if getattr(rope, "bands", None) is None:
        pytest.skip("this timm version caches the table")
    rope.bands = torch.full_like(rope.bands, 3.1)  # near pi per patch
    if getattr(rope, "pos_embed", None) is not None and rope.feat_shape is not None:
        rope.pos_embed = rope._build_embed_cat(rope.feat_shape, rope.bands)
    inputs = _images(model)
    with pytest.raises(TCExportError, match="rotary position embedding"):
        compress(model, ToMeConfig(r=4), inputs)


def _saved(config, cls, folder):
    torch.manual_seed(0)
    cls(config).save_pretrained(folder) if cls is not None else config.save_pretrained(folder)
    return f"hf:{folder}"


def test_transformers_rotary_stays_refused(tmp_path):
    """ModernBERT's rotary (a torch.export graph) is not enabled yet: refused, naming the rotary embedding."""
    import transformers as tf

    from tc_export.models import load_model

    config = tf.ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, cls_token_id=1, sep_token_id=2, architectures=["ModernBertModel"],
                                 layer_types=["full_attention", "full_attention"])
    loaded = load_model(_saved(config, tf.ModernBertModel, tmp_path / "mb"), warn_random=False)
    with pytest.raises(TCExportError, match="rotary position embedding"):
        compress(loaded, ToMeConfig(r=2), loaded.example_inputs(batch=2))


def test_qwen2_vl_vision_tower_is_refused_with_its_cause(tmp_path):
    import transformers as tf

    from tc_export.models import load_model

    config = tf.Qwen2VLConfig(vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2},
                              hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=100)
    with pytest.raises(TCExportError, match="PatchMerger") as error:
        load_model(_saved(config, None, tmp_path / "qwen"), warn_random=False)
    assert len(str(error.value).splitlines()) == 1

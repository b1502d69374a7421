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


# --- transformers (torch.export graphs) ----------------------------------------------------------------------------

def _modernbert(folder, qk_std: float = 0.5):
    """A small random ModernBERT saved to ``folder`` and loaded as hf:DIR: layers global, sliding (window |i - j| <=
    4, its own rope theta), global; 64 padded tokens, so the window hides most of a sample from each token."""
    import transformers as tf

    from tc_export.models import load_model

    config = tf.ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, cls_token_id=1, sep_token_id=2, local_attention=8,
                                 global_attn_every_n_layers=2, architectures=["ModernBertModel"])
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = tf.ModernBertModel(config)
    for name, parameter in model.named_parameters():
        if "Wqkv" in name:
            parameter.data.normal_(0, qk_std)
    model.save_pretrained(folder)
    return load_model(f"hf:{folder}", warn_random=False)


def _dinov3_vit(folder, qk_std: float = 0.5):
    """A small random transformers DINOv3ViT (class + 4 registers, layer scale 0.5, a 6x6 grid) as hf:DIR; its
    default config has coordinate augmentation (pos_embed_rescale 2), which eval mode turns off."""
    import transformers as tf

    from tc_export.models import load_model

    config = tf.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
                                image_size=96, patch_size=16, num_register_tokens=4, layerscale_value=0.5)
    assert config.pos_embed_rescale is not None
    torch.manual_seed(0)
    model = tf.DINOv3ViTModel(config)
    for name, parameter in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            parameter.data.normal_(0, qk_std)
    model.save_pretrained(folder)
    return load_model(f"hf:{folder}", warn_random=False)


def _padded_tome(r: int, carry: bool = True):
    def step(i, x, size, pos, keys, probs):
        x, size, new = rotary.with_positions(
            lambda t, s: reference_merge(t, keys.mean(0), s, r, 0, padded=True), x, size, pos)
        return x, size, new if carry else pos[: x.shape[0]]

    return step


def test_transformers_references_equal_the_uncompressed_models(tmp_path):
    """The per-sample forwards reproduce the models themselves (the yardstick is right): ModernBERT with its
    padding, two rope thetas and its sliding window (which hides tokens here: samples are longer than it), and
    DINOv3ViT with its unrotated prefix, normalised patch coordinates and layer scale."""
    bert = _modernbert(tmp_path / "mb")
    inputs = bert.example_inputs(batch=2)
    assert int(inputs["attention_mask"].sum(1).min()) > 2 * bert.module.model.config.sliding_window + 1
    want, _ = rotary.run_modernbert(bert.module, *inputs.values(), rotary.unchanged, False)
    no_window, _ = rotary.run_modernbert(bert.module, *inputs.values(), rotary.unchanged, False, window_at="none")
    with torch.no_grad():
        got = bert.module(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, no_window, rtol=1e-4, atol=1e-5)  # the window matters in this model
    dino = _dinov3_vit(tmp_path / "dv")
    inputs = dino.example_inputs(batch=2)
    want, _ = rotary.run_hf_dinov3(dino.module, inputs["pixel_values"], rotary.unchanged, False)
    with torch.no_grad():
        torch.testing.assert_close(dino.module(**inputs), want, rtol=1e-4, atol=1e-5)


def test_modernbert_tome_matches_reference(tmp_path):
    """ToMe on ModernBERT: both rope thetas recomputed at the carried positions, and the sliding window counted in
    them (a merged token at its size-weighted mean position). The same reference with the window by row index,
    without the window, or with positions not carried is told apart."""
    loaded = _modernbert(tmp_path / "mb")
    inputs = loaded.example_inputs(batch=2)
    compressed = compress(loaded, ToMeConfig(r=2), inputs)
    assert "layer 1: sliding-window attention" in compressed.report.rewired
    want, counts = rotary.run_modernbert(loaded.module, *inputs.values(), _padded_tome(2), True)
    assert counts == compressed.token_counts()
    with torch.no_grad():
        got = compressed(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for window_at, carry in (("row", True), ("none", True), ("carried", False)):
        stale, _ = rotary.run_modernbert(loaded.module, *inputs.values(), _padded_tome(2, carry), True, window_at)
        assert not torch.allclose(got, stale, rtol=1e-4, atol=1e-5), (window_at, carry)


@pytest.mark.parametrize("method", ["tome", "topk"])
def test_dinov3_vit_matches_reference(tmp_path, method):
    loaded = _dinov3_vit(tmp_path / "dv")
    inputs = loaded.example_inputs(batch=2)
    prefix = 5
    if method == "tome":
        config, step, prop_attn = ToMeConfig(r=4), _tome(4, prefix), True
        stale = _tome(4, prefix, carry=False)
    else:
        config, step, prop_attn = TopKConfig(keep=0.5, layers=(0, 1)), _topk(0.5, (0, 1), prefix), False
        stale = _topk(0.5, (0, 1), prefix, carry=False)
    compressed = compress(loaded, config, inputs)
    assert compressed.protected == prefix
    want, counts = rotary.run_hf_dinov3(loaded.module, inputs["pixel_values"], step, prop_attn)
    assert counts == compressed.token_counts()
    with torch.no_grad():
        got = compressed(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    not_carried, _ = rotary.run_hf_dinov3(loaded.module, inputs["pixel_values"], stale, prop_attn)
    assert not torch.allclose(got, not_carried, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("job", [
    ("mb", ["--method", "tome", "--r", "2"], "tokens per layer: 64 62 60 58"),
    ("dv", ["--method", "tome", "--r", "2"], "tokens per layer: 41 39 37 35"),
    ("dv", ["--method", "topk", "--keep", "0.5", "--layers", "0,1"], "tokens per layer: 41 23 14 14"),
], ids=["modernbert-tome", "dinov3vit-tome", "dinov3vit-topk"])
def test_transformers_rotary_exports_through_the_cli(tmp_path, capsys, job):
    from .test_cli import run_cli

    kind, method, tokens = job
    (_modernbert if kind == "mb" else _dinov3_vit)(tmp_path / kind)
    code, out, err = run_cli([f"hf:{tmp_path / kind}", *method, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert tokens in out and "rotary position embedding" in out
    assert ("sliding-window attention" in out) == (kind == "mb")
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and (tmp_path / "m.onnx").is_file()


def test_sliding_window_next_to_protected_tokens_is_refused(tmp_path, capsys):
    """The window is counted in token indices; a protected token carries none: one line naming the cause."""
    from .test_cli import run_cli

    _modernbert(tmp_path / "mb")
    capsys.readouterr()  # saving the weights prints a progress bar
    code, _, err = run_cli([f"hf:{tmp_path / 'mb'}", "--method", "tome", "--r", "2", "--protected", "1",
                            "-o", tmp_path / "m.onnx"], capsys)
    assert code != 0 and "sliding-window attention" in err and "protected" in err
    assert len(err.strip().splitlines()) == 1


def test_causal_padding_mask_is_refused(tmp_path, capsys):
    """A padding mask that is also causal (BERT built as a decoder) hides tokens by position in a way no carried
    position can keep for a merged token: refused by name, not dropped with the padding mask as before."""
    import transformers as tf

    from .test_cli import run_cli

    config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=32, is_decoder=True)
    _saved(config, tf.BertModel, tmp_path / "dec")
    capsys.readouterr()
    code, _, err = run_cli([f"hf:{tmp_path / 'dec'}", "--pooling", "mean", "--method", "tome", "--r", "2",
                            "-o", tmp_path / "m.onnx"], capsys)
    assert code != 0 and "causal attention" in err
    assert len(err.strip().splitlines()) == 1


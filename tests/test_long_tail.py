"""The third round of the long tail (issue 24), each through the command line: an export with parity (and, where the
model compresses, its per-sample reference) or a one-line refusal naming the structure the model really has; never
an internal error (exit 70) or a blamed tracer. docs/long-tail.md has the table."""

from __future__ import annotations

import pytest
import torch

from tc_export import compress
from tc_export.passes import ToMeConfig

from . import reference_rotary as rotary
from .reference import reference_merge
from .test_cli import run_cli

SMALL_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def _saved(tmp_path, config_class: str, model_class: str, **settings) -> str:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings))
    model.save_pretrained(tmp_path / "model")
    return f"hf:{tmp_path / 'model'}"


def _timm_small(monkeypatch, **overrides) -> None:
    """``timm:NAME`` builds a small variant: the overrides go to every ``timm.create_model`` call."""
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **overrides}))


def _refused(args, capsys, tmp_path) -> str:
    capsys.readouterr()  # saving a model printed a progress bar
    code, out, err = run_cli([*args, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "m.onnx").exists()
    return err


def _roformer(tmp_path) -> str:
    return _saved(tmp_path, "RoFormerConfig", "RoFormerModel", embedding_size=32, max_position_embeddings=64,
                  **SMALL_TEXT)


@pytest.mark.parametrize("protected", [None, 1])
def test_roformer_exports_with_parity(tmp_path, capsys, protected):
    """RoFormer has only eager attention, which adds the padding mask to its scores itself: the padding pass now
    takes that mask out and the size bias in (was: exit 70, 'the size of tensor a (60) must match ... (64)')."""
    extra = [] if protected is None else ["--protected", str(protected)]
    code, out, err = run_cli([_roformer(tmp_path), "--method", "tome", "--r", "2", *extra,
                              "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "tokens per layer: 64 62 60" in out
    assert "parity PyTorch vs ONNX Runtime (2 seeded inputs, atol 0.0001, rtol 0.001): passed" in out


def test_roformer_matches_reference(tmp_path):
    """ToMe on padded RoFormer against its per-sample forward (tests/reference_rotary.run_roformer): pads kept out
    by size, rotary at the carried positions. The uncompressed reference equals the model (the yardstick is right),
    and a reference that forgot the padding is told apart."""
    from tc_export.models import load_model

    loaded = load_model(_roformer(tmp_path), warn_random=False)
    inputs = loaded.example_inputs(batch=2)
    assert int((inputs["attention_mask"] == 0).sum()) > 0  # padded
    model = loaded.module.model
    table = model.encoder.embed_positions.weight  # [sin | cos] per integer position: the reference's angles agree
    angles = rotary.roformer_angles(torch.arange(table.shape[0]).float()[:, None], table.shape[1])
    torch.testing.assert_close(table, torch.cat([angles.sin(), angles.cos()], dim=-1), rtol=0, atol=1e-5)
    with torch.no_grad():
        plain, _ = rotary.run_roformer(loaded.module, inputs, rotary.unchanged, False)
        torch.testing.assert_close(loaded.module(**inputs), plain, rtol=1e-4, atol=1e-5)

    def tome(i, x, size, pos, keys, probs):
        return rotary.with_positions(lambda t, s: reference_merge(t, keys.mean(0), s, 2, 0, padded=True), x, size, pos)

    compressed = compress(loaded, ToMeConfig(r=2), inputs)
    want, counts = rotary.run_roformer(loaded.module, inputs, tome, True)
    assert counts == compressed.token_counts() == [64, 62, 60]
    with torch.no_grad():
        got = compressed(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    def unpadded(i, x, size, pos, keys, probs):  # a pass that left the pads as real tokens
        x, size, pos = tome(i, x, size, pos, keys, probs)
        return x, size.clamp_min(1.0), pos

    stale, _ = rotary.run_roformer(loaded.module, inputs, unpadded, True)
    assert not torch.allclose(got, stale, rtol=1e-4, atol=1e-5)


def test_pit_grid_reshape_is_named(tmp_path, capsys):
    """PiT reshapes each stage's tokens back to the grid it read (was: exit 70, 'shape [1, 64, 27, 27] is
    invalid')."""
    err = _refused(["timm:pit_ti_224", "--img-size", "64", "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "reshapes the compressed tokens back to the 7 x 7 grid of the 49 tokens it read (now 45)" in err
    assert "as PiT's pooling stages do" in err


def test_deberta_v2_classifier_keeps_its_pooler_and_is_named(tmp_path, capsys):
    """DeBERTa-v2's classifier reads its ContextPooler, which the loader kept (was: 'could not trace ... dropout():
    argument input must be Tensor, not NoneType'); its attention folds the heads into a bmm's batch and applies the
    padding mask with masked_fill, both named."""
    name = _saved(tmp_path, "DebertaV2Config", "DebertaV2ForSequenceClassification", max_position_embeddings=64,
                  num_labels=3, **SMALL_TEXT)
    code, out, err = run_cli([name, "-o", tmp_path / "plain.onnx"], capsys)  # the head runs: uncompressed export
    assert code == 0 and "parity PyTorch vs ONNX Runtime" in out and "passed" in out, err
    err = _refused([name, "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "heads are folded into the batch dimension" in err and "as in DeBERTa" in err
    assert "masked_fill" in err and "could not trace" not in err


def test_funnel_einsum_attention_and_pooled_stages_are_named(tmp_path, capsys):
    name = _saved(tmp_path, "FunnelConfig", "FunnelModel", vocab_size=100, d_model=32, n_head=2, d_head=16,
                  d_inner=64, block_sizes=[1, 1], num_decoder_layers=1)
    err = _refused([name, "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "is written with einsum" in err and "Funnel Transformer" in err
    assert "pooled stages" in err and "64 queries over 128 keys" in err and "relative positions" in err


def test_wavlm_opaque_attention_is_named(tmp_path, capsys):
    name = _saved(tmp_path, "WavLMConfig", "WavLMModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    err = _refused([name, "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "the attention is opaque" in err and "torch.nn.functional.multi_head_attention_forward" in err


def test_hiera_mask_units_are_named(tmp_path, capsys):
    name = _saved(tmp_path, "HieraConfig", "HieraModel", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                  image_size=[64, 64])
    err = _refused([name, "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "windowed mask-unit attention (as in Hiera)" in err and "4 mask units of 64 tokens" in err
    assert "cross-covariance" not in err
    err = _refused(["timm:hiera_tiny_224", "--img-size", "64", "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "windowed mask-unit attention (as in Hiera)" in err and "cross-covariance" not in err


def test_volo_outlook_attention_is_named(tmp_path, capsys):
    err = _refused(["timm:volo_d1_224", "--img-size", "64", "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "outlook attention (as in VOLO)" in err


def test_eomt_abstract_class_is_not_picked(tmp_path, capsys):
    name = _saved(tmp_path, "EomtConfig", "EomtForUniversalSegmentation", hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16, num_blocks=1,
                  num_queries=5)
    err = _refused([name, "--method", "tome", "--r", "2"], capsys, tmp_path)
    assert "EomtForUniversalSegmentation predicts per token" in err and "no base model for EomtConfig" in err
    assert "PreTrainedModel" not in err


def test_relpos_vit_export_failure_names_node_and_source(tmp_path, capsys, monkeypatch):
    """timm's relative-position ViT: attention with a bias, then transpose + reshape, which the exporter's
    decomposition cannot view. The failure says which node, where and why (was: exit 2, 'ONNX export failed: -
    Create an issue in the PyTorch GitHub repository')."""
    _timm_small(monkeypatch, depth=2)
    err = _refused(["timm:vit_relpos_medium_patch16_cls_224", "--img-size", "64"], capsys, tmp_path)
    assert "ONNX export failed: at node view_" in err and "vision_transformer_relpos.py:" in err
    assert "reshape(B, N, C)" in err and "Cannot view a tensor" in err and "Create an issue" not in err


def test_exporter_failure_names_node_and_source():
    """An exporter failure says which node failed, where in the model's source, and why."""
    from tc_export.export.onnx_export import _summary

    inner = ValueError("Cannot view a tensor with shape (1, 2) as (3,)!\n\nWhile executing %view_4 : [num_users=1] = "
                       "call_function[...]\nOriginal traceback:\nFile \"/x/site-packages/timm/models/m.py\", line 114,"
                       " in forward\n    x = x.transpose(1, 2).reshape(B, N, C)\n")
    outer = RuntimeError("Failed to decompose.\n- Create an issue in the PyTorch GitHub repository")
    outer.__cause__ = inner
    assert _summary(outer) == ("at node view_4 (timm/models/m.py:114: x = x.transpose(1, 2).reshape(B, N, C)): "
                               "ValueError: Cannot view a tensor with shape (1, 2) as (3,)!")

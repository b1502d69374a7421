"""Qwen3-VL's vision tower through tc-export's adapter (``tc_export/models/qwen2_vl.py``, shared with Qwen2-VL and
Qwen2.5-VL): its learned position table resampled to the grid by its own taps, full attention, its merger, and its
deepstack outputs (the stream after each of ``deepstack_visual_indexes`` through a merger of its own), held to the
tower's own forward on the image processor's patches."""

from __future__ import annotations

import pytest
import torch

from tc_export import compress
from tc_export.errors import TCExportError
from tc_export.passes import ToMeConfig

from .test_qwen2_vl import load, saved_tower, tower_forward

VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 40, "num_position_embeddings": 36,
          "deepstack_visual_indexes": [1, 2]}
SIZE = 40  # 10x10 patches: the 6x6 position table resampled, 5x5 merged tokens


def _tower(folder):
    import transformers as tf
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return saved_tower(Qwen3VLVisionModel, tf.Qwen3VLVisionConfig(**VISION), folder)


def _load(folder, pooling: str | None = None):
    return load(folder, SIZE, pooling)


def own_forward(tower, pixel_values):
    """The tower's own forward: (last hidden state, merger output, [deepstack outputs]) per image."""
    out, rows, cols = tower_forward(tower, pixel_values)
    batch = pixel_values.shape[0]
    return (out.last_hidden_state.reshape(batch, rows * cols, -1), out.pooler_output.reshape(batch, -1, 40),
            [d.reshape(batch, -1, 40) for d in out.deepstack_features])


def test_adapter_equals_the_tower_with_deepstack(tmp_path):
    """The merger output and both deepstack outputs equal the tower's (two images); ``--pooling tokens`` gives its
    last hidden state, each token found once."""
    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    assert loaded.output_names == ["pooler_output", "deepstack_1", "deepstack_2"] and not loaded.random_init
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    hidden, merged, deep = own_forward(tower, pixels)
    with torch.no_grad():
        got = loaded.module(pixel_values=pixels)
    for mine, theirs in zip(got, [merged, *deep], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[1], got[2], atol=1e-3)
    with torch.no_grad():
        tokens = _load(tmp_path / "q", "tokens").module(pixel_values=pixels)
    match = torch.cdist(tokens[0], hidden[0]).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(100))
    torch.testing.assert_close(tokens, hidden[:, match], rtol=1e-4, atol=1e-5)


def test_position_table_matters(tmp_path):
    """The resampled learned table is in the comparison: without it the merger output differs."""
    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    pixels = loaded.example_inputs(batch=1)["pixel_values"]
    _, merged, _ = own_forward(tower, pixels)
    loaded.module.table_weight.zero_()
    with torch.no_grad():
        assert not torch.allclose(loaded.module(pixel_values=pixels)[0], merged, atol=1e-3)


def test_composite_checkpoint_loads_its_vision_tower(tmp_path):
    import transformers as tf

    config = tf.Qwen3VLConfig(vision_config=VISION, text_config={
        "hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "head_dim": 20})
    torch.manual_seed(0)
    model = tf.Qwen3VLModel(config).eval()
    model.save_pretrained(tmp_path / "vl")
    loaded = _load(tmp_path / "vl")
    assert not loaded.random_init
    pixels = loaded.example_inputs(batch=1)["pixel_values"]
    _, merged, deep = own_forward(model.visual, pixels)
    with torch.no_grad():
        got = loaded.module(pixel_values=pixels)
    torch.testing.assert_close(got[0], merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[2], deep[1], rtol=1e-4, atol=1e-5)


def test_mergers_refuse_compression(tmp_path):
    """Compressing before the mergers (the deepstack ones included) is refused naming the merger."""
    _tower(tmp_path / "q")
    with pytest.raises(TCExportError, match="deepstack output of layer 1 .* same unit decisions"):
        compress(_load(tmp_path / "q"), ToMeConfig(r=2))


def test_exports_through_the_cli(tmp_path, capsys):
    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and "deepstack_2 max abs" in out
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, "--pooling", "tokens", "--method", "tome",
                              "--r", "4", "--emit-positions", "-o", tmp_path / "t.onnx"], capsys)
    assert code == 0, err
    assert "tokens per layer: 100 96 92 88 84" in out and "passed" in out

"""ToMe with ``placement: input`` (merging where the stream enters a block, before its attention; an option, not
the published placement) against the independent per-sample forwards, the eager baseline and the command line."""

import pytest
import torch

from tc_export import compress
from tc_export.errors import ConfigError
from tc_export.passes import ToMeConfig
from tc_export.measure.reference_tome import apply_reference_tome

from . import reference_encoders as encoders
from .conftest import tiny_timm_vit
from .reference import reference_merge
from .test_cli import TINY, run_cli
from .test_hf_models import tiny


def _hooks(input_r: dict[int, int], r: int, protected: int, padded: bool = False) -> encoders.Hooks:
    """Merge ``input_r[layer]`` tokens matched on the incoming tokens themselves, then ``r`` after each attention
    on its keys (head-averaged), as the paper's ToMe does."""

    def before(layer, x, size, q, k):
        if layer not in input_r:
            return x, size
        return reference_merge(x, x, size, input_r[layer], protected, padded=padded)

    def after(layer, x, size, keys, probs):
        return reference_merge(x, keys.mean(0), size, r, protected, padded=padded)

    return encoders.Hooks(after_attention=after, before_layer=before)


def _images(batch=2, size=96, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_timm_vit_matches_the_per_sample_reference():
    model = tiny_timm_vit()  # 36 patches + class token, 4 layers, 3 heads
    images = _images()
    stages = [ToMeConfig(r=6, placement="input", layers=(0, 2)), ToMeConfig(r=3)]
    compressed = compress(model, stages, {"x": images[:1]})
    want, counts = encoders.run(encoders.timm_vit(model), {"x": images}, _hooks({0: 6, 2: 6}, 3, 1))
    assert counts == compressed.token_counts() == [31, 28, 19, 16, 13]  # layer 0's attention sees 37 - 6
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), want, rtol=1e-4, atol=2e-5)


def test_padded_text_matches_the_per_sample_reference():
    """BERT with padded sentences: at the input of layer 0 pads merge among themselves, as after an attention."""
    loaded = tiny("bert")
    inputs = loaded.example_inputs(batch=2)
    assert (inputs["attention_mask"] == 0).any()
    compressed = compress(loaded, [ToMeConfig(r=4, placement="input", layers=(0,)), ToMeConfig(r=2)], inputs)
    want, counts = encoders.run(encoders.hf_bert_sentence(loaded.module), inputs,
                                _hooks({0: 4}, 2, 0, padded=True))
    assert counts == compressed.token_counts()
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)


def test_eager_baseline_merges_at_the_input_too():
    model = tiny_timm_vit()
    images = _images()
    want, _ = encoders.run(encoders.timm_vit(model), {"x": images}, _hooks({0: 10}, 4, 1))
    with torch.no_grad():
        got = apply_reference_tome(model, [4] * 4, input_schedule=[10])(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_placement_is_validated():
    with pytest.raises(ConfigError, match="placement must be attention or input, got 'before'"):
        ToMeConfig(placement="before")


def test_command_line_job(tmp_path, capsys):
    code, out, err = run_cli([*TINY, "--method", "tome", "--r", "4", "--placement", "input", "--layers", "0",
                              "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "tokens per layer: 13 13 13 13" in out  # 17 tokens, 4 merged before layer 0's attention
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out
    # the node is the shipped plugin's ToMeMerge(x, size, metric) with the tokens as metric: it lints clean
    code, out, err = run_cli(["lint", tmp_path / "m.onnx"], capsys)
    assert code == 0 and "clean" in out, out + err
    code, out, err = run_cli([*TINY, "--method", "tome", "--placement", "nowhere", "-o", tmp_path / "n.onnx"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "placement must be attention or input" in err
    assert not (tmp_path / "n.onnx").exists()


def test_rotary_table_follows_an_input_merge():
    """An input merge at layer 0 hands layer 0's attention merged tokens: its rotary table must be recomputed at
    their carried positions already there (a timm EVA-02 against the per-sample rope reference)."""
    from . import reference_rotary as rotary
    from .test_rotary import _images as rotary_images
    from .test_rotary import _tome, small_rotary

    model = small_rotary("eva02_base_patch14_224")
    inputs = rotary_images(model)
    prefix = model.num_prefix_tokens

    def before(i, x, size, pos, q, k):
        if i != 0:
            return x, size, pos
        return rotary.with_positions(lambda t, s: reference_merge(t, x, s, 8, prefix), x, size, pos)

    want, counts = rotary.run_timm_eva(model, inputs["x"], _tome(3, prefix), True, before=before)
    compressed = compress(model, [ToMeConfig(r=8, placement="input", layers=(0,)), ToMeConfig(r=3)], inputs)
    assert counts == compressed.token_counts() and counts[0] == 37 - 8
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=1e-5)


def test_relative_bias_follows_an_input_merge():
    """BEiT's relative position bias at layer 0 looked up at the merged tokens' carried positions."""
    from . import reference_relbias as rel
    from .test_relative_bias import timm_model

    model = timm_model("beit_base_patch16_224", depth=2)
    inputs = {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    width = model.embed_dim

    def before(i, x_and_positions, size, q, k):  # the positions ride along as extra columns; match on the tokens
        if i != 0:
            return x_and_positions, size
        return reference_merge(x_and_positions, x_and_positions[:, :width], size, 5, 1)

    hooks = encoders.Hooks(after_attention=lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, 2, 1),
                           before_layer=before)
    want, counts = rel.run(rel.timm_beit(model), inputs, hooks)
    compressed = compress(model, [ToMeConfig(r=5, placement="input", layers=(0,)), ToMeConfig(r=2)], inputs)
    assert counts == compressed.token_counts() == [12, 10, 8]
    assert compressed.report.rewired
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)


def test_padded_text_through_the_command_line(tmp_path, capsys):
    """A RoBERTa saved with random weights (hf:DIR, padded sentences, mean pooled): input merge at layer 0 then
    ToMe after every attention, through the whole job."""
    from .test_hf_models import _save_family

    _save_family("roberta", tmp_path / "roberta")
    code, out, err = run_cli([f"hf:{tmp_path / 'roberta'}", "--pooling", "mean", "--recipe", _recipe(tmp_path),
                              "-o", tmp_path / "x.onnx"], capsys)
    assert code == 0, err
    # 38 tokens: 4 merged where layer 0's input enters (its attention sees 34), then 2 after each of 2 attentions
    assert "tokens per layer: 34 32 30" in out
    assert "MACs per" in out and "passed" in out and "fidelity vs uncompressed" in out


def _recipe(tmp_path):
    path = tmp_path / "input.yaml"
    path.write_text("stages:\n  - {method: tome, r: 4, placement: input, layers: [0]}\n  - {method: tome, r: 2}\n")
    return path

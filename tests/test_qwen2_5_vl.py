"""Qwen2.5-VL's vision tower through tc-export's adapter (``tc_export/models/qwen2_vl.py``, shared with Qwen2-VL):
attention windows of 8x8 patches (4x4 merge units) in the tower's window order, full attention in
``fullatt_block_indexes``, its own rotary table, RMSNorm blocks and gated MLP, its merger and the reverse window
order, held to the tower's own forward on the image processor's patches."""

from __future__ import annotations

import pytest
import torch

from .test_qwen2_vl import cli_refuses, load, saved_tower, tower_forward

VISION = {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32, "out_hidden_size": 40,
          "fullatt_block_indexes": [1]}
SIZE = 64  # a 16x16 patch grid: 8x8 merge units, 2x2 windows of 8x8 patches


def _tower(folder, qk_std: float = 0.5):
    """A small random Qwen2.5-VL vision tower saved alone to ``folder``."""
    import transformers as tf
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return saved_tower(Qwen2_5_VisionTransformerPretrainedModel, tf.Qwen2_5_VLVisionConfig(**VISION), folder, qk_std)


def _load(folder, pooling: str | None = None, size: int = SIZE):
    return load(folder, size, pooling)


def own_forward(tower, pixel_values):
    """The tower's last hidden state (in its window order) and pooler output (raster order), per image."""
    out, rows, cols = tower_forward(tower, pixel_values)
    batch = pixel_values.shape[0]
    return (out.last_hidden_state.reshape(batch, rows * cols, -1),
            out.pooler_output.reshape(batch, rows * cols // 4, -1))


def test_adapter_equals_the_tower(tmp_path):
    """Uncompressed, the adapter is the tower: its merger output equals the tower's pooler_output (windows, full
    attention at block 1, the reverse window order), and ``--pooling tokens`` gives its last hidden state, every
    token found in it once."""
    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    assert loaded.output_names == ["pooler_output"] and not loaded.random_init
    assert loaded.module.windows == 4 and loaded.module.full_attention == {1}
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    hidden, merged = own_forward(tower, pixels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(pixel_values=pixels), merged, rtol=1e-4, atol=1e-5)
    tokens = _load(tmp_path / "q", "tokens")
    with torch.no_grad():
        got = tokens.module(pixel_values=pixels)
    match = torch.cdist(got[0], hidden[0]).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(256))
    torch.testing.assert_close(got, hidden[:, match], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mutation", ["no-windows", "all-windows", "shuffled-windows"])
def test_window_mutations_fail(tmp_path, mutation):
    """The comparison sees the windows: full attention everywhere, windows in block 1 too, or windows drawn from
    the wrong patches (each window's tokens rolled by one unit across windows) all differ from the tower."""
    from tc_export.models.qwen2_vl import QwenVisionAdapter, window_tokens

    tower = _tower(tmp_path / "q")
    windows = window_tokens(tower, 16, 16)
    if mutation == "no-windows":
        adapter = QwenVisionAdapter(tower, SIZE)
    elif mutation == "all-windows":
        adapter = QwenVisionAdapter(tower, SIZE, window_tokens=windows, full_attention=())
    else:
        adapter = QwenVisionAdapter(tower, SIZE, window_tokens=windows.flatten().roll(4).view(4, -1),
                                       full_attention=(1,))
    pixels = torch.randn(1, 3, SIZE, SIZE)
    _, merged = own_forward(tower, pixels)
    with torch.no_grad():
        assert not torch.allclose(adapter.eval()(pixels), merged, rtol=1e-3, atol=1e-3)


def test_window_order_is_the_towers(tmp_path):
    """Each window holds the 8x8 patches of one 32 px square, units of 2x2 patches consecutive in raster order of
    units inside the window: written out from the rule, not from the adapter."""
    from tc_export.models.qwen2_vl import window_tokens

    tower = _tower(tmp_path / "q")
    want = []
    for wr in range(2):
        for wc in range(2):
            window = []
            for ur in range(4):
                for uc in range(4):
                    for r in range(2):
                        for c in range(2):
                            window.append((wr * 8 + ur * 2 + r) * 16 + wc * 8 + uc * 2 + c)
            want.append(window)
    assert window_tokens(tower, 16, 16).tolist() == want


def test_composite_checkpoint_loads_its_vision_tower(tmp_path):
    """A whole Qwen2.5-VL checkpoint gives the adapter around its vision tower with those weights."""
    import transformers as tf

    config = tf.Qwen2_5_VLConfig(vision_config=VISION, text_config={
        "hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 100})
    torch.manual_seed(0)
    model = tf.Qwen2_5_VLModel(config).eval()
    model.save_pretrained(tmp_path / "vl")
    loaded = _load(tmp_path / "vl")
    assert not loaded.random_init
    pixels = loaded.example_inputs(batch=1)["pixel_values"]
    _, merged = own_forward(model.visual, pixels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(pixel_values=pixels), merged, rtol=1e-4, atol=1e-5)


def test_exports_through_the_cli(tmp_path, capsys):
    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("args,cause", [
    (["--img-size", 48], "not a multiple of window_size = 32 px"),
    (["--img-size", 44], "multiple of patch_size x spatial_merge_size = 8"),
    (["--pooling", "mean"], "--pooling mean does not apply to Qwen2.5-VL"),
    (["--method", "tome", "--r", "2"], "window attention (windows of 32 px in every block but 1)"),
    (["--pooling", "tokens", "--emit-positions"], "exports uncompressed only"),
], ids=["edge-window", "size", "pooling", "compressed", "positions"])
def test_cli_refusals_are_one_line(tmp_path, capsys, args, cause):
    _tower(tmp_path / "q")
    cli_refuses(tmp_path, capsys, args, cause, SIZE)


# --- Building blocks of compression within attention windows (docs/qwen-vl.md: not yet wired into the pass) ------

def test_window_unit_order_is_the_towers_own(tmp_path):
    """``window_unit_order`` (windows of 4x4 units, units raster within a window, each unit's 2x2 tokens) is the
    tower's own token order from ``get_vision_window_index``, on a square and on a non-square grid of windows."""
    from tc_export.models.qwen2_vl import window_tokens
    from tc_export.ops.state import window_unit_order

    tower = _tower(tmp_path / "q")
    for rows, cols in ((16, 16), (8, 24)):
        own = window_tokens(tower, rows, cols).flatten()
        assert torch.equal(window_unit_order((rows, cols), 2, 4), own)


def _per_window_topk(x, scores, windows, keep, unit=2):
    """Reference Top-K within windows from the rule: each window's units scored by the mean of their tokens'
    scores, the ``keep`` best of that window kept (best first, ties to the lower unit), windows in order."""
    batch, tokens, channels = x.shape
    units = tokens // (unit * unit)
    per = units // windows
    out = []
    for b in range(batch):
        rows = []
        for w in range(windows):
            unit_scores = [float(scores[b, (w * per + u) * unit * unit:(w * per + u + 1) * unit * unit].mean())
                           for u in range(per)]
            best = sorted(range(per), key=lambda u: (-unit_scores[u], u))[:keep]
            for u in best:
                start = (w * per + u) * unit * unit
                rows.append(x[b, start:start + unit * unit])
        out.append(torch.cat(rows))
    return torch.stack(out)


def _windowed_unit_op(inner, windows):
    from tc_export.ops.units import UnitOp

    return UnitOp(inner, prefix=0, unit=2, windows=windows)


def test_unit_topk_keeps_the_same_count_in_every_window():
    """Unit Top-K folded over windows keeps K units in each window, selected within it: equal to the per-window
    reference; a selection across windows (the plain unit Top-K) is not, and moving one kept unit to the
    neighbouring window is caught."""
    from tc_export.ops.topk import TopKPrune

    torch.manual_seed(0)
    windows, per, keep = 4, 16, 5
    x = torch.randn(2, windows * per * 4, 6)
    scores = torch.rand(2, windows * per * 4)
    scores[:, : per * 4] += 1.0  # window 0 outranks the others: a global selection would take only from it
    op = _windowed_unit_op(TopKPrune(keep, 0, received=True), windows)
    got, _ = op(x, None, scores)
    assert op.tokens_out(x.shape[1]) == windows * keep * 4 == got.shape[1]
    reference = _per_window_topk(x, scores, windows, keep)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    plain, _ = _windowed_unit_op(TopKPrune(keep * windows, 0, received=True), 1)(x, None, scores)
    assert not torch.equal(plain, reference)
    moved = got.clone()
    moved[:, 4 * keep:4 * keep + 4] = x[:, 4 * per * 2:4 * per * 2 + 4]  # window 1's first kept unit from window 2
    assert not torch.equal(moved, reference)


def test_unit_tome_merges_only_within_windows():
    """Unit ToMe folded over windows: each window's output is ToMe on that window alone (r merges per window, never
    across), the sizes in each window adding up to its units."""
    from tc_export.ops.tome import ToMeMerge

    torch.manual_seed(1)
    windows, per, r = 4, 16, 6
    x = torch.randn(1, windows * per * 4, 6)
    keys = torch.randn(1, windows * per * 4, 5)
    op = _windowed_unit_op(ToMeMerge(r, 0), windows)
    got, size = op(x, None, keys)
    assert got.shape[1] == op.tokens_out(x.shape[1]) == windows * (per - r) * 4
    alone = _windowed_unit_op(ToMeMerge(r, 0), 1)
    for w in range(windows):
        part = slice(w * per * 4, (w + 1) * per * 4)
        expected, expected_size = alone(x[:, part], None, keys[:, part])
        out = slice(w * (per - r) * 4, (w + 1) * (per - r) * 4)
        torch.testing.assert_close(got[:, out], expected)
        units = slice(w * (per - r), (w + 1) * (per - r))
        torch.testing.assert_close(size[:, units], expected_size)
        assert float(size[:, units].sum()) == per

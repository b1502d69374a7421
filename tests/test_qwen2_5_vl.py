"""Qwen2.5-VL's vision tower through tc-export's adapter (``tc_export/models/qwen2_vl.py``, shared with Qwen2-VL):
attention windows of 8x8 patches (4x4 merge units) in the tower's window order, full attention in
``fullatt_block_indexes``, its own rotary table, RMSNorm blocks and gated MLP, its merger and the reverse window
order, held to the tower's own forward on the image processor's patches."""

from __future__ import annotations

import pytest
import torch

from .test_qwen2_vl import cli_refuses, compressed_outputs, load, saved_tower, tower_forward

VISION = {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32, "out_hidden_size": 40,
          "fullatt_block_indexes": [1]}
SIZE = 64  # a 16x16 patch grid: 8x8 merge units, 2x2 windows of 8x8 patches


def _tower(folder, qk_std: float = 0.5, **changes):
    """A small random Qwen2.5-VL vision tower saved alone to ``folder`` (``changes``: to its vision config)."""
    import transformers as tf
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = tf.Qwen2_5_VLVisionConfig(**(VISION | changes))
    return saved_tower(Qwen2_5_VisionTransformerPretrainedModel, config, folder, qk_std)


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
    (["--method", "tome", "--r", "2"], "tome at layer 0: that layer attends within 4 windows"),
    (["--method", "topk", "--keep", "0.5", "--layers", "2", "--score", "received"],
     "topk at layer 2: that layer attends within 4 windows"),
    (["--method", "adjacent", "--r", "2"], "adjacent at layer 0: that layer attends within 4 windows"),
    (["--pooling", "tokens", "--emit-positions"], "compresses only with its own merger"),
    (["--method", "topk", "--keep", "0.5", "--layers", "1", "--score", "received", "--features", "1"],
     "compresses only with its own merger"),
], ids=["edge-window", "size", "pooling", "tome-in-windows", "topk-in-windows", "adjacent-in-windows", "tokens",
        "features"])
def test_cli_refusals_are_one_line(tmp_path, capsys, args, cause):
    _tower(tmp_path / "q")
    cli_refuses(tmp_path, capsys, args, cause, SIZE)


# --- Compression within attention windows: the building blocks (docs/qwen-vl.md) --------------------------------

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


# --- Compression with units and a fixed count of units per window ----------------------------------------------

def window_reference(tower, pixels, ops: dict, window: int = 8):
    """Per sample, from the rules, whatever order the tokens are in: the tower's own modules (the processor's
    ``patchify``, ``patch_embed``, norms, qkv, its rotary module and ``apply_rotary_pos_emb_vision`` at each token's
    (h, w), proj, MLP); a windowed block attends within the groups of tokens whose (h // window, w // window) agree
    (the windows recomputed from the kept tokens), a ``fullatt_block_indexes`` block over all; ``ops[layer](x, pos,
    probs)`` after that layer's attention returns the kept (x, pos); then the merger on each 2x2 unit (its tokens in
    (di, dj) order) and the units in raster order. Returns (B, U, D) and the units' (t, h, w) (B, U, 3)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.vision_utils import get_vision_position_ids

    config, heads = tower.config, tower.config.num_heads
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixels, patch_size=config.patch_size, merge_size=2, temporal_patch_size=config.temporal_patch_size)
    ids = get_vision_position_ids(torch.tensor([[1, rows, cols]]), 2)
    full = set(config.fullatt_block_indexes)
    outputs, cells = [], []
    with torch.no_grad():
        for sample in patches:
            x, pos = tower.patch_embed(sample), ids.float()
            for index, block in enumerate(tower.blocks):
                n = x.shape[0]
                q, k, v = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
                cos, sin = tower.rotary_pos_emb(x, pos)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                logits = q.transpose(0, 1) @ k.permute(1, 2, 0) * block.attn.scaling  # (heads, n, n)
                if index not in full:
                    cell = (pos // window) @ torch.tensor([1000.0, 1.0])
                    logits = logits.masked_fill(cell[:, None] != cell[None, :], float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                x = x + block.attn.proj((probs @ v.transpose(0, 1)).transpose(0, 1).reshape(n, -1))
                if index in ops:
                    x, pos = ops[index](x, pos, probs)
                x = x + block.mlp(block.norm2(x))
            unit = torch.div(pos, 2, rounding_mode="floor")
            slot = pos - 2 * unit
            key = (unit[:, 0] * cols + unit[:, 1]) * 4 + slot[:, 0] * 2 + slot[:, 1]
            order = key.argsort()
            units = x[order].reshape(-1, 4, x.shape[-1])
            outputs.append(tower.merger(units.reshape(-1, x.shape[-1])).reshape(units.shape[0], -1))
            cell = unit[order][::4]
            cells.append(torch.cat([torch.zeros(len(cell), 1), cell], dim=1))
    return torch.stack(outputs), torch.stack(cells)


def topk_in_windows(keep: float, window_units: int = 4, wrong_window: bool = False):
    """Top-K of 2x2 units within each window of ``window_units`` x ``window_units`` units: units scored by the mean
    of their tokens' received attention (averaged over queries and heads), the ceil(keep x units per window) best of
    each window kept (ties to the lower raster unit). ``wrong_window``: mutation, window 0's worst kept unit traded
    for window 1's best pruned one."""
    import math

    def op(x, pos, probs):
        received = probs.mean(dim=(0, 1))
        unit = torch.div(pos, 2, rounding_mode="floor")
        width = int(unit[:, 1].max()) + 1
        unit_id = (unit[:, 0] * width + unit[:, 1]).long()
        window = (torch.div(unit, window_units, rounding_mode="floor") @ torch.tensor([1000.0, 1.0])).long()
        kept = []
        windows = sorted(set(window.tolist()))
        choice = {}
        for w in windows:
            members = sorted(set(unit_id[window == w].tolist()))
            score = {u: float(received[unit_id == u].mean()) for u in members}
            count = math.ceil(keep * len(members) - 1e-9)
            ranked = sorted(members, key=lambda u: (-score[u], u))
            choice[w] = (ranked[:count], ranked[count:])
        if wrong_window:
            (best0, _), (kept1, pruned1) = choice[windows[0]], choice[windows[1]]
            choice[windows[0]] = (best0[:-1] + [pruned1[0]], [])
        for w in windows:
            kept += choice[w][0]
        rows = torch.cat([torch.nonzero(unit_id == u).flatten() for u in kept])
        return x[rows], pos[rows]

    return op


def test_unit_topk_in_windows_matches_reference(tmp_path):
    """Unit Top-K (received attention at block 1, a full-attention block; keep 0.5 of the 16 units of every window)
    then block 2 attending within windows of the kept units (8 units = 32 tokens each), the tower's own merger and
    the raster order of the kept units: tokens and emitted (t, h, w) equal the per-sample reference; a unit traded
    into the wrong window fails it. Uncompressed, the same path equals the tower's own pooler output."""
    from tc_export import compress
    from tc_export.passes import TopKConfig

    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    plain = compress(loaded, [], {"pixel_values": pixels}, emit_positions=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=pixels)[0], own_forward(tower, pixels)[1], rtol=1e-4, atol=1e-5)
    _, (got, positions, sizes), compressed = compressed_outputs(loaded, TopKConfig(keep=0.5, layers=(1,),
                                                                                   score="received"))
    assert compressed.token_counts() == [256, 256, 128, 32]  # the last: the merger's output
    want, want_pos = window_reference(tower, pixels, {1: topk_in_windows(0.5)})
    assert got.shape == want.shape == (2, 32, 40) and bool((sizes == 4).all())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos)
    for b in range(2):  # 8 kept units in each of the 4 windows
        window = (positions[b, :, 1] // 4) * 2 + positions[b, :, 2] // 4
        assert torch.bincount(window.long()).tolist() == [8, 8, 8, 8]
    wrong, _ = window_reference(tower, pixels, {1: topk_in_windows(0.5, wrong_window=True)})
    assert not torch.allclose(got, wrong, rtol=1e-4, atol=1e-5)


def test_unit_topk_in_windows_through_the_cli(tmp_path, capsys):
    """The command line: unit Top-K at the full-attention block with the tower's own merger and --emit-positions:
    units and windows set by the merger, 32 tokens, ONNX Runtime parity of tokens and positions."""
    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, "--method", "topk", "--keep", "0.5",
                              "--layers", "1", "--score", "received", "--emit-positions", "-o", tmp_path / "m.onnx"],
                             capsys)
    assert code == 0, err
    assert "merge units of 2x2 patches" in out and "tokens per layer: 256 256 128 32" in out
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and "positions max abs" in out
    assert (tmp_path / "m.onnx").is_file()


def test_windows_not_declared_are_refused(tmp_path):
    """The adapter compressed as a plain module (its windows not declared by its merger, the stream in raster
    order with the tower's window gather): refused naming the windows, rather than windows of other tokens."""
    from tc_export import compress
    from tc_export.errors import StructureNotFoundError
    from tc_export.passes import TopKConfig

    _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q", "tokens")
    with pytest.raises(StructureNotFoundError, match="attends within 4 windows of consecutive tokens"):
        compress(loaded.module, TopKConfig(keep=0.5, layers=(1,), score="received"), loaded.example_inputs(batch=1))


def test_unit_topk_at_the_last_block_is_the_merger_at_the_kept_units(tmp_path):
    """The tower-output placement (the last block a full-attention block, as in the published configs): unit Top-K
    after its attention keeps 8 units per window, equal to the per-sample reference and, as only per-token work
    follows, exactly the uncompressed merger's output at the kept units (raster order)."""
    from tc_export.passes import TopKConfig

    tower = _tower(tmp_path / "q", fullatt_block_indexes=[1, 2])
    pixels, (got, positions, _), _ = compressed_outputs(_load(tmp_path / "q"),
                                                        TopKConfig(keep=0.5, layers=(2,), score="received"))
    want, want_pos = window_reference(tower, pixels, {2: topk_in_windows(0.5)})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos)
    merged = own_forward(tower, pixels)[1]  # raster order of the 8x8 merged grid
    cells = (positions[..., 1] * 8 + positions[..., 2]).long()
    torch.testing.assert_close(got, torch.stack([merged[b, cells[b]] for b in range(2)]), rtol=1e-4, atol=1e-5)


# --- ToMe, PruMerge and Top-K fuse within attention windows (docs/qwen-vl.md) -------------------------------------

def unit_window_reference(tower, pixels, after: dict | None = None, before: dict | None = None,
                          window_units: int = 4, prop_attn: bool = True):
    """Per sample, from the rules, over merge units (``reference_units.Layout``: each unit's rows of ``x`` in (di, dj)
    order, its size and position mass on the unit grid), whatever order they are in: the tower's own modules on the
    raster-ordered patches; every token's rotary position follows its unit (2 x unit position + (di, dj)); a unit's
    window is (row // window_units, column // window_units) of its carried position, recomputed at every windowed
    block (which attends within the groups of tokens whose windows agree; ``fullatt_block_indexes`` over all);
    proportional attention adds log(size) of every key token (``prop_attn``); ``before[layer](x, layout, q, k)``
    where the stream enters that block (q, k: that block's norm, qkv and rotary at the carried positions, heads side
    by side) and ``after[layer](x, layout, keys (H, N, d), probs (H, N, N))`` after its attention residual add;
    then the tower's own merger on each unit, the units in raster order of their carried positions (by row, then
    column, ties: the earlier one). Returns (B, U, D), the units' (t, h, w) (B, U, 3) and sizes in patches (B, U, 1)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.vision_utils import get_vision_position_ids

    from .reference_units import raster_layout

    after, before = after or {}, before or {}
    config, heads = tower.config, tower.config.num_heads
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixels, patch_size=config.patch_size, merge_size=2, temporal_patch_size=config.temporal_patch_size)
    ids = get_vision_position_ids(torch.tensor([[1, rows, cols]]), 2)
    row_major = torch.argsort(ids[:, 0] * cols + ids[:, 1])
    offsets = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    full = set(config.fullatt_block_indexes)

    def per_token(x, layout):
        pos, size, window = torch.zeros(x.shape[0], 2), torch.ones(x.shape[0]), torch.zeros(x.shape[0])
        for u in layout.units:
            cell = u.mass / u.size
            pos[u.rows] = 2 * cell + offsets
            size[u.rows] = u.size
            w = torch.div(cell, window_units, rounding_mode="floor")
            window[u.rows] = float(w[0] * 1000 + w[1])
        return pos, size, window

    def rotated(block, x, pos):
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = tower.rotary_pos_emb(x, pos)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        return q, k, v

    tokens, positions, sizes = [], [], []
    with torch.no_grad():
        for sample in patches:
            x = tower.patch_embed(sample)[row_major]
            layout = raster_layout((rows, cols), 2, 0)
            for index, block in enumerate(tower.blocks):
                if index in before:
                    pos, _, _ = per_token(x, layout)
                    q, k, _ = rotated(block, x, pos)
                    x, _, layout = before[index](x, layout, q.reshape(x.shape[0], -1), k.reshape(x.shape[0], -1))
                pos, size, window = per_token(x, layout)
                q, k, v = rotated(block, x, pos)
                logits = q.transpose(0, 1) @ k.permute(1, 2, 0) * block.attn.scaling  # (heads, n, n)
                if prop_attn:
                    logits = logits + size.log()
                if index not in full:
                    logits = logits.masked_fill(window[:, None] != window[None, :], float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                x = x + block.attn.proj((probs @ v.transpose(0, 1)).transpose(0, 1).reshape(x.shape[0], -1))
                if index in after:
                    x, _, layout = after[index](x, layout, k.transpose(0, 1), probs)
                x = x + block.mlp(block.norm2(x))
            cells = torch.stack([u.mass / u.size for u in layout.units])
            order = sorted(range(len(layout.units)), key=lambda u: (float(cells[u, 0]), float(cells[u, 1]), u))
            units = torch.stack([x[layout.units[u].rows] for u in order])  # (U, 4, C)
            tokens.append(tower.merger(units.reshape(-1, x.shape[-1])).reshape(len(order), -1))
            positions.append(torch.cat([torch.zeros(len(order), 1), cells[order]], dim=1))
            sizes.append(torch.tensor([[layout.units[u].size * 4] for u in order]))
    return torch.stack(tokens), torch.stack(positions), torch.stack(sizes)


def per_window(op, window_units: int = 4, join: tuple[int, int] | None = None,
               swap: tuple[int, int] | None = None):
    """``op(x, layout, a, b)`` of ``reference_units`` run on each attention window's units alone (a window: the
    units whose carried positions share (row // window_units, column // window_units); windows in raster order,
    the units of a window in their current order), the windows' outputs one after the other. Mutations: ``join``,
    two windows (by rank) taken as one, so that the op may merge a unit across them; ``swap``, the first unit of one
    window traded for the last of another (the counts unchanged), so that a kept, merged or fused unit mixes them."""
    from .reference_units import Layout, Unit

    def run(x, layout, a, b):
        groups: dict = {}
        for u in layout.units:
            w = torch.div(u.mass / u.size, window_units, rounding_mode="floor")
            groups.setdefault((int(w[0]), int(w[1])), []).append(u)
        keys = sorted(groups)
        if swap is not None:
            first, last = groups[keys[swap[0]]], groups[keys[swap[1]]]
            first[0], last[-1] = last[-1], first[0]
        if join is not None:
            groups[keys[join[0]]] += groups.pop(keys[join[1]])
            keys = sorted(groups)
        parts, sizes, units, start = [], [], [], 0
        for w in keys:
            out, size, sub = op(x, Layout(0, groups[w]), a, b)
            parts.append(out)
            sizes.append(size)
            units += [Unit([start + r for r in u.rows], u.size, u.mass) for u in sub.units]
            start += out.shape[0]
        return torch.cat(parts), torch.cat(sizes), Layout(0, units)

    return run


def _window_counts(positions, window_units: int = 4, side: int = 2):
    """Units per window of each sample's output (windows from the emitted (t, h, w), raster order)."""
    window = torch.div(positions[..., 1:], window_units, rounding_mode="floor")
    return [torch.bincount((window[b, :, 0] * side + window[b, :, 1]).long(), minlength=side * side).tolist()
            for b in range(positions.shape[0])]


@pytest.mark.parametrize("method", ["tome", "adjacent"])
def test_unit_merging_in_windows_matches_reference(tmp_path, method):
    """Unit ToMe at the full-attention block 1, 6 of the 16 units of every window merged into units of that window
    (slot by slot, size-weighted), or adjacent merging of 6 of the window's 8 pairs of neighbouring units, then block
    2 attending within windows of 10 units each with the merged units' log-size bias folded into its windows, the
    tower's own merger and the raster order of the carried positions: tokens, emitted (t, h, w) (merged units: the
    size-weighted mean of their members' cells) and sizes equal the per-window reference. ToMe: a unit merged across
    two windows, or the size bias left out, fails it."""
    from tc_export.passes import AdjacentConfig, ToMeConfig

    from .reference_units import unit_adjacent, unit_tome

    tower = _tower(tmp_path / "q")
    config = ToMeConfig(r=6, layers=(1,)) if method == "tome" else AdjacentConfig(r=6, layers=(1,))
    pixels, (got, positions, sizes), compressed = compressed_outputs(_load(tmp_path / "q"), config)
    assert compressed.token_counts() == [256, 256, 160, 40]
    merge = unit_tome if method == "tome" else unit_adjacent
    tome = per_window(lambda x, layout, keys, probs: merge(x, layout, keys, 6))
    want, want_pos, want_size = unit_window_reference(tower, pixels, after={1: tome})
    assert got.shape == want.shape == (2, 40, 40)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes, want_size)
    assert _window_counts(positions) == [[10] * 4] * 2 and bool((sizes > 4).any())
    assert [float(s.sum()) for s in sizes] == [256.0, 256.0]
    if method == "adjacent":
        return
    crossing = per_window(lambda x, layout, keys, probs: unit_tome(x, layout, keys, 6 * len(layout.units) // 16),
                          join=(0, 1))  # windows 0 and 1 as one: 12 merges over their 32 units
    _assert_merges_across(tower, pixels, crossing)
    wrong, _, _ = unit_window_reference(tower, pixels, after={1: crossing})
    assert not torch.allclose(got, wrong, rtol=1e-4, atol=1e-5)
    unbiased, _, _ = unit_window_reference(tower, pixels, after={1: tome}, prop_attn=False)
    assert not torch.allclose(got, unbiased, rtol=1e-4, atol=1e-5)


def _assert_merges_across(tower, pixels, crossing):
    """The mutation really merges a unit of window 0 with one of window 1: run on indicator tokens (one column per
    original unit), some output unit holds members of both windows."""
    seen = {}

    def spy(x, layout, keys, probs):
        owner = torch.zeros(x.shape[0], len(layout.units))
        window = []
        for i, u in enumerate(layout.units):
            owner[u.rows, i] = 1.0
            window.append(int(torch.div(u.mass / u.size, 4, rounding_mode="floor")[1]) if u.mass[0] < 4 else -1)
        out, _, sub = crossing(owner, layout, keys, probs)
        members = [{window[i] for i in torch.nonzero(out[u.rows[0]]).flatten().tolist()} for u in sub.units]
        seen["across"] = any({0, 1} <= m for m in members)
        return crossing(x, layout, keys, probs)

    unit_window_reference(tower, pixels[:1], after={1: spy})
    assert seen["across"]


@pytest.mark.parametrize("method,counts", [
    (["--method", "tome", "--r", "6", "--layers", "1"], "256 256 160 40"),
    (["--method", "adjacent", "--r", "6", "--layers", "1"], "256 256 160 40"),
    (["--method", "prumerge", "--tokens", "6", "--layers", "1", "--score", "received"], "256 112 112 28"),
    (["--method", "topk", "--keep", "0.5", "--layers", "1", "--score", "received", "--fuse"], "256 256 144 36"),
], ids=["tome", "adjacent", "prumerge", "topk-fuse"])
def test_methods_in_windows_through_the_cli(tmp_path, capsys, method, counts):
    """The command line, the tower's own merger and --emit-positions: unit ToMe (r per window), PruMerge and Top-K
    fuse (K units + the window's own extra unit per window) at the full-attention block export with ONNX Runtime
    parity of tokens and positions."""
    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, *method, "--pooling", "pooler",
                              "--emit-positions", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "merge units of 2x2 patches" in out and f"tokens per layer: {counts}" in out
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and "positions max abs" in out
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("method", ["prumerge", "topk-fuse"])
def test_extra_unit_in_windows_matches_reference(tmp_path, method):
    """Unit PruMerge at the input of the full-attention block 1 (every token scored by the attention it receives
    under that block's rotated queries and keys, full width; 6 units kept per window, best first, each adding its
    nearest units of the same window; then the window's extra unit of its own pruned units), and unit Top-K with
    EViT's fused unit after block 1's attention (keep 0.5: 8 units per window + the window's fused unit): every
    window holds K + 1 units, block 2 attends within them, then the merger and the raster order of the carried
    positions. Tokens, emitted (t, h, w) and sizes equal the per-window reference; a unit traded between two
    windows (so that an extra unit or a kept one mixes them) fails it."""
    from tc_export.passes import TopKConfig
    from tc_export.passes.prumerge import PruMergeConfig

    from .reference_units import received_attention, unit_prumerge, unit_topk

    tower = _tower(tmp_path / "q")
    if method == "prumerge":
        config, counts, per = PruMergeConfig(tokens=6, layers=(1,), score="received"), [256, 112, 112, 28], 7

        def op(x, layout, q, k):
            return unit_prumerge(x, layout, q, k, 6, received=True)

        where = "before"
    else:
        config = TopKConfig(keep=0.5, layers=(1,), score="received", fuse=True)
        counts, per, where = [256, 256, 144, 36], 9, "after"

        def op(x, layout, keys, probs):
            return unit_topk(x, layout, received_attention(probs), 0.5, fuse=True)

    pixels, (got, positions, sizes), compressed = compressed_outputs(_load(tmp_path / "q"), config)
    assert compressed.token_counts() == counts
    want, want_pos, want_size = unit_window_reference(tower, pixels, **{where: {1: per_window(op)}}, prop_attn=False)
    assert got.shape == want.shape == (2, 4 * per, 40)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes, want_size)
    assert _window_counts(positions) == [[per] * 4] * 2
    assert [float(s.sum()) for s in sizes] == [256.0, 256.0] and int((sizes > 4).sum()) == 8  # an extra unit each
    wrong, _, _ = unit_window_reference(tower, pixels, **{where: {1: per_window(op, swap=(0, 1))}}, prop_attn=False)
    assert not torch.allclose(got, wrong, rtol=1e-4, atol=1e-5)

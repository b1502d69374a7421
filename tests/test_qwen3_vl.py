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


def test_features_cut_refuses_compression(tmp_path):
    """With --features the export ends at a block, without the merger and the deepstack mergers: refused naming
    the deepstack outputs."""
    from tc_export.models import load_model
    from tc_export.models.registry import ModelOptions

    _tower(tmp_path / "q")
    with pytest.raises(TCExportError, match="deepstack outputs .layers 1, 2 .* --features cut"):
        compress(_load(tmp_path / "q"), ToMeConfig(r=2), features=2)
    loaded = load_model(f"hf:{tmp_path / 'q'}", ModelOptions(img_size=SIZE), warn_random=False)
    assert loaded.own_projector is not None


# --- Unit compression with the deepstack outputs (docs/qwen-vl.md) ------------------------------------------------

def deepstack_reference(tower, pixels, ops: dict, prop_attn: bool = True, mutation: str | None = None):
    """Per sample, from the rules, over merge units (``reference_units.Layout``): the tower's own modules (the
    processor's ``patchify``, ``patch_embed``, its learned table at its own taps, norms, qkv, its rotary module at
    each token's (h, w) following its unit, proj, MLP); proportional attention (log size of every key token);
    ``ops[layer](x, layout, keys (H, N, d), probs)`` after that layer's attention. The stream after each
    ``deepstack_visual_indexes`` layer is kept and every later op is applied to it too, with the same layout, keys
    and attention (so the same decisions: kept units gathered, merged units size-weighted slot by slot); at the end
    the merger on each unit of the last stream and each deepstack merger on the same unit of its layer's stream,
    units in layout order. Mutations: ``plain-mean`` (the kept streams merged without the sizes), ``next-layer``
    (each deepstack stream taken one layer late). Returns (merged, [deepstack ...], (t, h, w))."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    from .reference_units import Layout, Unit, raster_layout

    config, heads = tower.config, tower.config.num_heads
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixels, patch_size=config.patch_size, merge_size=2, temporal_patch_size=config.temporal_patch_size)
    grid = torch.tensor([[1, rows, cols]])
    ids = get_vision_position_ids(grid, 2)
    index, weight = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners, spatial_merge_size=2)
    row_major = torch.argsort(ids[:, 0] * cols + ids[:, 1])
    offsets = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    taps = list(config.deepstack_visual_indexes)
    if mutation == "next-layer":
        taps = [layer + 1 for layer in taps]
    merged, deep_out, cells = [], [[] for _ in taps], []
    with torch.no_grad():
        for sample in patches:
            x = tower.patch_embed(sample) + (tower.pos_embed(index) * weight[..., None]).sum(1)
            x = x[row_major]
            layout = raster_layout((rows, cols), 2, 0)
            kept: dict[int, torch.Tensor] = {}
            for layer, block in enumerate(tower.blocks):
                pos, size = torch.zeros(x.shape[0], 2), torch.ones(x.shape[0])
                for u in layout.units:
                    pos[u.rows], size[u.rows] = 2 * u.mass / u.size + offsets, u.size
                q, k, v = block.attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3) \
                    .unbind(0)
                cos, sin = tower.rotary_pos_emb(x, pos)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                logits = q.transpose(0, 1) @ k.permute(1, 2, 0) * block.attn.scaling
                if prop_attn:
                    logits = logits + size.log()
                probs = torch.softmax(logits, dim=-1)
                x = x + block.attn.proj((probs @ v.transpose(0, 1)).transpose(0, 1).reshape(x.shape[0], -1))
                if layer in ops:
                    keys = k.transpose(0, 1)
                    same = layout if mutation != "plain-mean" else \
                        Layout(0, [Unit(u.rows, 1.0, u.mass / u.size) for u in layout.units])
                    kept = {tap: ops[layer](stream, same, keys, probs)[0] for tap, stream in kept.items()}
                    x, _, layout = ops[layer](x, layout, keys, probs)
                x = x + block.mlp(block.norm2(x))
                if layer in taps:
                    kept[layer] = x.clone()
            merged.append(torch.stack([tower.merger(x[u.rows]).reshape(-1) for u in layout.units]))
            for i, tap in enumerate(taps):
                merger = tower.deepstack_merger_list[i]
                deep_out[i].append(torch.stack([merger(kept[tap][u.rows]).reshape(-1) for u in layout.units]))
            unit_cells = torch.stack([u.mass / u.size for u in layout.units])
            cells.append(torch.cat([torch.zeros(len(unit_cells), 1), unit_cells], dim=1))
    return torch.stack(merged), [torch.stack(d) for d in deep_out], torch.stack(cells)


def _compressed(loaded, config):
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    compressed = compress(loaded, config, {"pixel_values": pixels}, emit_positions=True)
    with torch.no_grad():
        return pixels, compressed(pixel_values=pixels), compressed


@pytest.mark.parametrize("method", ["tome", "topk-early", "topk-late"])
def test_deepstack_follows_unit_compression(tmp_path, method):
    """The merger output and both deepstack outputs after unit compression, token for token, with the emitted
    (t, h, w), equal the per-sample reference: unit ToMe r=2 at every layer (before, at and after the deepstack
    layers 1 and 2: those streams merged further with the same later decisions), unit Top-K keep 0.4 at layer 0
    (the deepstack streams already compressed) and at layer 3 (after both: gathered at the same kept units). The
    deepstack streams merged without their sizes, or taken one layer late, fail it."""
    from tc_export.passes import TopKConfig

    from .reference_units import received_attention, unit_tome, unit_topk

    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    if method == "tome":
        config, counts = ToMeConfig(r=2), [100, 92, 84, 76, 17]
        ops = {layer: (lambda x, layout, keys, probs: unit_tome(x, layout, keys, 2)) for layer in range(4)}
    else:
        layer = 0 if method == "topk-early" else 3
        config = TopKConfig(keep=0.4, layers=(layer,), score="received")
        counts = [100, 40, 40, 40, 10] if layer == 0 else [100, 100, 100, 100, 10]
        ops = {layer: lambda x, layout, keys, probs: unit_topk(x, layout, received_attention(probs), 0.4)}
    pixels, (merged, deep1, deep2, positions, sizes), compressed = _compressed(loaded, config)
    assert compressed.token_counts() == counts and compressed.report.extra_outputs == ["deepstack_1", "deepstack_2"]
    prop = method == "tome"
    want, want_deep, want_pos = deepstack_reference(tower, pixels, ops, prop)
    assert merged.shape == deep1.shape == deep2.shape == want.shape == (2, counts[-1], 40)
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deep1, want_deep[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deep2, want_deep[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos, rtol=1e-5, atol=1e-5)
    if method == "topk-late":  # pruning after every deepstack layer: the uncompressed outputs at the kept units
        _, full, full_deep = own_forward(tower, pixels)
        cells = (positions[..., 1] * 5 + positions[..., 2]).long()
        for got, whole in zip((merged, deep1, deep2), (full, *full_deep)):
            torch.testing.assert_close(got, torch.stack([whole[b, cells[b]] for b in range(2)]), rtol=1e-4,
                                       atol=1e-5)
    if method == "tome":
        for mutation in ("plain-mean", "next-layer"):
            _, wrong, _ = deepstack_reference(tower, pixels, ops, prop, mutation)
            assert not torch.allclose(deep2, wrong[1], rtol=1e-4, atol=1e-5), mutation


@pytest.mark.parametrize("config,cause", [
    ({"method": "prumerge", "tokens": 6, "layers": (3,), "score": "received"}, "prumerge at layer 3, after the deepstack"),
    ({"method": "topk", "keep": 0.4, "layers": (3,), "score": "received", "fuse": True}, "topk with fuse at layer 3"),
], ids=["prumerge", "fuse"])
def test_extra_unit_after_deepstack_refused(tmp_path, config, cause):
    """An extra or fused unit after a deepstack layer has no deepstack counterpart: refused naming it."""
    from tc_export.passes import TopKConfig
    from tc_export.passes.prumerge import PruMergeConfig

    _tower(tmp_path / "q")
    config = dict(config)
    cls = PruMergeConfig if config.pop("method") == "prumerge" else TopKConfig
    with pytest.raises(TCExportError, match=cause):
        compress(_load(tmp_path / "q"), cls(**config))


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


@pytest.mark.parametrize("method,counts", [(["--method", "tome", "--r", "2"], "100 92 84 76 17"),
                                           (["--method", "topk", "--keep", "0.4", "--layers", "3", "--score",
                                             "received"], "100 100 100 100 10")], ids=["tome", "topk"])
def test_deepstack_compressed_through_the_cli(tmp_path, capsys, method, counts):
    """The command line, the default pooling (the merger and both deepstack mergers) with unit ToMe or Top-K and
    --emit-positions: ONNX Runtime parity of the tokens, both deepstack outputs and the positions."""
    import onnx

    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, *method, "--pooling", "pooler",
                              "--emit-positions", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert f"tokens per layer: {counts}" in out and "passed" in out
    assert "deepstack_1 max abs" in out and "deepstack_2 max abs" in out and "positions max abs" in out
    names = [o.name for o in onnx.load(tmp_path / "m.onnx").graph.output]
    assert names == ["tokens", "deepstack_1", "deepstack_2", "positions", "sizes"]

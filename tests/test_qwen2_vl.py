"""Qwen2-VL's vision tower through tc-export's adapter (``tc_export/models/qwen2_vl.py``), against the tower's own
forward on the image processor's patches and against the per-sample reference ``reference_rotary.run_qwen2_vl``
(the tower's own modules, rotary module and position ids, ToMe from tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from tc_export import compress
from tc_export.errors import TCExportError
from tc_export.passes import AdjacentConfig, ToMeConfig, TopKConfig
from tc_export.passes.prumerge import PruMergeConfig

from . import reference_rotary as rotary
from .reference import reference_adjacent, reference_merge

VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 48, "num_heads": 2, "patch_size": 4, "mlp_ratio": 2,
          "spatial_merge_size": 2, "temporal_patch_size": 2}
SIZE = 40  # a 10x10 patch grid, 5x5 merge windows


def saved_tower(cls, config, folder, qk_std: float = 0.5):
    """A random vision tower of ``cls`` saved alone to ``folder`` (queries and keys large enough that the rotary
    angles matter)."""
    torch.manual_seed(0)
    tower = cls(config)
    for name, parameter in tower.named_parameters():
        if name.endswith("qkv.weight"):
            parameter.data.normal_(0, qk_std)
    tower.save_pretrained(folder)
    return tower.eval()


def _tower(folder, qk_std: float = 0.5):
    """A small random Qwen2-VL vision tower saved alone to ``folder``."""
    import transformers as tf
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return saved_tower(Qwen2VisionTransformerPretrainedModel, tf.Qwen2VLVisionConfig(**VISION), folder, qk_std)


def load(folder, size: int, pooling: str | None = None):
    from tc_export.models import load_model
    from tc_export.models.registry import ModelOptions

    return load_model(f"hf:{folder}", ModelOptions(img_size=size, pooling=pooling), warn_random=False)


def _load(folder, pooling: str | None = None):
    return load(folder, SIZE, pooling)


def compressed_outputs(loaded, config, batch: int = 2):
    """The loaded tower's example pixels and the outputs (tokens, positions, sizes) of ``compress(loaded, config)``
    with --emit-positions, and the compressed model."""
    pixels = loaded.example_inputs(batch=batch)["pixel_values"]
    compressed = compress(loaded, config, {"pixel_values": pixels}, emit_positions=True)
    with torch.no_grad():
        return pixels, compressed(pixel_values=pixels), compressed


def tower_forward(tower, pixel_values):
    """The tower's own forward on the image processor's patches of every image (one grid_thw row per image):
    its output, the patch grid's rows and columns."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    config = tower.config
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixel_values, patch_size=config.patch_size, merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size)
    batch = pixel_values.shape[0]
    with torch.no_grad():
        return tower(patches.reshape(-1, patches.shape[-1]), torch.tensor([[1, rows, cols]] * batch)), rows, cols


def _own_forward(tower, pixel_values):
    out, rows, cols = tower_forward(tower, pixel_values)
    batch = pixel_values.shape[0]
    return (out.last_hidden_state.reshape(batch, rows * cols, -1),
            out.pooler_output.reshape(batch, rows * cols // 4, -1), rows, cols)


def _own_position_ids(tower, rows: int, cols: int) -> torch.Tensor:
    from transformers.vision_utils import get_vision_position_ids

    return get_vision_position_ids(torch.tensor([[1, rows, cols]]), tower.config.spatial_merge_size).float()


def test_adapter_equals_the_tower(tmp_path):
    """Uncompressed, the adapter is the tower: its merger output equals the tower's pooler_output on the processor's
    patches (two images, attention kept within each by cu_seqlens), and ``--pooling tokens`` gives the tower's last
    hidden state, each token found in it (reordered: the adapter's tokens are row-major)."""
    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    assert loaded.output_names == ["pooler_output"] and not loaded.random_init
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    hidden, merged, rows, cols = _own_forward(tower, pixels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(pixel_values=pixels), merged, rtol=1e-4, atol=1e-5)
    tokens = _load(tmp_path / "q", "tokens")
    with torch.no_grad():
        got = tokens.module(pixel_values=pixels)
    assert got.shape == hidden.shape
    match = torch.cdist(got[0], hidden[0]).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(rows * cols))
    torch.testing.assert_close(got, hidden[:, match], rtol=1e-4, atol=1e-5)


def test_composite_checkpoint_loads_its_vision_tower(tmp_path):
    """A whole Qwen2-VL checkpoint (config with a vision_config, weights under the model's prefix) gives the
    adapter around its vision tower with those weights."""
    import transformers as tf

    config = tf.Qwen2VLConfig(vision_config=VISION, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = tf.Qwen2VLModel(config).eval()
    model.save_pretrained(tmp_path / "vl")
    loaded = _load(tmp_path / "vl")
    assert not loaded.random_init
    pixels = loaded.example_inputs(batch=1)["pixel_values"]
    _, merged, _, _ = _own_forward(model.visual, pixels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(pixel_values=pixels), merged, rtol=1e-4, atol=1e-5)


def test_uncompressed_positions_are_the_towers_position_ids(tmp_path):
    """``--emit-positions`` with nothing compressed: each output token (found in the tower's own last hidden state
    by its values) carries exactly the tower's own (h, w) position id of that token, and size 1."""
    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q", "tokens")
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    hidden, _, rows, cols = _own_forward(tower, pixels)
    ids = _own_position_ids(tower, rows, cols)
    exported = compress(loaded, [], {"pixel_values": pixels}, emit_positions=True)
    with torch.no_grad():
        tokens, positions, sizes = exported(pixel_values=pixels)
    for b in range(2):
        match = torch.cdist(tokens[b], hidden[b]).argmin(dim=1)
        torch.testing.assert_close(tokens[b], hidden[b, match], rtol=1e-4, atol=1e-5)
        assert torch.equal(positions[b], ids[match])
    assert torch.equal(sizes, torch.ones_like(sizes))


def _merge(method: str, r: int, carry: bool = True):
    merge = reference_merge if method == "tome" else reference_adjacent

    def step(i, x, size, pos, keys, probs):
        x, size, new = rotary.with_positions(lambda t, s: merge(t, keys.mean(0), s, r, 0), x, size, pos)
        return x, size, new if carry else pos[: x.shape[0]]

    return step


@pytest.mark.parametrize("method", ["tome", "adjacent"])
def test_merging_with_positions_matches_reference(tmp_path, method):
    """ToMe / adjacent merging r=4 with --emit-positions on the last block's tokens: tokens, positions and sizes
    equal the per-sample reference (the tower's own rotary module at the carried positions). Every token never
    merged (size 1) sits at one of the tower's own position ids, distinct; every merged token at the size-weighted
    mean of its members', which the reference carries through the merge. Positions not carried (the rotary table's
    first rows) fail the comparison."""
    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q", "tokens")
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    config = ToMeConfig(r=4) if method == "tome" else AdjacentConfig(r=4)
    compressed = compress(loaded, config, {"pixel_values": pixels}, emit_positions=True)
    assert "layer 1: rotary position embedding" in compressed.report.rewired
    want, want_pos, want_size, counts = rotary.run_qwen2_vl(tower, pixels, _merge(method, 4), True)
    assert counts == compressed.token_counts() == [100, 96, 92]
    with torch.no_grad():
        got, positions, sizes = compressed(pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes, want_size)
    ids = {tuple(p) for p in _own_position_ids(tower, 10, 10).tolist()}
    for b in range(2):
        single = [tuple(p) for p in positions[b][sizes[b, :, 0] == 1].tolist()]
        assert set(single) <= ids and len(set(single)) == len(single)
        assert float(sizes[b].sum()) == 100 and bool((sizes[b] > 1).any())
    stale, _, _, _ = rotary.run_qwen2_vl(tower, pixels, _merge(method, 4, carry=False), True)
    assert not torch.allclose(got, stale, rtol=1e-4, atol=1e-5)


def _unit_reference(tower, pixels, ops: dict):
    """Per sample: the tower's own modules (``run_qwen2_vl``) with unit ops of ``reference_units`` after the attention
    of the layers in ``ops`` (``op(x, layout, keys, probs)``), the rotary positions of every token following its unit
    (2 x unit position + (di, dj)), then the tower's own merger on each unit in turn (``patchmerger_window`` with its
    state dict). Returns the merged tokens (B, U, D) and their (t, h, w) (B, U, 3), written from the rules."""
    from . import reference_units as units

    layouts: list = []
    state: dict = {}
    last = len(tower.blocks) - 1

    def step(i, x, size, pos, keys, probs):
        if i == 0:
            state["layout"] = units.raster_layout((10, 10), 2, 0)
        if i in ops:
            x, size, state["layout"] = ops[i](x, state["layout"], keys, probs)
            offsets = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
            pos = torch.cat([2 * u.mass / u.size + offsets for u in state["layout"].units])
        if i == last:
            layouts.append(state["layout"])
        return x, size, pos

    hidden, _, _, _ = rotary.run_qwen2_vl(tower, pixels, step, True)
    merger = {k: v for k, v in tower.merger.state_dict().items()}
    tokens, positions = [], []
    for x, layout in zip(hidden, layouts):
        out, unit_pos, _ = units.project_units(x, layout, units.patchmerger_window, merger, 2)
        tokens.append(out)
        positions.append(torch.cat([torch.zeros(len(unit_pos), 1), unit_pos], dim=1))
    return torch.stack(tokens), torch.stack(positions)


@pytest.mark.parametrize("method", ["tome", "topk"])
def test_merger_after_unit_compression_matches_reference(tmp_path, method):
    """The tower's own PatchMerger after unit ToMe (2 units a layer) or unit Top-K (received attention at layer 0,
    keep 0.4): tokens and emitted (t, h, w) equal the per-sample reference (the tower's modules on the kept or
    merged units, the merger on each unit); every unit kept whole sits at get_rope_index's (t, h, w) for its
    window, distinct."""
    from . import reference_units as units
    from .reference_units import received_attention

    tower = _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    pixels = loaded.example_inputs(batch=2)["pixel_values"]
    if method == "tome":
        config, ops = ToMeConfig(r=2), {i: (lambda x, l, k, p: units.unit_tome(x, l, k, 2)) for i in range(2)}
    else:
        config = TopKConfig(keep=0.4, layers=(0,), score="received")
        ops = {0: lambda x, l, k, p: units.unit_topk(x, l, received_attention(p), 0.4)}
    compressed = compress(loaded, config, {"pixel_values": pixels}, emit_positions=True)
    assert compressed.report.unit == 2
    with torch.no_grad():
        got, positions, sizes = compressed(pixel_values=pixels)
    want, want_pos = _unit_reference(tower, pixels, ops)
    assert got.shape == want.shape == (2, 21 if method == "tome" else 10, 48)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos, rtol=1e-5, atol=1e-5)
    whole = positions[sizes[..., 0] == 4]
    assert torch.equal(whole, whole.round()) and len({tuple(p) for p in positions[0][sizes[0, :, 0] == 4].tolist()}) \
        == int((sizes[0, :, 0] == 4).sum())


def _prumerge_reference(tower, pixels, layer: int, budget: int, layout_fn=None, score_layer: int | None = None):
    """Per sample, from the rules: the tower's own modules on the raster-ordered patches (``run_qwen2_vl``'s
    preprocessing: the processor's ``patchify``, ``patch_embed``, position ids sorted row-major); where the stream
    enters block ``layer``, that block's own norm, qkv and rotary at the carried positions give the full-width
    queries and keys (heads side by side), and ``reference_units.unit_prumerge`` (received attention, units by the
    mean score, extra unit) acts on the 2x2 units; the rotary positions then follow the units (2 x unit position
    + (di, dj)); the tower's own merger on each unit in turn. ``layout_fn`` / ``score_layer``: mutations."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_position_ids

    from . import reference_units as units

    config, heads = tower.config, tower.config.num_heads
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixels, patch_size=config.patch_size, merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size)
    ids = get_vision_position_ids(torch.tensor([[1, rows, cols]]), config.spatial_merge_size)
    row_major = torch.argsort(ids[:, 0] * cols + ids[:, 1])
    offsets = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    merger = tower.merger.state_dict()
    tokens, positions = [], []

    def rotated_qk(block, x, pos):
        q, k, _ = block.attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = tower.rotary_pos_emb(x, pos)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        return q.reshape(x.shape[0], -1), k.reshape(x.shape[0], -1)  # (n, C): the heads side by side

    with torch.no_grad():
        for sample in patches:
            x = tower.patch_embed(sample)[row_major]
            pos = ids[row_major].float()
            layout = (layout_fn or units.raster_layout)((rows, cols), 2, 0)
            for index, block in enumerate(tower.blocks):
                if index == layer:
                    q, k = rotated_qk(tower.blocks[score_layer if score_layer is not None else layer], x, pos)
                    x, _, layout = units.unit_prumerge(x, layout, q, k, budget, received=True)
                    pos = torch.cat([2 * u.mass / u.size + offsets for u in layout.units])
                attn = block.attn
                q, k, v = attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
                cos, sin = tower.rotary_pos_emb(x, pos)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                probs = torch.softmax(q.transpose(0, 1) @ k.permute(1, 2, 0) * attn.scaling, dim=-1)
                x = x + attn.proj((probs @ v.transpose(0, 1)).transpose(0, 1).reshape(x.shape[0], -1))
                x = x + block.mlp(block.norm2(x))
            out, unit_pos, _ = units.project_units(x, layout, units.patchmerger_window, merger, 2)
            tokens.append(out)
            positions.append(torch.cat([torch.zeros(len(unit_pos), 1), unit_pos], dim=1))
    return torch.stack(tokens), torch.stack(positions)


def _strip_layout(grid, unit, prefix):
    """Mutation: 'units' of 1 x 4 patches (a row strip across two 2x2 merge windows) instead of 2 x 2."""
    from .reference_units import Layout, Unit

    h, w = grid
    out = [Unit([r * w + 4 * j + d for d in range(4)], 1.0, torch.tensor([float(r // 2), float(2 * j + r % 2)]))
           for r in range(h) for j in range(w // 4)]
    return Layout(prefix, out)


def test_unit_prumerge_then_merger_matches_reference(tmp_path):
    """Unit PruMerge at the input of block 1 (received attention of block 1's rotated queries and keys, 6 units
    kept best first + the extra unit), then the tower's own merger: 7 tokens and their emitted (t, h, w) equal the
    per-sample reference written from the rules (kept units at whole cells, sizes covering the 100 patches); units
    split across merge windows, or scores taken from block 0's queries and keys, do not."""
    tower = _tower(tmp_path / "q")
    pixels, (got, positions, sizes), _ = compressed_outputs(_load(tmp_path / "q"),
                                                            PruMergeConfig(tokens=6, layers=(1,), score="received"))
    want, want_pos = _prumerge_reference(tower, pixels, 1, 6)
    assert got.shape == want.shape == (2, 7, 48) and torch.allclose(sizes.sum(1), torch.full((2, 1), 100.0))
    assert torch.equal(positions[:, :6], positions[:, :6].round())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positions, want_pos, rtol=1e-5, atol=1e-5)
    for mutation in ({"layout_fn": _strip_layout}, {"score_layer": 0}):
        wrong, _ = _prumerge_reference(tower, pixels, 1, 6, **mutation)
        assert not torch.allclose(got, wrong, rtol=1e-4, atol=1e-5), mutation


def test_uncompressed_merged_grid_positions_are_rope_index(tmp_path):
    """--emit-positions on the merger output, nothing compressed: the merger's output unchanged and each token's
    (t, h, w) the one get_rope_index gives it relative to the image start (written out: t = 0, raster cells)."""
    _tower(tmp_path / "q")
    loaded = _load(tmp_path / "q")
    pixels = loaded.example_inputs(batch=1)["pixel_values"]
    exported = compress(loaded, [], {"pixel_values": pixels}, emit_positions=True)
    with torch.no_grad():
        tokens, positions, sizes = exported(pixel_values=pixels)
        torch.testing.assert_close(tokens, loaded.module(pixel_values=pixels))
    assert positions[0].tolist() == [[0.0, h, w] for h in range(5) for w in range(5)]
    assert bool((sizes == 4).all())
    assert "t, h, w" in exported.report.emitted_positions()["coordinates"]


def test_exports_through_the_cli_with_positions(tmp_path, capsys):
    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()  # saving the weights prints a progress bar
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, "--pooling", "tokens", "--method", "tome",
                              "--r", "2", "--emit-positions", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "patch grid 10x10" in out and "tokens per layer: 100 98 96" in out and "rotary position embedding" in out
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and (tmp_path / "m.onnx").is_file()
    assert "positions max abs" in out


@pytest.mark.parametrize("args,cause", [
    (["--img-size", 42], "multiple of patch_size x spatial_merge_size = 8"),
    (["--pooling", "mean"], "--pooling mean does not apply"),
], ids=["size", "pooling"])
def test_cli_refusals_are_one_line(tmp_path, capsys, args, cause):
    _tower(tmp_path / "q")
    cli_refuses(tmp_path, capsys, args, cause, SIZE)


def cli_refuses(tmp_path, capsys, args: list, cause: str, size: int) -> None:
    """The command line on the tower saved in tmp_path/q stops with one line naming ``cause``, writing nothing."""
    from .test_cli import run_cli

    capsys.readouterr()
    extra = [] if "--img-size" in args else ["--img-size", size]
    code, _, err = run_cli([f"hf:{tmp_path / 'q'}", *extra, *args, "-o", tmp_path / "m.onnx"], capsys)
    assert code != 0 and cause in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("method", [["--method", "tome", "--r", "2"],
                                    ["--method", "topk", "--keep", "0.4", "--layers", "1", "--score", "received"],
                                    ["--method", "prumerge", "--tokens", "6", "--layers", "1", "--score", "received"]],
                         ids=["tome", "topk", "prumerge"])
def test_merger_after_units_through_the_cli(tmp_path, capsys, method):
    """The default pooling (the tower's own merger) with unit ToMe / Top-K / PruMerge and --emit-positions: units
    set by the merger itself, export, ONNX Runtime parity of tokens and positions."""
    from .test_cli import run_cli

    _tower(tmp_path / "q")
    capsys.readouterr()
    code, out, err = run_cli([f"hf:{tmp_path / 'q'}", "--img-size", SIZE, *method, "--emit-positions",
                              "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "merge units" in out and "parity PyTorch vs ONNX Runtime" in out and "passed" in out
    assert "positions max abs" in out and (tmp_path / "m.onnx").is_file()


def test_the_bare_module_refuses_compression_before_its_merger_in_one_line(tmp_path):
    """``compress(loaded.module, ...)`` (the Python API on the raster-order module, not the loaded model whose merger
    follows at merge units) names the merger's windows instead of failing inside the graph."""
    _tower(tmp_path)
    loaded = load(tmp_path, SIZE)
    with pytest.raises(TCExportError, match=r"window_merger cannot read compressed tokens: .*2x2 merge units"):
        compress(loaded.module, ToMeConfig(r=2), loaded.example_inputs(batch=1))

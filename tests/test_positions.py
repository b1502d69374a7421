"""Positions carried with the tokens: every op against per-sample references, the model outputs of
--emit-positions, a mutation that must be caught, and a position table rewired by a finder."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from tc_export.job.compress import compress
from tc_export.errors import StructureNotFoundError
from tc_export.ops import topk as topk_module
from tc_export.ops.adjacent import AdjacentMerge
from tc_export.ops.prumerge import PruMerge
from tc_export.ops.state import positions_of
from tc_export.ops.tome import ToMeMerge
from tc_export.ops.topk import TopKPrune
from tc_export.passes import position_tables
from tc_export.passes.adjacent import AdjacentConfig
from tc_export.passes.prumerge import PruMergeConfig
from tc_export.passes.tome import ToMeConfig
from tc_export.passes.topk import TopKConfig

from .conftest import tiny_timm_vit
from .reference import reference_merge, reference_topk
from .reference_encoders import Hooks, run, timm_vit
from .reference_positions import (
    CarriedPositions,
    adjacent_positions,
    grid_positions,
    prumerge_positions,
    tome_positions,
    topk_positions,
)
from .tiny_vit import TinyViT


def _state(batch: int, tokens: int, protected: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sizes 1-3 and fractional positions (as after earlier merges), -1 on the protected rows; and the state."""
    g = torch.Generator().manual_seed(seed)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=g).float()
    pos = torch.rand(batch, tokens, 2, generator=g) * 7
    pos[:, :protected] = -1.0
    return size, pos, torch.cat([size, size * pos], dim=-1)


def _tensors(batch: int, tokens: int, width: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, width, generator=g) for _ in range(3)]


def _check(got_state: torch.Tensor, reference, batch: int) -> None:
    """Each sample's positions and sizes out of the op equal the reference's."""
    for b in range(batch):
        want_pos, want_size = reference(b)
        torch.testing.assert_close(got_state[b, :, :1], want_size, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(positions_of(got_state)[b], want_pos, rtol=1e-5, atol=1e-5)


TOME_CASES = [  # (tokens, protected, r, sort_unmerged, window)
    (17, 1, 5, None, None), (16, 0, 6, None, None), (16, 0, 6, True, None), (40, 1, 8, None, 3), (19, 2, 4, None, None),
]


@pytest.mark.parametrize("tokens,protected,r,sort_unmerged,window", TOME_CASES)
def test_tome_carries_size_weighted_mean_positions(tokens, protected, r, sort_unmerged, window):
    x, metric, _ = _tensors(2, tokens, 8, seed=tokens)
    size, pos, state = _state(2, tokens, protected, seed=r)
    op = ToMeMerge(r, protected, sort_unmerged=sort_unmerged, window=window)
    out, out_state = op(x, state, metric)
    _check(out_state, lambda b: tome_positions(x[b], metric[b], size[b], pos[b], r, protected, sort_unmerged, window), 2)
    plain_out, plain_size = op(x, size, metric)  # the features do not depend on the positions carried
    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(out_state[..., :1], plain_size)


@pytest.mark.parametrize("tokens,protected,r", [(17, 1, 5), (20, 0, 9)])
def test_adjacent_carries_size_weighted_mean_positions(tokens, protected, r):
    x, metric, _ = _tensors(2, tokens, 8, seed=tokens)
    size, pos, state = _state(2, tokens, protected, seed=r)
    _, out_state = AdjacentMerge(r, protected)(x, state, metric)
    _check(out_state, lambda b: adjacent_positions(x[b], metric[b], size[b], pos[b], r, protected), 2)


TOPK_CASES = [(False, False, 1), (True, False, 1), (True, True, 2), (False, True, 1)]


def _topk_case(fuse, keep_order, protected):
    tokens, keep = 17, 0.5
    x, _, _ = _tensors(2, tokens, 8, seed=3)
    attn = torch.rand(2, tokens, generator=torch.Generator().manual_seed(4)).softmax(-1)
    size, pos, state = _state(2, tokens, protected, seed=5)
    kept = topk_module.keep_count(tokens, keep, protected)
    _, out_state = TopKPrune(kept, protected, fuse=fuse, keep_order=keep_order)(x, state, attn)
    _check(out_state, lambda b: topk_positions(size[b], pos[b], attn[b], keep, protected, fuse, keep_order), 2)


@pytest.mark.parametrize("fuse,keep_order,protected", TOPK_CASES)
def test_topk_gathers_exact_positions(fuse, keep_order, protected):
    _topk_case(fuse, keep_order, protected)


@pytest.mark.parametrize("extra,protected", [(True, 1), (False, 2)])
def test_prumerge_gathers_exact_positions(extra, protected):
    tokens, budget = 20, 6
    x, query, key = _tensors(2, tokens, 8, seed=7)
    size, pos, state = _state(2, tokens, protected, seed=8)
    _, out_state = PruMerge(budget, protected, extra=extra, neighbours=4)(x, state, query, key)
    _check(out_state, lambda b: prumerge_positions(size[b], pos[b], query[b], key[b], budget, protected, extra), 2)


def test_mutation_positions_not_gathered_is_caught(monkeypatch):
    """If an op gathered the sizes but left the positions in their old rows, the checks above would fail."""
    real = topk_module.gather_rows

    def forgetful(x, rows, stride=1, offset=0):
        out = real(x, rows, stride, offset)
        if x.shape[-1] == 3:  # the state: keep the gathered sizes, take the positions from the leading rows
            out = torch.cat([out[..., :1], x[:, offset:offset + out.shape[1], 1:]], dim=-1)
        return out

    monkeypatch.setattr(topk_module, "gather_rows", forgetful)
    with pytest.raises(AssertionError):
        _topk_case(False, False, 1)


# --- through the token pass: --emit-positions on a timm ViT against the per-sample reference ---------------------

def _cls(probs):
    return probs[:, 0, :].mean(dim=0)


def _tome_step(r):
    def step(layer, x, size, pos, keys, probs):
        pos, _ = tome_positions(x, keys.mean(0), size, pos, r, 1)
        x, size = reference_merge(x, keys.mean(0), size, r, 1)
        return x, size, pos
    return step


def _topk_step(keep, layers, fuse):
    def step(layer, x, size, pos, keys, probs):
        if layer not in layers:
            return x, size, pos
        pos, _ = topk_positions(size, pos, _cls(probs), keep, 1, fuse, False)
        x, size = reference_topk(x, size, _cls(probs), keep, 1, fuse, False)
        return x, size, pos
    return step


PASS_CASES = {
    "tome": (ToMeConfig(r=3), True, _tome_step(3)),
    "topk": (TopKConfig(keep=0.5, layers=(0, 2)), False, _topk_step(0.5, (0, 2), False)),
    "topk-fuse": (TopKConfig(keep=0.5, layers=(1,), fuse=True), False, _topk_step(0.5, (1,), True)),
}


@pytest.mark.parametrize("name", list(PASS_CASES))
def test_emitted_positions_match_reference(name):
    config, prop_attn, step = PASS_CASES[name]
    model = tiny_timm_vit(img_size=64, depth=3)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    compressed = compress(model, config, {"x": images[:1]}, emit_positions=True)
    carried = CarriedPositions(step, grid_positions(1, (4, 4)))
    want, _ = run(timm_vit(model), {"x": images}, Hooks(after_attention=carried, prop_attn=prop_attn))
    with torch.no_grad():
        logits, positions, sizes = compressed(images)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(positions, torch.stack(carried.final), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes, torch.stack(carried.sizes), rtol=1e-5, atol=1e-5)
    if name.startswith("topk") and not config.fuse:  # pruning: exact integer grid coordinates
        assert torch.equal(positions, positions.round())


@pytest.mark.parametrize("config", [None, TopKConfig(keep=0.5, layers=(0,))], ids=["uncompressed", "topk"])
def test_emitted_positions_with_a_features_cut(config):
    """--features N --emit-positions: the state reaches the new outputs (it was erased with the cut-off blocks)."""
    model = tiny_timm_vit(img_size=64, depth=3)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    compressed = compress(model, [config] if config else [], {"x": images[:1]}, features=1, emit_positions=True)
    step = _topk_step(0.5, (0,), False) if config else (lambda layer, x, size, pos, keys, probs: (x, size, pos))
    carried = CarriedPositions(step, grid_positions(1, (4, 4)))
    run(timm_vit(model), {"x": images}, Hooks(after_attention=carried, prop_attn=False))
    with torch.no_grad():
        tokens, positions, sizes = compressed(images)
    assert tokens.shape[1] == positions.shape[1] == (9 if config else 17)
    torch.testing.assert_close(positions, torch.stack(carried.final), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes, torch.stack(carried.sizes), rtol=1e-5, atol=1e-5)


def test_models_without_positions_are_unchanged():
    """No table and no --emit-positions: the graph has no state with positions (the same export as before)."""
    model = tiny_timm_vit(img_size=64, depth=2)
    images = torch.randn(1, 3, 64, 64)
    plain = compress(model, ToMeConfig(r=3), {"x": images})
    assert plain.report.positions is None
    names = {getattr(n.target, "__name__", "") for n in plain.module.graph.nodes}
    assert not names & {"initial_state", "positions_of", "size_column"}


# --- a finder rewires a position table ----------------------------------------------------------------------------

class TableViT(TinyViT):
    """TinyViT with a position table added before every layer: coordinates (class token: -1) times a projection,
    fixed at the original token layout (as a rotary or relative-bias table is)."""

    def __init__(self) -> None:
        super().__init__(depth=3, class_token=True)
        self.projection = torch.nn.Parameter(torch.randn(2, 48) * 0.1)
        self.register_buffer("table", (grid_positions(1, (8, 8)) @ self.projection.detach())[None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.embedder(images).flatten(2).transpose(1, 2)
        h = torch.cat([self.class_embedding.expand(h.shape[0], -1, -1), h], dim=1) + self.positions
        for layer in self.layers:
            h = layer(h + self.table)
        return self.classifier(self.final_ln(h)[:, 0])


class _AddedTable(position_tables.PositionTable):
    add: fx.Node = None  # the add that puts the fixed table on the stream
    projection: torch.Tensor = None  # the coordinates -> table projection

    def rewire(self, gm, positions, prefix, suffix):
        if not hasattr(gm, "table_projection"):
            gm.register_buffer("table_projection", self.projection)
        with gm.graph.inserting_before(self.add):
            projection = gm.graph.get_attr("table_projection")
            table = gm.graph.call_function(torch.matmul, (positions, projection))
        self.add.args = tuple(table if arg in self.nodes else arg for arg in self.add.args)


def _finder(model: TableViT):
    return lambda gm, structure: _find_added_tables(gm, structure, model.projection.detach())


def _find_added_tables(gm, structure, projection):
    adds = [n for n in gm.graph.nodes
            if n.op == "call_function" and any(a.op == "get_attr" and a.target == "table"
                                               for a in n.args if isinstance(a, fx.Node))]
    tables = []
    for site, add in zip(structure.sites, adds):
        table = _AddedTable(site.index, "test position table", frozenset(a for a in add.args if isinstance(a, fx.Node)
                                                                            and a.op == "get_attr"))
        table.add, table.projection = add, projection
        tables.append(table)
    return tables


def test_fake_finder_rewires_a_table_and_unlocks_the_model():
    torch.manual_seed(0)
    model = TableViT().eval()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(StructureNotFoundError, match="laid out by the original token positions"):
        compress(model, TopKConfig(keep=0.5, layers=(0,)), {"images": images[:1]})
    finder = position_tables.register_finder(_finder(model))
    try:
        compressed = compress(model, TopKConfig(keep=0.5, layers=(0,)), {"images": images[:1]})
    finally:
        position_tables._FINDERS.remove(finder)
    assert compressed.report.positions == 2  # a table found: positions carried without --emit-positions
    assert compressed.report.rewired == ["layer 1: test position table", "layer 2: test position table"]
    with torch.no_grad():
        logits = compressed(images)
    torch.testing.assert_close(logits, _reference_topk_table_vit(model, images, keep=0.5), rtol=1e-4, atol=2e-5)


@torch.no_grad()
def _reference_topk_table_vit(model: TableViT, images, keep: float):
    """Top-K after layer 0's attention, one sample at a time; every later table is computed from the kept tokens'
    original coordinates."""
    import math

    from .reference import reference_keep_count

    outputs = []
    for image in images:
        h = model.embedder(image[None]).flatten(2).transpose(1, 2)[0]
        h = torch.cat([model.class_embedding[0], h]) + model.positions[0]
        pos = grid_positions(1, (8, 8))
        for index, layer in enumerate(model.layers):
            h = h + pos @ model.projection
            n, c = h.shape
            y = layer.ln_a(h)
            q, k, v = (t.view(n, layer.heads, c // layer.heads).transpose(0, 1)
                       for t in (layer.to_q(y), layer.to_k(y), layer.to_v(y)))
            probs = ((q @ k.transpose(-1, -2)) / math.sqrt(c // layer.heads)).softmax(-1)
            h = h + layer.out((probs @ v).transpose(0, 1).reshape(n, c))
            if index == 0:
                cls = probs[:, 0].mean(0)
                count = reference_keep_count(n, keep, 1)
                kept = sorted(range(n - 1), key=lambda i: -float(cls[1 + i]))[:count]
                rows = [0] + [1 + i for i in kept]
                h, pos = h[rows], pos[rows]
            h = h + layer.ff(layer.ln_b(h))
        outputs.append(model.classifier(model.final_ln(h)[0]))
    return torch.stack(outputs)


# --- --emit-positions after a projector: its output grid --------------------------------------------------------

@pytest.mark.parametrize("config,grid,covered,prefix", [
    ("pool", (2, 2), 4.0, 1), ("patchmerger", (2, 2), 4.0, 0),
])
def test_projectors_emit_their_output_grid(config, grid, covered, prefix):
    from tc_export.passes import METHODS

    settings = {"pool": {"stride": 2, "prefix_mode": "keep"}, "patchmerger": {"scale": 0.5}}[config]
    model = tiny_timm_vit(img_size=64, depth=2)
    images = torch.randn(2, 3, 64, 64)
    compressed = compress(model, METHODS.get(config).config_type(**settings), {"x": images[:1]}, emit_positions=True)
    with torch.no_grad():
        tokens, positions, sizes = compressed(images)
    assert tokens.shape[1] == prefix + 4
    want = grid_positions(prefix, grid).expand(2, -1, -1)
    torch.testing.assert_close(positions, want)
    assert torch.equal(sizes[:, prefix:], torch.full((2, 4, 1), covered))


def test_emit_positions_through_the_cli_records_them(tmp_path, capsys):
    import json

    import onnx

    from tc_export.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["timm:vit_tiny_patch16_224", "--img-size", "64", "--method", "topk", "--keep", "0.5",
              "--emit-positions", "-o", str(tmp_path / "m.onnx")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    assert "positions max abs 0.00e+00" in out and "sizes max abs" in out
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert [o.name for o in model.graph.output] == ["logits", "positions", "sizes"]
    meta = json.loads({p.key: p.value for p in model.metadata_props}["tc_export.positions"])
    assert meta["coordinates"].startswith("row, column in the original patch grid")


def test_initial_positions_of_video_frames_and_sequences():
    from tc_export.ops.state import initial_state

    x = torch.zeros(4, 1 + 6, 8)  # 2 clips of 2 frames, a class token and a 2x3 grid per frame
    state = initial_state(x, None, 1, 0, (2, 3), frames=2)
    positions = positions_of(state)
    assert positions.shape == (4, 7, 3)
    assert torch.equal(positions[:, 0], torch.full((4, 3), -1.0))
    assert positions[:, 1:, 0].tolist() == [[0.0] * 6, [1.0] * 6, [0.0] * 6, [1.0] * 6]  # frame within the clip
    assert positions[0, 1:, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    sizes = torch.tensor([[[1.0], [1.0], [1.0], [0.0], [1.0]]])  # token 3 is padding
    sequence = positions_of(initial_state(torch.zeros(1, 5, 8), sizes, 0, 1, None))
    assert sequence[0, :, 0].tolist() == [0.0, 1.0, 2.0, 0.0, -1.0]  # a 1-D index, padding 0, the suffix row -1

"""Merge units (docs/merge-units.md): token methods acting on whole s x s windows, and the window projectors after
them, held to the per-sample reference of ``reference_units`` (written from the rules, not from the code)."""

from __future__ import annotations

import pytest
import torch

from tc_export import compress
from tc_export.errors import ConfigError
from tc_export.ops.projectors.windows import UnitWindows
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig
from tc_export.passes.projectors import (
    CAbstractorConfig,
    PatchMergerConfig,
    PoolConfig,
    UnshuffleConfig,
)

from . import reference_units as ref
from .conftest import tiny_timm_vit

GRID, UNIT = (8, 8), 2


def _model(depth: int = 4):
    return tiny_timm_vit(img_size=128, depth=depth)


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _projector_weights(compressed) -> dict:
    module = next(m for m in compressed.module.modules() if isinstance(m, UnitWindows))
    return {k: v.detach() for k, v in module.projector.state_dict().items()}


def _run(compressed, images):
    with torch.no_grad():
        return compressed.module(x=images)


WINDOW_FNS = {
    "unshuffle": (UnshuffleConfig(), lambda sd: (ref.unshuffle_window, sd)),
    "patchmerger": (PatchMergerConfig(out_channels=64), lambda sd: (ref.patchmerger_window, sd)),
    "pool": (PoolConfig(), lambda sd: (ref.pool_window("avg"), sd)),
    "pool-max": (PoolConfig(mode="max"), lambda sd: (ref.pool_window("max"), sd)),
}


def _check_against_reference(model, compressed, images, ops, projector: str, prop_attn: bool,
                              before=None) -> None:
    tokens, positions, sizes = _run(compressed, images)
    window_fn, sd = WINDOW_FNS[projector][1](_projector_weights(compressed) if projector.startswith(("unsh", "patch"))
                                             else {})
    with torch.no_grad():
        results = ref.run_units(model, images, GRID, UNIT, ops, prop_attn, before)
    for b, (normed, layout) in enumerate(results):
        want, want_pos, want_size = ref.project_units(normed, layout, window_fn, sd, UNIT)
        torch.testing.assert_close(tokens[b], want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(positions[b], want_pos, atol=1e-5, rtol=0)
        torch.testing.assert_close(sizes[b], want_size, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projector", ["unshuffle", "patchmerger", "pool", "pool-max"])
def test_unit_topk_then_window_projector_equals_reference(projector):
    model, images = _model(), _images()
    config = WINDOW_FNS[projector][0]
    compressed = compress(model, [TopKConfig(keep=0.5, layers=(2,)), config], {"x": images}, emit_positions=True)
    assert compressed.report.notes[0].startswith("merge units of 2x2")
    ops = {2: lambda x, layout, keys, probs: ref.unit_topk(x, layout, ref.class_attention(probs), 0.5)}
    _check_against_reference(model, compressed, images, ops, projector, prop_attn=False)
    assert compressed.token_counts()[-1] == 8  # 16 units, half kept, one token each


@pytest.mark.parametrize("projector", ["unshuffle", "pool"])
def test_unit_tome_then_window_projector_equals_reference(projector):
    model, images = _model(), _images()
    config = WINDOW_FNS[projector][0]
    compressed = compress(model, [ToMeConfig(r=3, layers=(1, 2)), config], {"x": images}, emit_positions=True)
    ops = {layer: (lambda x, layout, keys, probs: ref.unit_tome(x, layout, keys, 3)) for layer in (1, 2)}
    _check_against_reference(model, compressed, images, ops, projector, prop_attn=True)
    assert compressed.token_counts()[-1] == 10  # 16 units - 2 x 3 merges


def _score(received: bool):
    return ref.received_attention if received else ref.class_attention


METHODS = {  # name -> (config, after-attention ops, before-layer ops, prop_attn, units left)
    "topk": lambda received: (TopKConfig(keep=0.5, layers=(2,), score="received" if received else "class"),
                              {2: lambda x, lay, k, p: ref.unit_topk(x, lay, _score(received)(p), 0.5)}, None, False, 8),
    "prumerge": lambda received: (
        PruMergeConfig(tokens=5, layers=(2,), score="received" if received else "class"), {},
        {2: lambda x, lay, q, k: ref.unit_prumerge(x, lay, q, k, 5, received=received)}, False, 6),
    "tome": lambda received: (ToMeConfig(r=3, layers=(1, 2)),
                              {layer: (lambda x, lay, k, p: ref.unit_tome(x, lay, k, 3)) for layer in (1, 2)},
                              None, True, 10),
    "adjacent": lambda received: (AdjacentConfig(r=3, layers=(1, 2)),
                                  {layer: (lambda x, lay, k, p: ref.unit_adjacent(x, lay, k, 3)) for layer in (1, 2)},
                                  None, True, 10),
}


@pytest.mark.parametrize("tower", ["class-token", "no-class-token"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_at_units_equals_reference(method, tower):
    """Every token method on whole units, on a class-token ViT and a tower without one (Top-K and PruMerge scored
    there by the attention each token receives), followed by InternVL's unshuffle, against the reference."""
    no_class = tower == "no-class-token"
    model = tiny_timm_vit(img_size=128, depth=4, **({"class_token": False, "global_pool": "avg"} if no_class else {}))
    images = _images()
    config, ops, before, prop_attn, units = METHODS[method](no_class)
    compressed = compress(model, [config, UnshuffleConfig()], {"x": images}, emit_positions=True)
    _check_against_reference(model, compressed, images, ops, "unshuffle", prop_attn, before)
    assert compressed.token_counts()[-1] == units


def test_received_attention_is_an_option_on_class_token_towers_and_refusal_names_it():
    model, images = _model(depth=3), _images()
    by_class = compress(model, [TopKConfig(keep=0.5, layers=(1,)), UnshuffleConfig()], {"x": images},
                        emit_positions=True)
    received = compress(model, [TopKConfig(keep=0.5, layers=(1,), score="received"), UnshuffleConfig()],
                        {"x": images}, emit_positions=True)
    assert not torch.equal(_run(by_class, images)[1], _run(received, images)[1])  # other units kept
    no_class = tiny_timm_vit(img_size=128, depth=2, class_token=False, global_pool="avg")
    with pytest.raises(ConfigError, match="no class token.*score: received"):
        compress(no_class, [TopKConfig(keep=0.5, layers=(1,))], {"x": images})


@pytest.mark.parametrize("config", [UnshuffleConfig(), UnshuffleConfig(ps_version="v1"), PatchMergerConfig(),
                                    PoolConfig(), PoolConfig(mode="max")], ids=lambda c: f"{c.method}")
def test_uncompressed_with_unit_equals_the_model_without_it(config):
    model, images = _model(depth=2), _images()
    plain = compress(model, [config], {"x": images}, emit_positions=True)
    units = compress(model, [config], {"x": images}, emit_positions=True, unit=2)
    assert any("merge units" in note for note in units.report.notes)
    for got, want in zip(_run(units, images), _run(plain, images)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [UnshuffleConfig(), PatchMergerConfig(out_channels=64), PoolConfig()],
                         ids=lambda c: c.method)
def test_pruning_at_the_tower_output_gathers_the_uncompressed_projector_windows(config):
    """Top-K after the last layer's attention leaves only per-token work (MLP, final norm) before the projector:
    the output must be the uncompressed projector's output at the kept windows, found from the emitted positions."""
    model, images = _model(depth=3), _images()
    pruned = compress(model, [TopKConfig(keep=0.5, layers=(2,), keep_order=True), config], {"x": images},
                      emit_positions=True)
    plain = compress(model, [config], {"x": images})
    tokens, positions, _ = _run(pruned, images)
    whole = _run(plain, images)
    index = (positions[..., 0] * (GRID[1] // UNIT) + positions[..., 1]).round().long()
    assert (index.diff(dim=1) > 0).all()  # keep_order: raster order of the unit grid
    gathered = torch.stack([whole[b, index[b]] for b in range(images.shape[0])])
    torch.testing.assert_close(tokens, gathered, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("configs", "unit", "message"), [
    ([TopKConfig(keep=0.5, layers=(1,)), CAbstractorConfig(tokens=4)], None, "convolutions and adaptive pooling mix"),
    ([TopKConfig(keep=0.5, layers=(1,)), PoolConfig(mode="bilinear")], None, "interpolates across windows"),
    ([TopKConfig(keep=0.5, layers=(1,)), UnshuffleConfig()], 4, "--unit 4 conflicts with unshuffle"),
    ([CAbstractorConfig(tokens=4)], 2, "mix"),
    ([TopKConfig(keep=0.5, layers=(1,)), PoolConfig(at="0", prefix_mode="keep")], 2, "acts at the encoder output"),
])
def test_unit_refusals_name_the_cause(configs, unit, message):
    model, images = _model(depth=2), _images(1)
    with pytest.raises(ConfigError, match=message):
        compress(model, configs, {"x": images}, unit=unit)


def test_a_grid_the_unit_does_not_divide_is_refused():
    model = tiny_timm_vit(img_size=96, depth=2)  # 6 x 6 patches
    with pytest.raises(ConfigError, match="--unit 4 does not divide the 6x6 patch grid"):
        compress(model, [TopKConfig(keep=0.5, layers=(1,))], {"x": torch.randn(1, 3, 96, 96)}, unit=4)


RECIPE_STAGES = {
    "topk-unshuffle": ("[{method: topk, keep: 0.5, layers: [3]}, {method: unshuffle}]", "unshuffle",
                       lambda: {3: lambda x, layout, keys, probs: ref.unit_topk(x, layout, ref.class_attention(probs),
                                                                                0.5)}, False, 25),
    "tome-unshuffle": ("[{method: tome, r: 6, layers: [2, 5]}, {method: unshuffle}]", "unshuffle",
                       lambda: {layer: (lambda x, layout, keys, probs: ref.unit_tome(x, layout, keys, 6))
                                for layer in (2, 5)}, True, 37),
    "topk-pool": ("[{method: topk, keep: 0.5, layers: [3]}, {method: pool, stride: 2}]", "pool",
                  lambda: {3: lambda x, layout, keys, probs: ref.unit_topk(x, layout, ref.class_attention(probs),
                                                                           0.5)}, False, 25),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPE_STAGES))
def test_vit_s_recipe_through_the_command_line(name, tmp_path, capsys, monkeypatch):
    """The issue's done-when: ``tc-export vit_s --recipe R.yaml`` (load, passes, MACs, export, parity) with a token
    method then a window projector; the ONNX output equals the per-sample reference, positions and sizes too."""
    import onnxruntime as ort

    from tc_export.job import pipeline
    from tc_export.cli.main import main

    stages, projector, ops, prop_attn, tokens = RECIPE_STAGES[name]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages: {stages}\n")
    loaded: dict = {}
    load_for_job = pipeline.load_for_job

    def keep_loaded(config):
        loaded["model"] = load_for_job(config)
        return loaded["model"]

    monkeypatch.setattr(pipeline, "load_for_job", keep_loaded)
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as done:
        main(["vit_s", "--recipe", str(recipe), "--emit-positions", "-o", str(out)])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    assert "passed" in printed.out and "MAC" in printed.out
    assert "merge units of 2x2 patches" in printed.out
    model = loaded["model"].module
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got_tokens, got_positions, got_sizes = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert got_tokens.shape[1] == tokens
    sd = {}
    if projector == "unshuffle":  # the weights the pass gives the projector: PyTorch's defaults under seed 0
        from tc_export.ops.projectors import UnshuffleProjector

        with torch.random.fork_rng():
            torch.manual_seed(0)
            sd = {k: v.detach() for k, v in UnshuffleProjector(384, (14, 14), 1).state_dict().items()}
    window_fn = ref.unshuffle_window if projector == "unshuffle" else ref.pool_window("avg")
    with torch.no_grad():
        (normed, layout), = ref.run_units(model, images, (14, 14), UNIT, ops(), prop_attn)
        want, want_pos, want_size = ref.project_units(normed, layout, window_fn, sd, UNIT)
    torch.testing.assert_close(torch.from_numpy(got_tokens[0]), want, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.from_numpy(got_positions[0]), want_pos, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got_sizes[0]), want_size, atol=1e-5, rtol=0)


def _split_order(grid, unit):
    """A broken unit order: raster runs of s^2 tokens, so a unit straddles two windows."""
    return torch.arange(grid[0] * grid[1])


def _transposed_order(grid, unit):
    """A broken unit order: each window's tokens (dj, di) instead of (di, dj)."""
    h, w = grid
    raster = torch.arange(h * w).reshape(h // unit, unit, w // unit, unit)
    return raster.permute(0, 2, 3, 1).reshape(-1)


def _assert_unit_topk_fails_the_reference() -> None:
    model, images = _model(depth=3), _images()
    compressed = compress(model, [TopKConfig(keep=0.5, layers=(1,)), UnshuffleConfig()], {"x": images},
                          emit_positions=True)
    ops = {1: lambda x, layout, keys, probs: ref.unit_topk(x, layout, ref.class_attention(probs), 0.5)}
    with pytest.raises(AssertionError, match="not close"):
        _check_against_reference(model, compressed, images, ops, "unshuffle", prop_attn=False)


@pytest.mark.parametrize("mutant", [_split_order, _transposed_order], ids=["split-across-windows", "in-window-order"])
def test_mutation_wrong_unit_order_is_caught(mutant, monkeypatch):
    """The reference check must fail when units are not the projector's windows in its order."""
    import tc_export.ops.state as state

    monkeypatch.setattr(state, "unit_window_order", mutant)
    _assert_unit_topk_fails_the_reference()


def test_mutation_positions_off_by_one_unit_are_caught(monkeypatch):
    import importlib

    import tc_export.ops.state as state

    token_pass = importlib.import_module("tc_export.passes.token_pass")
    honest = state.initial_unit_state

    def shifted(x, prefix, suffix, grid, frames=None):
        out = honest(x, prefix, suffix, grid, frames)
        return torch.cat([out[..., :-1], out[..., -1:] + out[..., :1]], dim=-1)  # column + 1 unit

    monkeypatch.setattr(token_pass, "initial_unit_state", shifted)
    _assert_unit_topk_fails_the_reference()


def test_expand_units_gives_each_token_its_patch_coordinates():
    """Uncompressed, the expanded unit state is each token's own (row, column) on the patch grid, in the order the
    tokens run (checked against the raster coordinates gathered by the window rule, written out here)."""
    from tc_export.ops.state import expand_units, initial_unit_state

    h, w, s, prefix = 4, 6, 2, 1
    x = torch.zeros(2, prefix + h * w, 3)
    state = initial_unit_state(x, prefix, 0, (h // s, w // s))
    expanded = expand_units(state, prefix, 0, s)
    want = [(-1.0, -1.0)] + [(float(s * i + di), float(s * j + dj)) for i in range(h // s) for j in range(w // s)
                              for di in range(s) for dj in range(s)]
    assert expanded.shape == (2, prefix + h * w, 3)
    assert torch.equal(expanded[0, :, 1:] / expanded[0, :, :1], torch.tensor(want))
    # a merged unit: sizes 1 + 2, positions mass-weighted; its tokens stand for 3 tokens each
    merged = torch.tensor([[[3.0, 2.0, 3.0]]])  # size 3 at unit (2/3, 1): masses 3 x (2/3, 1)
    out = expand_units(merged, 0, 0, s)
    assert torch.equal(out[0, :, 0], torch.full((4,), 3.0))
    torch.testing.assert_close(out[0, :, 1:] / out[0, :, :1],
                               torch.tensor([[2 * (2 / 3) + di, 2.0 + dj] for di in range(2) for dj in range(2)]))


ROTARY = ["vit_base_patch16_rope_224", "eva02_base_patch14_224"]


def _unit_rotary_step(method, layers, grid, prefix):
    """A ``reference_rotary`` step applying a unit op (``reference_units``) with the positions riding along."""
    from . import reference_rotary as rotary

    state: dict = {}

    def step(i, x, size, pos, keys, probs):
        if i == 0:
            state["layout"] = ref.raster_layout(grid, UNIT, prefix)
        if i not in layers:
            return x, size, pos

        def apply(t, s):
            out, sizes, state["layout"] = method(t, state["layout"], keys, probs)
            return out, sizes

        return rotary.with_positions(apply, x, size, pos)

    return step


@pytest.mark.parametrize("arch", ROTARY)
@pytest.mark.parametrize("method", ["topk", "tome"])
def test_rotary_tables_follow_the_units(arch, method):
    """Rotary towers: the tables are recomputed from each token's carried patch coordinates (``expand_units``) at
    every layer; unit Top-K / ToMe against the rotary reference with the positions riding along; uncompressed with
    --unit, the model's own output."""
    from . import reference_rotary as rotary
    from .test_rotary import _images as rotary_images
    from .test_rotary import small_rotary

    model = small_rotary(arch)
    inputs = rotary_images(model)
    prefix, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        plain = model(**inputs)
        unit_only = compress(model, [], inputs, unit=UNIT)(**inputs)
    torch.testing.assert_close(unit_only, plain, rtol=1e-5, atol=1e-5)
    if method == "topk":
        config, layers, prop = TopKConfig(keep=0.5, layers=(0, 1)), (0, 1), False
        fn = lambda x, lay, keys, probs: ref.unit_topk(x, lay, ref.class_attention(probs), 0.5)  # noqa: E731
    else:
        config, layers, prop = ToMeConfig(r=2), (0, 1, 2), True
        fn = lambda x, lay, keys, probs: ref.unit_tome(x, lay, keys, 2)  # noqa: E731
    want, counts = rotary.run_timm_eva(model, inputs["x"], _unit_rotary_step(fn, layers, grid, prefix), prop)
    compressed = compress(model, config, inputs, unit=UNIT)
    assert counts == compressed.token_counts()
    with torch.no_grad():
        got = compressed(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["beit", "relpos"])
def test_relative_bias_tables_follow_the_unit_order(name):
    """Relative-position biases looked up from each token's carried patch coordinates: with --unit and nothing
    compressed, the tokens run in unit order and the model's output is unchanged (64 px: a 4 x 4 grid)."""
    from .test_relative_bias import TIMM, timm_model

    model = timm_model(TIMM[name][0])
    inputs = {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    compressed = compress(model, [], inputs, unit=UNIT)
    assert compressed.report.rewired  # the bias tables are looked up from the carried positions
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), model(**inputs), rtol=1e-5, atol=1e-5)


def test_video_frames_at_units_carry_the_frame_coordinate():
    """A per-frame tower (--frames): every frame pruned at units on its own, the projector per window; positions
    are (frame, row, column) on the unit grid, frame after frame."""
    from tc_export.models.video import FrameTower

    model, frames = _model(depth=3), 2
    video = torch.randn(2, frames, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    tower = FrameTower(model, frames=frames).eval()
    compressed = compress(tower, [TopKConfig(keep=0.5, layers=(1,)), UnshuffleConfig()], {"video": video},
                          frames=frames, emit_positions=True)
    with torch.no_grad():
        tokens, positions, sizes = compressed.module(video=video)
    sd = _projector_weights(compressed)
    ops = {1: lambda x, layout, keys, probs: ref.unit_topk(x, layout, ref.class_attention(probs), 0.5)}
    with torch.no_grad():
        results = ref.run_units(model, video.flatten(0, 1), GRID, UNIT, ops, prop_attn=False)
    for index, (normed, layout) in enumerate(results):
        clip, frame = divmod(index, frames)
        want, want_pos, want_size = ref.project_units(normed, layout, ref.unshuffle_window, sd, UNIT)
        rows = slice(frame * 8, (frame + 1) * 8)
        torch.testing.assert_close(tokens[clip, rows], want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(positions[clip, rows, 1:], want_pos, atol=1e-5, rtol=0)
        assert torch.equal(positions[clip, rows, 0], torch.full((8,), float(frame)))
        torch.testing.assert_close(sizes[clip, rows], want_size, atol=1e-5, rtol=0)


def test_unit_topk_fused_unit_aggregates_the_pruned_units():
    """QuietPrune aggregates the pruned groups into one: Top-K ``fuse`` at units adds one unit, EViT's fused token
    slot by slot; the projector maps it to one token at the pruned units' mean position."""
    model, images = _model(depth=3), _images()
    compressed = compress(model, [TopKConfig(keep=0.5, layers=(1,), fuse=True), UnshuffleConfig()], {"x": images},
                          emit_positions=True)
    ops = {1: lambda x, layout, keys, probs: ref.unit_topk(x, layout, ref.class_attention(probs), 0.5, fuse=True)}
    _check_against_reference(model, compressed, images, ops, "unshuffle", prop_attn=False)
    assert compressed.token_counts()[-1] == 9  # 8 kept units + the fused one


def test_received_attention_topk_on_tokens_equals_reference():
    """Without units too: Top-K on a tower without a class token, by the attention each token receives."""
    from .reference import reference_timm_blocks, reference_topk

    model = tiny_timm_vit(img_size=64, depth=3, class_token=False, global_pool="avg")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))

    def step(layer, x, size, keys, probs):
        if layer != 1:
            return x, size
        return reference_topk(x, size, ref.received_attention(probs), 0.5, 0, False, False)

    want, counts = reference_timm_blocks(model, images, step, prop_attn=False)
    compressed = compress(model, TopKConfig(keep=0.5, layers=(1,), score="received"), {"x": images})
    assert counts == compressed.token_counts()
    with torch.no_grad():
        torch.testing.assert_close(compressed(x=images), want, rtol=1e-4, atol=1e-5)


def test_unit_refusals_through_the_command_line(tmp_path, capsys):
    """One line, non-zero exit, no traceback, nothing written."""
    from tc_export.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [{method: topk, keep: 0.5, layers: [1]}, {method: cabstractor, tokens: 4}]\n")
    for args, message in ((["--recipe", str(recipe)], "cabstractor needs the patch grid"),
                          (["--method", "topk", "--keep", "0.5", "--unit", "3"], "--unit 3 does not divide the 4x4")):
        out = tmp_path / "m.onnx"
        with pytest.raises(SystemExit) as done:
            main(["vit_s", "--img-size", "64", *args, "-o", str(out)])
        printed = capsys.readouterr()
        assert done.value.code != 0
        assert message in printed.err and "Traceback" not in printed.err
        assert len([line for line in printed.err.splitlines() if line.strip()]) == 1
        assert not out.exists()


@pytest.mark.parametrize("projector", [UnshuffleConfig(), PoolConfig()], ids=lambda c: c.method)
@pytest.mark.parametrize("received", [False, True], ids=["class", "received"])
def test_topk_at_the_tower_output_gathers_the_projector_windows_it_scores(projector, received):
    """Top-K on the tower output (--features N, scored by layer N + 1's norm and q/k, as VisionZip/PruMerge place
    it) at units: the output is the uncompressed projector's output at the kept windows, exactly, and the kept
    windows are the best by the mean score of their tokens, computed here from layer N + 1's own modules."""
    model, images = _model(depth=3), _images()
    score = "received" if received else "class"
    pruned = compress(model, [TopKConfig(keep=0.5, layers=(2,), score=score), projector], {"x": images},
                      features=1, emit_positions=True)
    plain = compress(model, [projector], {"x": images}, features=1)
    tokens, positions, _ = _run(pruned, images)
    index = (positions[..., 0] * (GRID[1] // UNIT) + positions[..., 1]).round().long()
    whole = _run(plain, images)
    torch.testing.assert_close(tokens, torch.stack([whole[b, index[b]] for b in range(2)]), atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the reference selection, from layer 2's modules on layer 1's raster-ordered output
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:2]:
            x = block(x)
        attn = model.blocks[2].attn
        q, k, _ = attn.qkv(model.blocks[2].norm1(x)).reshape(2, x.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
        scores = probs.mean(dim=(1, 2)) if received else probs[:, :, 0].mean(1)
    for b in range(2):
        layout = ref.raster_layout(GRID, UNIT, 1)
        unit_scores = [float(scores[b, u.rows].mean()) for u in layout.units]
        ranked = sorted(range(len(unit_scores)), key=lambda u: (-unit_scores[u], u))[:8]
        assert index[b].tolist() == ranked


def test_prumerge_at_the_tower_output_at_units_keeps_the_best_units_and_drops_the_class_token():
    """PruMerge's published placement (--features N, layer N + 1's attention) at units: K units by the mean of
    their tokens' full-width class attention, then the extra unit; the class token left out (PruMerge's output)."""
    model, images = _model(depth=3), _images()
    compressed = compress(model, [PruMergeConfig(tokens=5, layers=(2,)), UnshuffleConfig()], {"x": images},
                          features=1, emit_positions=True)
    tokens, positions, sizes = _run(compressed, images)
    assert tokens.shape[1] == 6 and torch.equal(sizes[:, -1, 0], torch.full((2,), 11.0 * 4))  # 16 - 5 units
    index = (positions[:, :5, 0] * (GRID[1] // UNIT) + positions[:, :5, 1]).round().long()
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:2]:
            x = block(x)
        q, k, _ = model.blocks[2].attn.qkv(model.blocks[2].norm1(x)).chunk(3, dim=-1)  # full width
        scores = torch.softmax(q[:, :1] @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)[:, 0]
    for b in range(2):
        layout = ref.raster_layout(GRID, UNIT, 1)
        unit_scores = [float(scores[b, u.rows].mean()) for u in layout.units]
        assert index[b].tolist() == sorted(range(16), key=lambda u: (-unit_scores[u], u))[:5]

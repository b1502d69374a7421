"""Merge units (docs/merge-units.md): token methods acting on whole s x s windows, and the window projectors after
them, held to the per-sample reference of ``reference_units`` (written from the rules, not from the code)."""

from __future__ import annotations

import pytest
import torch

from tc_export import compress
from tc_export.errors import ConfigError
from tc_export.ops.projectors.windows import UnitWindows
from tc_export.passes import ToMeConfig, TopKConfig
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


def _check_against_reference(model, compressed, images, ops, projector: str, prop_attn: bool) -> None:
    tokens, positions, sizes = _run(compressed, images)
    window_fn, sd = WINDOW_FNS[projector][1](_projector_weights(compressed) if projector.startswith(("unsh", "patch"))
                                             else {})
    with torch.no_grad():
        results = ref.run_units(model, images, GRID, UNIT, ops, prop_attn)
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

    from tc_export import pipeline
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
